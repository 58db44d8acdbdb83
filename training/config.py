"""The training config: a YAML preset from config/ plus `--key value` overrides from the CLI.

Top-level keys are the fields of TrainConfig. The model and optimizer sections are passed
through to model/ and optim/, which validate their own fields:
    --model sample --model_args.n_layers 4 --optim.lr_hidden 0.02
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from runtime.devices import DEVICES
from runtime.errors import ConfigError
from submissions.tracks import TRACKS

DEFAULT_CONFIG = "config/speedrun.yaml"
DICT_KEYS = ("model_args", "optim")


@dataclass
class TrainConfig:
    # what to train
    model: str = "speedrun"  # a preset of model.PRESETS
    model_args: dict = field(default_factory=dict)  # ModelConfig overrides
    optim: dict = field(default_factory=dict)  # OptimConfig overrides of the preset's recipe
    # data
    data: str = "omg_prot50"  # "sample", "omg_prot50" or a directory of shards
    data_cache: str = ""  # where "sample"/"omg_prot50" live; "" = data/ default (cache/)
    num_chunks: int = 4  # train shards to download for omg_prot50 when missing
    batch_size: int = 524288  # global tokens per optimizer step (all ranks, all micro-batches)
    grad_accum: int = 1
    max_length: int = 1024  # row length L of every batch
    crop: str = "random"  # documents longer than max_length: "random" crop or "split"
    # n > 1: each micro-batch is rows of one length max_length * k / n, short documents in short
    # rows, so dense attention costs about what the documents need (data/buckets.py, docs/training.md)
    length_buckets: int = 1
    # true: documents that fill a row of max_length alone (crops of longer ones) are packed into
    # micro-batches of their own, whose attention runs with no mask (SDPA's fast kernels, the
    # Neuron flash kernel); with or without length_buckets (data/buckets.py, docs/training.md)
    whole_rows: bool = False
    # patch_unet: each document starts at a multiple of 2^(its merges), padding between, so no
    # merged token of any level mixes two documents (docs/models.md, "Patch UNet")
    align_docs: bool = False
    mask_rule: str = "all_mask"  # "esm2" (80/10/10) | "all_mask"
    mask_rate: float = 0.2
    mask_rate_start: float = 0.0  # > 0: linear schedule from this rate ...
    mask_rate_steps: int = 0  # ... to mask_rate over this many steps (with masked_diffusion: the warm-up)
    # true: masked diffusion (rate t ~ U[1e-3, 1), all <mask>, loss weight 1/t) from step
    # mask_rate_steps on, the masking above before it (docs/training.md, "Masked diffusion")
    masked_diffusion: bool = False
    diffusion_rate_per: str = "sequence"  # one rate per "sequence" (document) or per micro-"batch"
    # sliding-window attention (docs/training.md): > 0, a query attends only to keys at most
    # this many positions away (in its document); 0 = whole documents
    attn_window: int = 0
    attn_window_start: int = 0  # > 0: the window grows linearly from this to attn_window ...
    attn_window_steps: int = 0  # ... over this many optimizer steps
    # schedule of the run
    num_steps: int = 10000
    steps_this_run: int = 0  # > 0: stop (with a checkpoint) after this many steps, to resume later
    log_every: int = 10
    eval_every: int = 1000  # 0 = only at the end
    eval_batch_size: int = 65536  # tokens per evaluation batch per rank
    eval_max_batches: int = 0  # > 0: score only this many validation batches during training
    save_every: int = 1000  # 0 = only on SIGTERM/SIGINT and at the end
    keep_checkpoints: int = 2
    max_skipped_steps: int = 5  # non-finite steps in a row before the run stops
    # runtime
    device: str = "auto"  # auto (cuda, else neuron, else cpu) | cuda | cpu | neuron (trn2/trn3) | xla (trn1)
    precision: str = "auto"  # auto (bf16 on cuda/neuron/xla, fp32 on cpu) | bf16 | fp32 | bf16_sr (XLA: bf16 weights)
    compile: str = "auto"  # auto (on for cuda) | true | false; true works on the CPU too
    # every kind of micro-batch (bucket shapes, whole rows) stepped once in the warm-up step and
    # undone, so timed steps compile nothing: auto = on XLA/Neuron, and under compile with several kinds
    precompile: str = "auto"  # auto | true | false
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP with several processes; not on xla
    seed: int = 0
    track: str = ""  # the leaderboard track this run claims (submissions/tracks.py), "" = none
    # outputs
    log_name: str = ""  # "" = <config name>-<time>
    log_dir: str = "logs"
    checkpoint_dir: str = "checkpoints"
    resume: str = ""  # "" | "auto" | a checkpoint directory
    wandb: bool = False
    wandb_project: str = "esm-speedrun"
    # "A:B": torch.profiler over optimizer steps A..B, written beside the log (docs/training.md)
    profile_steps: str = ""
    # set by load_config, for the log
    config_file: str = ""
    # What load_config changed on its own, one log line each: a class attribute, not a field,
    # so it is no config key and stays out of the logged config.
    notes = ()

    def micro_batch_rows(self, world_size: int) -> int:
        """Rows B of each micro-batch: batch_size / (world_size * grad_accum * max_length)."""
        per = world_size * self.grad_accum * self.max_length
        if self.batch_size % per:
            raise ConfigError(
                f"batch_size={self.batch_size} tokens is not divisible by world_size ({world_size}) "
                f"x grad_accum ({self.grad_accum}) x max_length ({self.max_length}) = {per}; "
                f"use a multiple of {per}, e.g. {max(per, self.batch_size // per * per)}."
            )
        return self.batch_size // per

    def identity(self) -> dict:
        """The keys a resumed run must share with its checkpoint to continue the same run."""
        keys = ("model", "model_args", "optim", "data", "batch_size", "grad_accum", "max_length",
                "crop", "mask_rule", "mask_rate", "mask_rate_start", "mask_rate_steps", "seed")
        # keys added later count only when set, so checkpoints written before them still resume
        later = ("masked_diffusion", "diffusion_rate_per", "attn_window", "attn_window_start",
                 "attn_window_steps", "align_docs", "length_buckets", "whole_rows")
        return {**{k: getattr(self, k) for k in keys},
                **{k: getattr(self, k) for k in later if getattr(self, k) != _FIELDS[k].default}}

    def attn_window_at(self, step: int) -> int:
        """The attention window of optimizer step `step` (0 = whole documents): attn_window, or
        with attn_window_start a linear growth to it over attn_window_steps, rounded down."""
        if not self.attn_window_start:
            return self.attn_window
        done = min(step, self.attn_window_steps)
        return self.attn_window_start + (self.attn_window - self.attn_window_start) * done // self.attn_window_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_CHOICES = {"device": DEVICES, "precision": ("auto", "bf16", "bf16_sr", "fp32"),
            "compile": ("auto", "true", "false"),
            "precompile": ("auto", "true", "false"), "crop": ("random", "split"),
            "mask_rule": ("esm2", "all_mask"), "diffusion_rate_per": ("sequence", "batch")}
_POSITIVE = ("batch_size", "grad_accum", "max_length", "length_buckets", "num_steps", "log_every",
             "eval_batch_size", "keep_checkpoints", "max_skipped_steps")
_NON_NEGATIVE = ("steps_this_run", "eval_every", "eval_max_batches", "save_every",
                 "num_chunks", "mask_rate_steps", "seed", "attn_window", "attn_window_start",
                 "attn_window_steps")


def load_config(argv: list[str]) -> TrainConfig:
    """Parse `--config FILE` and `--key value` / `--key=value` / bare `--flag` (= true)."""
    overrides = _parse_argv(argv)
    path = overrides.pop("config", None) or DEFAULT_CONFIG
    values = _read_yaml(path)
    for key, value in overrides.items():
        if "." in key:
            section, sub = key.split(".", 1)
            _check_key(section, f"--{key}")
            if section not in DICT_KEYS:
                raise ConfigError(f"--{key}: only {', '.join(DICT_KEYS)} take sub-keys; use --{section} VALUE.")
            values.setdefault(section, {})
            values[section] = {**(values[section] or {}), sub: value}
        else:
            values[key] = value
    cfg = make_config(values)
    cfg.config_file = str(path)
    if "optim.warmup_steps" not in overrides:  # the only way to set it on the command line
        _fit_warmup(cfg)
    if 0 < cfg.attn_window < cfg.max_length - 1:
        cfg.notes = (*cfg.notes, f"note: attn_window={cfg.attn_window} is narrower than the rows "
                         f"(max_length {cfg.max_length}); evaluation attends whole documents, as the benchmark defines")
    return cfg


def _fit_warmup(cfg: TrainConfig) -> None:
    """Shrinks a warm-up from a config file or a preset that does not fit a run shortened on
    the command line (`--num_steps 20`); one set with --optim.warmup_steps is left to be refused."""
    from optim.config import OptimConfig, default_optim_config
    from optim.schedules import fitted_warmup

    try:
        ocfg = OptimConfig.from_dict(cfg.optim, base=default_optim_config(cfg.model))
        fitted = fitted_warmup(cfg.num_steps, ocfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    if fitted != ocfg.warmup_steps:
        cfg.optim = {**cfg.optim, "warmup_steps": fitted}
        cfg.notes = (*cfg.notes, f"note: warmup_steps={ocfg.warmup_steps} does not fit a {cfg.num_steps}-step run; "
                         f"using warmup_steps={fitted} (set --optim.warmup_steps to choose)")


def make_config(values: dict) -> TrainConfig:
    """A validated TrainConfig from a dict of (possibly string) values."""
    typed = {}
    for key, value in values.items():
        _check_key(key, f"config key {key!r}")
        typed[key] = _coerce(key, value)
    cfg = TrainConfig(**typed)
    _validate(cfg)
    return cfg


def _parse_argv(argv: list[str]) -> dict:
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; options look like --key value (see config/*.yaml for keys).")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"  # a bare flag such as --wandb
        out[key] = value
        i += 1
    return out


def _read_yaml(path) -> dict:
    p = Path(path)
    if not p.is_file():
        presets = sorted(x.stem for x in Path("config").glob("*.yaml"))
        raise ConfigError(f"config file {str(p)!r} does not exist; pass --config config/NAME.yaml (presets: {', '.join(presets)}).")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML ({str(e).splitlines()[0]}); fix the file.") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {str(p)!r} must be a mapping of key: value lines.")
    return values


def _check_key(key: str, what: str) -> None:
    if key not in _FIELDS or key == "config_file":
        close = difflib.get_close_matches(key, list(_FIELDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{what} is not a training option{hint}; the options are the keys of config/speedrun.yaml.")


def _coerce(key: str, value):
    """Strings from the CLI are read as YAML scalars, then checked against the field's type."""
    kind = _FIELDS[key].type
    if key in DICT_KEYS:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping (e.g. --{key}.NAME VALUE), got {value!r}.")
        return {k: _scalar(v) for k, v in value.items()}
    if kind != "str":
        value = _scalar(value)
    if key in ("compile", "precompile") and isinstance(value, bool):
        value = str(value).lower()
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "bool": isinstance(value, bool),
          "str": isinstance(value, (str, int, float)) and not isinstance(value, bool)}[kind]
    if not ok:
        article = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}[kind]
        raise ConfigError(f"config key {key!r} must be {article}, got {value!r}.")
    return float(value) if kind == "float" else str(value) if kind == "str" else value


def _scalar(value):
    """A CLI string read as YAML, plus what YAML 1.1 leaves a string but users mean as a number (3e-3)."""
    if not isinstance(value, str):
        return value
    try:
        value = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _validate(cfg: TrainConfig) -> None:
    for key, choices in _CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"config key {key!r} is {getattr(cfg, key)!r}; use one of {', '.join(choices)}.")
    for key in _POSITIVE:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"config key {key!r} is {getattr(cfg, key)}; it must be > 0.")
    for key in _NON_NEGATIVE:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"config key {key!r} is {getattr(cfg, key)}; it must be >= 0.")
    for key in ("mask_rate", "mask_rate_start"):
        if not 0 <= getattr(cfg, key) <= 1:
            raise ConfigError(f"config key {key!r} is {getattr(cfg, key)}; it must be in [0, 1].")
    if cfg.mask_rate <= 0:
        raise ConfigError(f"config key 'mask_rate' is {cfg.mask_rate}; it must be > 0 or there is nothing to learn.")
    if cfg.masked_diffusion and cfg.mask_rate_steps >= cfg.num_steps:
        raise ConfigError(f"--mask_rate_steps {cfg.mask_rate_steps} (the warm-up before masked diffusion) leaves no "
                          f"diffusion step in a {cfg.num_steps}-step run; use fewer than num_steps.")
    if cfg.attn_window_start and not 0 < cfg.attn_window_start <= cfg.attn_window:
        raise ConfigError(f"--attn_window_start {cfg.attn_window_start} must lie in 1..attn_window "
                          f"({cfg.attn_window}): the window grows from it to attn_window; set --attn_window.")
    if bool(cfg.attn_window_start) != bool(cfg.attn_window_steps):
        raise ConfigError(f"--attn_window_start ({cfg.attn_window_start}) and --attn_window_steps "
                          f"({cfg.attn_window_steps}) go together: the window grows from the first over the "
                          "second many steps; set both, or neither for a fixed window.")
    patch_unet = model_arch(cfg) == "patch_unet"
    if patch_unet and cfg.max_length & (cfg.max_length - 1):
        raise ConfigError(f"--max_length {cfg.max_length}: a patch_unet model halves its rows at every level, so "
                          f"they must be a power of two tokens, e.g. {1 << (cfg.max_length - 1).bit_length()}.")
    if cfg.length_buckets > 1 and patch_unet:
        raise ConfigError("--length_buckets: a patch_unet model is built for rows of max_length tokens only; "
                          "drop --length_buckets.")
    if cfg.length_buckets > 1:
        from data.buckets import check_buckets

        try:
            check_buckets(cfg.max_length, cfg.length_buckets)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.align_docs and not patch_unet:
        raise ConfigError("--align_docs lays documents out for the Patch UNet's merges; use it with "
                          "--model patch_unet (arch patch_unet) only.")
    if cfg.track and cfg.track not in TRACKS:
        raise ConfigError(f"--track {cfg.track!r} is not a leaderboard track; use one of {', '.join(TRACKS)} or leave it empty.")
    if cfg.track and TRACKS[cfg.track].data != cfg.data:
        raise ConfigError(f"--track {cfg.track} is scored on data {TRACKS[cfg.track].data!r}, not {cfg.data!r}; "
                          f"run with --data {TRACKS[cfg.track].data} or claim no track (--track \"\").")
    if cfg.profile_steps:
        from training.profiling import parse_steps

        try:
            parse_steps(cfg.profile_steps, cfg.num_steps)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if cfg.track:
            raise ConfigError(f"--profile_steps slows the steps it watches, so a profiled run cannot claim track "
                              f"{cfg.track!r}; add --track \"\" to profile.")
    if cfg.resume not in ("", "auto") and not os.path.isdir(cfg.resume):
        raise ConfigError(f"--resume {cfg.resume!r} is not a checkpoint directory; use --resume auto or a path under {cfg.checkpoint_dir}/.")


def model_arch(cfg: TrainConfig) -> str | None:
    """The architecture the run's model preset and model_args name (None: unknown preset)."""
    from model.config import PRESETS

    return cfg.model_args.get("arch", PRESETS.get(cfg.model, {}).get("arch"))


def model_config(cfg: TrainConfig, **backend_defaults):
    """The ModelConfig of the run: preset, then the backend's defaults (e.g. flex attention
    on CUDA), then the user's model_args, which win. A Patch UNet is built for the run's rows."""
    from model import get_config

    args = {**backend_defaults, **cfg.model_args}
    if model_arch(cfg) == "patch_unet":
        if args.get("max_length", cfg.max_length) != cfg.max_length:
            raise ConfigError(f"--model_args.max_length {args['max_length']} differs from --max_length "
                              f"{cfg.max_length}; a patch_unet model is built for the run's rows: drop it.")
        args["max_length"] = cfg.max_length
    try:
        return get_config(cfg.model, **args)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def doc_multiple(cfg: TrainConfig) -> int:
    """Where the training loader starts each document (data.packing.span): at multiples of
    2^merges of the Patch UNet with align_docs, anywhere (1) otherwise."""
    if not cfg.align_docs:
        return 1
    from model.config import doc_alignment

    return doc_alignment(model_config(cfg))


def optim_config(cfg: TrainConfig):
    """The OptimConfig of the run: the preset's recipe with the user's optim overrides."""
    from optim.config import OptimConfig, default_optim_config
    from optim.schedules import check_schedule_fits

    try:
        ocfg = OptimConfig.from_dict(cfg.optim, base=default_optim_config(cfg.model))
        check_schedule_fits(cfg.num_steps, ocfg)
        return ocfg
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
