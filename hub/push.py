"""python -m hub push: export a checkpoint with its model card and upload it (token from HF_TOKEN)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from hub.card import gather, model_card
from hub.files import export_hf
from training.checkpoint import weights_file

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
    source = weights_file(checkpoint)
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
