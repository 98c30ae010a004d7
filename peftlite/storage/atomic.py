"""Atomic file writes: every file staged as a temporary file beside its target, fsynced, then renamed.

A crash leaves the old file or the new one, never half of one; a save killed
outright leaves temporary files that the next save in that directory removes.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import save as safetensors_bytes
from torch import Tensor


def prepare_directory(save_directory: str | os.PathLike, create: bool = True) -> Path:
    if not isinstance(save_directory, (str, os.PathLike)) or not str(save_directory):
        raise ValueError(f"save_directory={save_directory!r} is invalid: expected a directory path")
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_directory {str(directory)!r} is a file: expected a directory")
    if create:
        directory.mkdir(parents=True, exist_ok=True)
    return directory


def write_safetensors(tensors: dict[str, Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file at `path` ourselves.

    Not `safetensors.torch.save_file`: it stages its own `.tmpXXXXXX` file
    beside the target, which a killed save would leave behind under a name
    `atomic_write_all` cannot recognise as its own.
    """
    data = safetensors_bytes(tensors, metadata=metadata)
    with open(path, "wb") as f:
        f.write(data)


def text_writer(text: str) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return write


def atomic_write_all(directory: Path, writers: dict[str, Callable[[str], None]]) -> None:
    """Write every file to a temporary file in `directory`, fsync, then rename each over its target.

    If any writer fails, every temporary file is removed and no target has
    changed. The renames come last, one after another, each atomic.
    """
    _remove_orphans(directory, list(writers))
    staged: dict[str, str] = {}
    try:
        for name, write in writers.items():
            # Not mkstemp: the writer creates the file, so it gets the usual permissions (umask).
            tmp = str(directory / f".{name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
            staged[name] = tmp
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for name, tmp in staged.items():
            os.replace(tmp, directory / name)
    finally:
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def _remove_orphans(directory: Path, names: list[str]) -> None:
    """Delete temporary files left by a save that was killed outright (SIGKILL, power loss).

    Only files named as `atomic_write_all` names them, for these targets, whose
    writing process no longer exists; a save still running elsewhere is left alone.
    """
    if os.name != "posix":  # os.kill(pid, 0) probes a process only on POSIX
        return
    for name in names:
        prefix = f".{name}."
        for entry in os.scandir(directory):
            pid = entry.name[len(prefix):].split(".", 1)[0]
            if entry.name.startswith(prefix) and entry.name.endswith(".tmp") and pid.isdigit():
                try:
                    os.kill(int(pid), 0)
                except ProcessLookupError:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(entry.path)
                except OSError:  # alive but not ours (PermissionError): leave it
                    pass
