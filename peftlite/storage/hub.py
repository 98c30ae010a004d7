"""Where adapter files come from and go to: a local directory or a Hugging Face Hub repo.

Reading goes through `huggingface_hub.hf_hub_download`, so `revision`,
`subfolder`, `token`, `cache_dir`, `local_files_only` and `HF_HUB_OFFLINE=1`
behave as everywhere else in the HF stack (offline, files come from the
local cache, subfolders included). Writing goes through `HfApi`: create the
repo, then one commit with every file of the adapter directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError
from huggingface_hub.utils import validate_repo_id


def resolve(model_id_or_path: str | os.PathLike, filename: str, revision: str | None = None,
            subfolder: str | None = None, token: str | bool | None = None,
            cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> str:
    """The local path of `filename` from a directory, or from a Hub repo through the HF cache.

    Raises FileNotFoundError naming the directory or repo (and revision) when
    the file cannot be had: missing, unknown repo, or offline and not cached.
    """
    if not isinstance(model_id_or_path, (str, os.PathLike)) or not str(model_id_or_path):
        raise ValueError(f"model_id_or_path={model_id_or_path!r} is invalid: expected a directory or a Hub repo id")
    root = Path(model_id_or_path)
    if root.is_dir():
        path = root / subfolder / filename if subfolder else root / filename
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} does not exist: expected a saved adapter in {str(root)!r}")
        return str(path)
    repo_id = str(model_id_or_path)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise FileNotFoundError(f"{repo_id!r} is not a directory (nor a Hub repo id): expected a saved "
                                "adapter directory or 'org/name'") from None
    where = f"Hub repo {repo_id!r} (revision {revision or 'main'}{', subfolder ' + subfolder if subfolder else ''})"
    try:
        return hf_hub_download(repo_id, filename, subfolder=subfolder or None, revision=revision, token=token,
                               cache_dir=None if cache_dir is None else str(cache_dir),
                               local_files_only=local_files_only, library_name="peftlite")
    except (EntryNotFoundError, OSError) as err:  # missing file or repo, offline and not cached, HTTP errors
        raise FileNotFoundError(f"{filename} not found: no local directory {repo_id!r} and {where} "
                                f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                                ) from None


def push_directory(directory: str | os.PathLike, repo_id: str, private: bool | None = None,
                   token: str | None = None, commit_message: str | None = None, revision: str | None = None
                   ) -> Any:
    """Upload every file under `directory` to `repo_id` in one commit (creating repo and branch if needed)."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo_id={repo_id!r} is invalid: {err}") from None
    root = Path(directory)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{str(root)!r} has no files to push: expected a saved adapter directory")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(root).as_posix(), path_or_fileobj=str(p))
                  for p in files]
    return api.create_commit(repo_id, operations, commit_message=commit_message or "Upload LoRA adapter (peftlite)",
                             revision=revision)
