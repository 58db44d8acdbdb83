"""Hugging Face interop for the esm2 architecture.

    python -m model.hf import HF_DIR CHECKPOINT     # EsmForMaskedLM dir -> our weights file
    python -m model.hf export CHECKPOINT OUT_DIR    # ours -> transformers.EsmForMaskedLM dir
    python -m model.hf push CHECKPOINT OWNER/NAME   # export + model card -> the Hub (HF_TOKEN)

CHECKPOINT: a weights file, a train.py step directory, or a run directory (its newest step).

ESM2's contact head (a logistic regression on attention maps, unused by masked LM) is
dropped on import and zero-initialised on export.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

import torch

from model.config import ESM2_SWITCHES, ModelConfig
from model.io import load_weights, save_weights

_LAYER_MAP = {  # ours (under blocks.{i}.) -> HF (under esm.encoder.layer.{i}.)
    "ln1": "attention.LayerNorm",
    "attn.q": "attention.self.query",
    "attn.k": "attention.self.key",
    "attn.v": "attention.self.value",
    "attn.o": "attention.output.dense",
    "ln2": "LayerNorm",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_TOP_MAP = {
    "embed": "esm.embeddings.word_embeddings",
    "norm": "esm.encoder.emb_layer_norm_after",
    "lm_head.dense": "lm_head.dense",
    "lm_head.norm": "lm_head.layer_norm",
}


def _key_map(n_layers: int) -> dict:
    """Our parameter name -> HF parameter name, for every parameter of ESM2."""
    pairs = {"lm_head.bias": "lm_head.bias"}
    mods = dict(_TOP_MAP)
    for i in range(n_layers):
        mods.update({f"blocks.{i}.{a}": f"esm.encoder.layer.{i}.{b}" for a, b in _LAYER_MAP.items()})
    for ours, theirs in mods.items():
        for leaf in ("weight", "bias"):
            pairs[f"{ours}.{leaf}"] = f"{theirs}.{leaf}"
    pairs.pop("embed.bias")
    return pairs


def config_from_hf(hf_cfg) -> ModelConfig:
    checks = {
        "position_embedding_type": (hf_cfg.position_embedding_type, "rotary"),
        "emb_layer_norm_before": (bool(hf_cfg.emb_layer_norm_before), False),
        "vocab_size": (hf_cfg.vocab_size, 33),
        "hidden_act": (getattr(hf_cfg, "hidden_act", "gelu"), "gelu"),
        "is_folding_model": (bool(hf_cfg.is_folding_model), False),
    }
    bad = {k: got for k, (got, want) in checks.items() if got != want}
    if bad:
        raise ValueError(
            f"Hugging Face config has {bad}, which is not the ESM2 architecture; only ESM2 "
            "masked-LM checkpoints (rotary, 33 tokens, no embedding LayerNorm) can be imported."
        )
    return ModelConfig(
        arch="esm2", n_layers=hf_cfg.num_hidden_layers, d_model=hf_cfg.hidden_size,
        n_heads=hf_cfg.num_attention_heads, d_ff=hf_cfg.intermediate_size,
        norm_eps=hf_cfg.layer_norm_eps, rope_base=getattr(hf_cfg, "rope_theta", 10000.0),
        token_dropout=bool(hf_cfg.token_dropout), **ESM2_SWITCHES,
    )


def hf_config(cfg: ModelConfig, **extra):
    from transformers import EsmConfig
    from transformers.models.esm.configuration_esm import get_default_vocab_list

    return EsmConfig(
        vocab_size=cfg.vocab_size, mask_token_id=32, pad_token_id=1, cls_token_id=0, eos_token_id=2,
        hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.d_ff, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, max_position_embeddings=1026, layer_norm_eps=cfg.norm_eps,
        position_embedding_type="rotary", rope_theta=cfg.rope_base, emb_layer_norm_before=False,
        token_dropout=cfg.token_dropout, vocab_list=list(get_default_vocab_list()),
        architectures=["EsmForMaskedLM"], **extra,
    )


def state_dict_from_hf(hf_sd: dict, cfg: ModelConfig) -> dict:
    return {ours: hf_sd[theirs].detach().clone() for ours, theirs in _key_map(cfg.n_layers).items()}


def import_hf(hf_dir: str, checkpoint: str) -> ModelConfig:
    from transformers import EsmForMaskedLM

    hf = EsmForMaskedLM.from_pretrained(hf_dir, dtype=torch.float32)
    cfg = config_from_hf(hf.config)
    from model import build_model
    from model.io import load_state_dict_checked

    model = build_model(cfg)
    load_state_dict_checked(model, state_dict_from_hf(hf.state_dict(), cfg))
    save_weights(checkpoint, model, cfg)
    return cfg


def resolve_checkpoint(checkpoint: str) -> Path:
    """The file to read: a weights file as is; a step directory's common.pt; a run
    directory's newest step."""
    from runtime.checkpoint import list_checkpoints

    p = Path(checkpoint)
    if p.is_dir():
        steps = [p] if (p / "common.pt").is_file() else list_checkpoints(p)
        if not steps:
            raise ValueError(f"{checkpoint} holds no checkpoint (no common.pt or step_*/common.pt); "
                             "pass a step directory, a run directory or a weights file.")
        return steps[-1] / "common.pt"
    if not p.is_file():
        raise ValueError(f"{checkpoint} does not exist; pass a weights file or a checkpoint directory.")
    return p


def export_hf(checkpoint: str, out_dir: str) -> ModelConfig:
    from transformers import EsmForMaskedLM, EsmTokenizer

    cfg, sd = load_weights(resolve_checkpoint(checkpoint))
    if cfg.arch != "esm2":
        raise ValueError(
            f"{checkpoint}: a '{cfg.arch}' model has no Hugging Face equivalent; only esm2-"
            "architecture checkpoints can be exported (train an esm2_* preset for that)."
        )
    hf = EsmForMaskedLM(hf_config(cfg))
    hf_sd = {theirs: sd[ours] for ours, theirs in _key_map(cfg.n_layers).items()}
    hf_sd["lm_head.decoder.weight"] = sd["embed.weight"]  # tied in both
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    params = dict(hf.named_parameters(remove_duplicate=False))
    leftover = [k for k in missing if k in params and not k.startswith("esm.contact_head")]
    if leftover or unexpected:
        raise RuntimeError(f"export left HF parameters unset {leftover} or unknown {unexpected}.")
    torch.nn.init.zeros_(hf.esm.contact_head.regression.weight)
    torch.nn.init.zeros_(hf.esm.contact_head.regression.bias)
    _quiet_save(hf, out_dir)
    _save_tokenizer(out_dir, EsmTokenizer)
    return cfg


def _quiet_save(hf, out_dir: str) -> None:
    """save_pretrained without its one-shard progress bar on stderr."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        hf.save_pretrained(out_dir)
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _save_tokenizer(out_dir: str, tokenizer_cls) -> None:
    from transformers.models.esm.configuration_esm import get_default_vocab_list

    with tempfile.TemporaryDirectory() as tmp:
        vocab = os.path.join(tmp, "vocab.txt")
        with open(vocab, "w") as f:
            f.write("\n".join(get_default_vocab_list()) + "\n")
        tokenizer_cls(vocab).save_pretrained(out_dir)


TOKEN_VAR = "HF_TOKEN"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def check_repo_id(repo_id: str) -> None:
    bad = (not _REPO_ID.fullmatch(repo_id) or len(repo_id) > 96 or "--" in repo_id
           or ".." in repo_id or repo_id.endswith((".", "-", ".git")))
    if bad:
        raise ValueError(f"repo id {repo_id!r} is not of the form OWNER/NAME (letters, digits, "
                         "'-', '_', '.'), e.g. my-user/esm2-8m-speedrun.")


class PushError(Exception):
    """The Hub refused the upload or could not be reached (one line, the token removed)."""


def push_hf(checkpoint: str, repo_id: str, *, private: bool = False, log: str | None = None,
            dry_run: str | None = None, revision: str | None = None,
            commit_message: str | None = None, license: str | None = None) -> tuple[Path, list[str], str]:
    """Exports `checkpoint` with a model card and uploads it to `repo_id` (token from HF_TOKEN).
    With dry_run=DIR the folder is built in DIR and nothing is sent. Returns (folder, files,
    repo URL or "")."""
    from model.hf_card import gather, model_card

    check_repo_id(repo_id)
    token = None
    if dry_run is None:
        token = os.environ.get(TOKEN_VAR, "").strip()
        if not token:
            raise ValueError(
                f"{TOKEN_VAR} is not set: create a write token at https://huggingface.co/settings/"
                f"tokens and `export {TOKEN_VAR}=...` (or pass --dry-run DIR to build the folder "
                "without uploading).")
    else:
        out = Path(dry_run)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"--dry-run {dry_run} exists and is not an empty directory; "
                             "pass a new one.")
    source = resolve_checkpoint(checkpoint)
    info = gather(source, log)  # a wrong --log is refused before anything is written
    with tempfile.TemporaryDirectory(prefix="esm-hf-push-") as tmp:
        folder = Path(dry_run) if dry_run is not None else Path(tmp)
        cfg = export_hf(str(source), str(folder))
        card = model_card(repo_id, cfg, info, license=license.lower() if license else None)
        (folder / "README.md").write_text(card)
        files = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file())
        if dry_run is not None:
            return folder, files, ""
        name = (f"{source.parent.parent.name}/{source.parent.name}" if source.name == "common.pt"
                else source.name)
        message = commit_message or f"esm-speedrun export of {name}"
        return folder, files, _upload(folder, repo_id, token, private, revision, message)


def _upload(folder: Path, repo_id: str, token: str, private: bool, revision: str | None,
            message: str) -> str:
    import huggingface_hub
    from huggingface_hub.errors import HTTPError

    try:
        api = huggingface_hub.HfApi(token=token)
        url = str(api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          revision=revision, commit_message=message)
    except (OSError, ValueError, HTTPError) as e:
        first = (str(e).strip().splitlines() or [""])[0].replace(token, "***")
        raise PushError(f"pushing to {repo_id} on the Hugging Face Hub failed "
                        f"({type(e).__name__}: {first}); check the network, that {TOKEN_VAR} "
                        "has write access, and the repo id.") from None
    return url + (f"/tree/{revision}" if revision else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.hf", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="Hugging Face EsmForMaskedLM directory -> our weights file")
    imp.add_argument("hf_dir")
    imp.add_argument("checkpoint")
    exp = sub.add_parser("export", help="our weights file or checkpoint -> Hugging Face directory")
    exp.add_argument("checkpoint")
    exp.add_argument("out_dir")
    pus = sub.add_parser("push", help="export with a model card and upload to the Hugging Face Hub "
                         f"(token from ${TOKEN_VAR})")
    pus.add_argument("checkpoint", help="weights file, step directory or run directory (newest step)")
    pus.add_argument("repo_id", help="OWNER/NAME on the Hub; created if missing")
    pus.add_argument("--private", action="store_true", help="create the repo private")
    pus.add_argument("--log", help="the run log (.jsonl or .txt); default: the checkpoint's own "
                     "<log_dir>/<log_name>.jsonl when it exists")
    pus.add_argument("--license", help="license id for the card (e.g. mit, apache-2.0, "
                     "cc-by-4.0); default: none stated")
    pus.add_argument("--dry-run", metavar="OUT_DIR", help="build the folder in OUT_DIR, list "
                     "what would be uploaded, send nothing (no token needed)")
    pus.add_argument("--revision", help="branch to push to (created if missing); default main")
    pus.add_argument("--commit-message")
    args = p.parse_args(argv)
    try:
        if args.cmd == "import":
            cfg = import_hf(args.hf_dir, args.checkpoint)
            print(f"imported {args.hf_dir} ({cfg.n_layers} layers, d_model {cfg.d_model}) -> {args.checkpoint}")
        elif args.cmd == "export":
            export_hf(args.checkpoint, args.out_dir)
            print(f"exported {args.checkpoint} -> {args.out_dir}")
        else:
            folder, files, url = push_hf(
                args.checkpoint, args.repo_id, private=args.private, log=args.log,
                dry_run=args.dry_run, revision=args.revision,
                commit_message=args.commit_message, license=args.license)
            if url:
                print(f"pushed {args.checkpoint} -> {url}")
            else:
                print(f"dry run: nothing uploaded; would push to {args.repo_id} "
                      f"({'private' if args.private else 'public'}) the files in {folder}:")
                for f in files:
                    print(f"  {f} ({(folder / f).stat().st_size:,} bytes)")
    except (ValueError, OSError, PushError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
