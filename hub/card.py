"""The model card (README.md) that `python -m hub push` uploads beside an esm2 export.

Everything on the card is read, never guessed: the architecture from the weights, the training
settings and counters from the training checkpoint, the benchmark numbers and the hardware
from the run log (logs/<log_name>.jsonl). What is not known is said to be unknown.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from model.config import ModelConfig
from model.io import UnsafeFileError, load_file

ROOT = Path(__file__).resolve().parent.parent
TAGS = ["protein", "esm2", "masked-language-modeling", "esm-speedrun"]
BENCHMARK = (
    "15% of the residues of every validation/test sequence are masked at positions fixed by the "
    "sequence's index, sequences are cut to 1,024 tokens, and the loss is the summed "
    "cross-entropy over all masked positions divided by their number (perplexity = exp(loss)); "
    "accuracy, support-weighted F1 and multi-class MCC come from the confusion matrix of the "
    "masked residues."
)
# Where a named dataset came from, beyond its packed Hub copy (data.datasets.DOWNLOADS).
UPSTREAM = {"omg_prot50": ("tattabio/OMG_prot50", "CC-BY-SA-4.0")}


@dataclass
class RunInfo:
    """What is known about the run behind a checkpoint."""

    step: int | None = None  # the checkpoint's step (None: a bare weights file)
    config: dict | None = None  # the resolved training config
    state: dict | None = None  # the counters at the checkpoint (tokens, train_time, ...)
    log: Path | None = None
    log_note: str = ""  # why there is no log
    records: list[dict] = field(default_factory=list)

    @property
    def headers(self) -> list[dict]:
        return [r for r in self.records if r.get("kind") == "header"]


def read_checkpoint_meta(path: Path) -> tuple[dict | None, dict | None]:
    """(training config, counters) of a train.py checkpoint; (None, None) for a weights file.
    Memory-mapped, so the weights are not read a second time."""
    try:
        blob = load_file(path, mmap=True)
    except UnsafeFileError:
        raise
    except ValueError:  # no zip layout to map (an old format, or no checkpoint at all)
        blob = None
    if not isinstance(blob, dict) or "model_config" not in blob:
        raise ValueError(f"{path}: not an esm-speedrun weights file or checkpoint.")
    config, state = blob.get("config"), blob.get("state")
    return (dict(config) if isinstance(config, dict) else None,
            dict(state) if isinstance(state, dict) else None)


def find_log(explicit: str | None, config: dict | None) -> tuple[Path | None, str]:
    """The run log (.jsonl): --log (a .jsonl or its .txt), else <log_dir>/<log_name>.jsonl from
    the checkpoint's config, relative to the working directory or to the project."""
    if explicit:
        p = Path(explicit)
        p = p.with_suffix(".jsonl") if p.suffix == ".txt" else p
        if not p.is_file():
            raise ValueError(f"--log {explicit}: no run log at {p} (the .jsonl file beside the .txt).")
        return p, ""
    if not config or not config.get("log_name"):
        return None, "this weights file records no training run; pass --log to add its run log"
    rel = Path(config.get("log_dir") or "logs") / f"{config['log_name']}.jsonl"
    for p in (rel, ROOT / rel):
        if p.is_file():
            return p, ""
    return None, f"no run log was found at {rel}; pass --log to add it"


def read_log(path: Path) -> list[dict]:
    """JSON records of a run log; a line cut short by a killed run is skipped."""
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def gather(checkpoint_file: Path, log: str | None) -> RunInfo:
    config, state = read_checkpoint_meta(checkpoint_file)
    path, note = find_log(log, config)
    info = RunInfo(step=(state or {}).get("step"), config=config, state=state, log=path, log_note=note)
    if path is not None:
        info.records = read_log(path)
        if not info.headers:
            raise ValueError(f"{path} is not a run log of train.py (no header record).")
        logged = info.headers[-1].get("config", {}).get("log_name")
        if config and config.get("log_name") and logged and logged != config["log_name"]:
            raise ValueError(
                f"{path} is the log of run {logged!r} but the checkpoint belongs to run "
                f"{config['log_name']!r}; pass that run's log with --log, or leave --log out.")
        if info.config is None:
            info.config = info.headers[-1].get("config")
    return info


def results(info: RunInfo) -> tuple[dict | None, str]:
    """The benchmark numbers that belong to this checkpoint, and where they come from."""
    summaries = [r for r in info.records if r.get("kind") == "summary"]
    if info.step is None:  # a bare weights file: the run's final numbers
        if summaries:
            s = summaries[-1]
            return s, (f"the run's final evaluation at step {s.get('step')} (the weights file "
                       "does not record its step; this assumes it holds the final weights)")
        return None, "the run log has no final summary"
    for s in reversed(summaries):
        if s.get("step") == info.step:
            return s, f"the final evaluation at step {info.step} (full validation and test sets)"
    evals = [r for r in info.records if r.get("kind") == "eval" and r.get("step") == info.step]
    if evals:
        merged = {k: v for r in evals for k, v in r.items()}
        cap = (info.config or {}).get("eval_max_batches")
        part = (f" on the first {cap} validation batches only" if cap and "test_loss" not in merged
                else "")
        return merged, f"the evaluation logged at step {info.step}{part}"
    return None, f"the run log has no evaluation at step {info.step}, the checkpoint's step"


def param_count(cfg: ModelConfig) -> int:
    from model import build_model
    from model.config import param_counts

    with torch.device("meta"):
        return param_counts(build_model(cfg))["total"]


def _data(name: str) -> tuple[str, list[str]]:
    """(a sentence on the training data, Hub dataset ids for the front matter)."""
    from data.datasets import DOWNLOADS, SAMPLE_SPLITS

    if name == "sample":
        n = 20000 - SAMPLE_SPLITS["valid"] - SAMPLE_SPLITS["test"]
        return (f"the project's shipped sample: 20,000 UniProtKB sequences (CC BY 4.0, The UniProt "
                f"Consortium), {n:,} of them for training; a quick-start set, not a pretraining "
                "corpus", [])
    key = next((k for k, (_, prefixes) in DOWNLOADS.items()
                if name == k or Path(name).name in (k, *prefixes)), None)
    if key is None:
        return f"token shards from `{name}`", []
    repo = DOWNLOADS[key][0]
    text = f"{key}, packed token shards from [{repo}](https://huggingface.co/datasets/{repo})"
    ids = [repo]
    if key in UPSTREAM:
        src, lic = UPSTREAM[key]
        text += f" (from [{src}](https://huggingface.co/datasets/{src}), {lic})"
        ids.append(src)
    return text, ids


def _fmt_int(v) -> str:
    return f"{int(v):,}" if isinstance(v, (int, float)) else "unknown"


def _fmt_time(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "unknown"
    h, rest = divmod(float(seconds), 3600)
    return f"{seconds:,.1f} s" + (f" ({int(h)} h {rest / 60:.0f} min)" if h >= 1 else "")


def _hardware(info: RunInfo) -> str:
    seen = []
    for h in info.headers:
        env = h.get("environment") or {}
        if env.get("device") and env["device"] not in seen:
            seen.append(env["device"])
    return "; then ".join(seen) if seen else "unknown (no run log)"


def _metrics_table(res: dict) -> str:
    cols = [("loss", "loss", 4), ("ppl", "perplexity", 3), ("acc", "accuracy", 4),
            ("f1", "F1", 4), ("mcc", "MCC", 4)]
    lines = ["| split | " + " | ".join(c[1] for c in cols) + " | masked tokens |",
             "|---" * (len(cols) + 2) + "|"]
    for split, label in (("val", "validation"), ("test", "test")):
        if f"{split}_loss" not in res:
            continue
        cells = [f"{res[f'{split}_{k}']:.{nd}f}" if isinstance(res.get(f"{split}_{k}"), (int, float))
                 else "-" for k, _, nd in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_fmt_int(res.get(f'{split}_tokens'))} |")
    return "\n".join(lines)


def front_matter(datasets: list[str], license: str | None) -> str:
    meta = {"library_name": "transformers"}
    if license:
        meta["license"] = license
    meta.update(tags=list(TAGS), pipeline_tag="fill-mask")
    if datasets:
        meta["datasets"] = datasets
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def model_card(repo_id: str, cfg: ModelConfig, info: RunInfo, license: str | None = None) -> str:
    config = info.config or {}
    state = info.state or {}
    data_text, dataset_ids = _data(str(config["data"])) if config.get("data") else ("unknown", [])
    res, res_source = results(info) if info.log else (None, info.log_note)
    final = res if res and res.get("kind") == "summary" else {}

    trained = bool(config)
    intro = ("An ESM2-architecture protein masked language model, trained from scratch with "
             "esm-speedrun (plain-PyTorch speedrun pretraining of ESM2-style protein language "
             "models) and converted to Hugging Face `EsmForMaskedLM`." if trained else
             "An ESM2-architecture protein masked language model exported from an esm-speedrun "
             "weights file to Hugging Face `EsmForMaskedLM`; the file records no training run.")
    out = [front_matter(dataset_ids, license), f"# {repo_id.split('/')[-1]}", "", intro, "",
           "## Model", "",
           "| | |", "|---|---|",
           "| architecture | ESM2 (pre-LayerNorm Transformer encoder, rotary positions, GELU, "
           "tied embeddings) |",
           f"| layers | {cfg.n_layers} |", f"| d_model | {cfg.d_model} |",
           f"| attention heads | {cfg.n_heads} |", f"| FFN width | {cfg.d_ff} |",
           f"| parameters | {param_count(cfg):,} |",
           "| vocabulary | the 33-token ESM2 alphabet |",
           f"| token dropout | {'on' if cfg.token_dropout else 'off'} |", "",
           "The contact-prediction head of `EsmForMaskedLM` is not trained: its weights are zero.",
           "", "## Training", ""]
    if trained:
        steps = info.step if info.step is not None else final.get("step")
        of = f" of {config['num_steps']:,} planned" if isinstance(config.get("num_steps"), int) else ""
        tokens = state.get("tokens", final.get("tokens"))
        tokens_all = state.get("tokens_all", final.get("tokens_all"))
        train_time = state.get("train_time", final.get("train_time"))
        warmup = state.get("warmup_time", final.get("warmup_time"))
        out += [f"- data: {data_text}",
                f"- steps: {_fmt_int(steps)}{of}",
                f"- batch: {_fmt_int(config.get('batch_size'))} token positions per step in "
                f"packed rows of {config.get('max_length', '?')} tokens; masking "
                f"`{config.get('mask_rule', '?')}` at rate {config.get('mask_rate', '?')}",
                f"- tokens: {_fmt_int(tokens)} real tokens (residues and special tokens, no "
                f"padding); {_fmt_int(tokens_all)} positions including padding",
                f"- train time: {_fmt_time(train_time)}"
                + (f" (plus {_fmt_time(warmup)} for the first, warm-up step)"
                   if isinstance(warmup, (int, float)) and warmup else ""),
                f"- hardware: {_hardware(info)}",
                f"- run: `{config.get('log_name', '?')}`, config `{config.get('config_file') or '-'}`"
                + (f", commit `{info.headers[-1]['environment'].get('git_commit')}`"
                   if info.headers and (info.headers[-1].get("environment") or {}).get("git_commit")
                   else ""), ""]
    else:
        out += ["Unknown: this weights file records no training run.", ""]
    out += ["## Benchmark", "", f"The esm-speedrun benchmark: {BENCHMARK}", ""]
    if res:
        out += [f"Numbers from {res_source} (run log `{info.log.name}`):", "", _metrics_table(res), ""]
    else:
        out += [f"No benchmark numbers are reported: {res_source}.", ""]
    out += ["## Usage", "", "```python",
            "import torch",
            "from transformers import EsmForMaskedLM, EsmTokenizer", "",
            f'tokenizer = EsmTokenizer.from_pretrained("{repo_id}")',
            f'model = EsmForMaskedLM.from_pretrained("{repo_id}").eval()',
            'inputs = tokenizer("MKTAYIAKQR<mask>QISFVKSHFSRQ", return_tensors="pt")',
            "with torch.no_grad():",
            "    logits = model(**inputs).logits",
            "mask = inputs.input_ids == tokenizer.mask_token_id",
            "print(tokenizer.convert_ids_to_tokens(logits[mask].argmax(-1)))",
            "```", ""]
    if config:
        out += ["<details><summary>Resolved training config</summary>", "", "```yaml",
                yaml.safe_dump(config, sort_keys=False).rstrip("\n"), "```", "", "</details>", ""]
    return "\n".join(out)
