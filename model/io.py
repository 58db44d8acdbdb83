"""Weights files: save, load (also from a full training checkpoint), checked state-dict loading.

Every file is read with `load_file`, which never runs code: torch.load(weights_only=True)
accepts tensors and plain values (dicts, lists, tuples, strings, numbers) only, and a file that
would need Python's full unpickler is refused with a sentence naming it. One the user trusts can
be rewritten once into a safe file:

    python -m model.io convert OLD.pt NEW.pt --trust-this-file
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.config import ModelConfig

FORMAT = "esm-speedrun/1"
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers


def _unwrapped_state_dict(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


class UnsafeFileError(ValueError):
    """A .pt file that only Python's full unpickler can read (so it could run code)."""


def load_file(path, *, mmap: bool = False):
    """torch.load that never runs code from the file; UnsafeFileError when the file needs the
    full unpickler, ValueError when it is no PyTorch file at all. Nothing is changed on disk."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        asked = re.search(r"GLOBAL (\S+)", str(e))
        if asked:  # a class or function to import and call: what a crafted file does
            raise UnsafeFileError(
                f"{path} was not loaded: it asks for {asked[1]}, which only Python's full "
                "unpickler can build, and that could run code hidden in the file; if you trust "
                "where it came from, rewrite it once as a safe file with "
                f"`python -m model.io convert {path} NEW.pt --trust-this-file`.") from None
        raise ValueError(f"{path} is not a readable PyTorch file (the safe loader stopped at "
                         f"{_last_line(e)}); check the path, or copy the file again.") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a readable PyTorch file ({_last_line(e)}); check the path, "
                         "or copy the file again if it was cut short.") from None


def _last_line(e: BaseException) -> str:
    """The line of torch's message that says what went wrong (it ends with advice)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Check the doc")]
    return lines[-1][:200] if lines else type(e).__name__


def _plain(value, src):
    """`value` with numpy arrays and scalars turned into tensors and Python numbers; anything
    else that is not a tensor or a plain value is refused by name."""
    if isinstance(value, np.generic):  # before float: np.float64 is one
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, (torch.Tensor, str, bytes, int, float, bool, type(None))):
        return value
    if isinstance(value, dict):
        return {k: _plain(v, src) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, src) for v in value)
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    raise UnsafeFileError(f"{src} holds a {kind}, which has no safe form (tensors, numbers, strings, "
                          "lists, tuples and dicts have); nothing was written.")


def convert(src, dst) -> None:
    """Loads `src` with the full unpickler (the caller vouches for it) and writes to `dst` the
    same content with numpy values as tensors and numbers, so that load_file reads it."""
    blob = _plain(torch.load(src, map_location="cpu", weights_only=False), src)
    tmp = Path(f"{dst}.tmp")
    torch.save(blob, tmp)
    try:
        load_file(tmp)  # the proof: it now loads without the full unpickler
    except ValueError:
        tmp.unlink()
        raise
    tmp.replace(dst)


def save_weights(path, model: nn.Module, cfg: ModelConfig) -> None:
    sd = {k: v.detach().cpu() for k, v in _unwrapped_state_dict(model.state_dict()).items()}
    torch.save({"format": FORMAT, "model_config": asdict(cfg), "model": sd}, path)


def load_weights(path) -> tuple[ModelConfig, dict]:
    """Reads a weights file or a full training checkpoint (any dict with "model_config" and
    "model"); returns (config, state_dict) on the CPU."""
    try:
        blob = load_file(path)
    except UnsafeFileError:
        raise
    except ValueError as e:
        raise ValueError(f"{path}: not an esm-speedrun weights file or checkpoint ({e})") from None
    if not isinstance(blob, dict) or "model_config" not in blob or "model" not in blob:
        raise ValueError(
            f"{path}: not an esm-speedrun weights file or checkpoint (no 'model_config' and "
            "'model' entries); for Hugging Face weights use `python -m hub import`."
        )
    return ModelConfig.from_dict(dict(blob["model_config"])), _unwrapped_state_dict(blob["model"])


def _describe(shapes: dict) -> str:
    """A model's shape in words, read from its parameter names and shapes."""
    emb = shapes.get("embed.weight")
    layers = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    d = f"d_model {emb[1]}" if emb is not None else "unknown width"
    return f"{layers} layers x {d}"


def load_state_dict_checked(model: nn.Module, sd: dict) -> None:
    """Strict load whose error names both shapes instead of torch's list of tensors."""
    model.load_state_dict(check_state_dict(model, sd), strict=True)


def check_state_dict(model: nn.Module, sd: dict) -> dict:
    """`sd` without wrapper prefixes, after checking that it has exactly the model's names and
    (global) shapes; otherwise a ValueError naming the first difference."""
    sd = _unwrapped_state_dict(sd)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    wrong = [k for k in want if k in have and want[k] != have[k]]
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if wrong or missing or unexpected:
        detail = (
            f"'{wrong[0]}' is {have[wrong[0]]} in the checkpoint but {want[wrong[0]]} in the model"
            if wrong
            else f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
        raise ValueError(
            f"checkpoint ({_describe(have)}) does not fit the model ({_describe(want)}): {detail}; "
            "build the model from the checkpoint's own config (model.io.load_weights)."
        )
    return sd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.io", description="Rewrite a .pt file that "
                                 "needs Python's full unpickler as one that loads safely.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="OLD (trusted) -> NEW, loadable with weights_only=True")
    conv.add_argument("old")
    conv.add_argument("new")
    conv.add_argument("--trust-this-file", action="store_true",
                      help="required: loading OLD runs any code it holds; say you trust its source")
    args = ap.parse_args(argv)
    if not args.trust_this_file:
        print(f"python -m model.io convert: loading {args.old} can run code hidden in it; pass "
              "--trust-this-file only if you trust where it came from.", file=sys.stderr)
        return 2
    if Path(args.new).exists():
        print(f"python -m model.io convert: {args.new} exists; pass a new path.", file=sys.stderr)
        return 2
    try:
        convert(args.old, args.new)
    except (ValueError, OSError, RuntimeError, pickle.UnpicklingError) as e:
        print(f"python -m model.io convert: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.new}; it loads without running code")
    return 0


if __name__ == "__main__":
    sys.exit(main())
