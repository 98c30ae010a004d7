"""Atomic file writes: every file staged as a temporary file beside its target, fsynced, then renamed.

A crash leaves the old file or the new one, never half of one; a save killed
outright leaves temporary files that the next save in that directory removes.
`atomic_write_tree` does the same for a whole save (every adapter's files, in
several folders) with a journal: the directory holds the old save or the new
one, never a mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
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
    if metadata and len(metadata) > 1:  # safetensors orders metadata at random: sort it, same bytes every save
        size = int.from_bytes(data[:8], "little")
        header = data[8:8 + size].decode("utf-8")
        shuffled = json.dumps(json.loads(header)["__metadata__"], separators=(",", ":"))
        ordered = json.dumps(dict(sorted(metadata.items())), separators=(",", ":"))
        if len(shuffled) == len(ordered) and shuffled in header:
            data = data[:8] + header.replace(shuffled, ordered, 1).encode("utf-8") + data[8 + size:]
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


# ---- several files in several directories, all at once ---------------------------------------------
JOURNAL_PREFIX = ".peftlite-save."


def atomic_write_tree(root: Path, plan: list[tuple[Path, dict[str, Callable[[str], None]]]]) -> None:
    """Write files in `root` and its subfolders so that the tree changes all at once, or not at all.

    Every file is staged beside its target and fsynced (out of disk: nothing has
    changed). Then a journal listing every (staged, target) pair is renamed into
    `root`: that rename is the commit. Then each staged file is renamed over its
    target and the journal removed. Killed before the commit, the old files stand
    (staged ones are removed later); killed after it, the next save or load in
    `root` finishes the renames (`finish_interrupted`).
    """
    finish_interrupted(root)
    tag = f"{os.getpid()}.{uuid.uuid4().hex}"
    staged: list[tuple[Path, Path]] = []
    journal = root / f"{JOURNAL_PREFIX}{tag}.journal"
    pending = root / f"{JOURNAL_PREFIX}journal.{tag}.staged"
    committed = False
    try:
        for directory, writers in plan:
            _remove_orphans(directory, list(writers))
            for name, write in writers.items():
                staged.append((directory / f".{name}.{tag}.staged", directory / name))
                write(str(staged[-1][0]))
                _fsync(staged[-1][0])
        entries = [[os.path.relpath(tmp, root), os.path.relpath(target, root)] for tmp, target in staged]
        text_writer(json.dumps(entries))(str(pending))
        _fsync(pending)
        os.replace(pending, journal)
        committed = True
        _roll_forward(root, journal)
    finally:
        if not committed and not journal.exists():
            for path in [pending, *(tmp for tmp, _ in staged)]:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)


def finish_interrupted(root: str | os.PathLike) -> None:
    """Complete every committed save in `root` that was interrupted; remove files staged by dead saves.

    Safe beside a save still running: staged names are unique, so a rename done twice is done once.
    OSError when the directory cannot be written (an interrupted save there cannot be finished).
    """
    root = Path(root)
    if not root.is_dir():
        return
    directories = [root, *(Path(e.path) for e in os.scandir(root) if e.is_dir(follow_symlinks=False))]
    for directory in directories:  # every journal first: a subfolder may be the root of its own save
        for entry in os.scandir(directory):
            if entry.name.startswith(JOURNAL_PREFIX) and entry.name.endswith(".journal"):
                _roll_forward(directory, Path(entry.path))
    for directory in directories:
        for entry in os.scandir(directory):
            if entry.name.endswith(".staged") and not _alive(entry.name.rsplit(".", 3)[-3]):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(entry.path)


def _roll_forward(root: Path, journal: Path) -> None:
    try:
        with open(journal, encoding="utf-8") as f:
            entries = json.load(f)
    except FileNotFoundError:  # finished meanwhile by its own save
        return
    for tmp, target in entries:
        with contextlib.suppress(FileNotFoundError):
            os.replace(root / tmp, root / target)
    with contextlib.suppress(FileNotFoundError):
        os.remove(journal)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _alive(pid: str) -> bool:
    """Whether process `pid` may still be running (anything unreadable counts as alive)."""
    if os.name != "posix" or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def staging_directory(parent: str, prefix: str) -> str:
    """A new hidden directory `<prefix><pid>-XXXX` in `parent`; those of dead processes are removed first.

    For a whole directory written aside and then renamed into place (a merged model):
    a run killed outright leaves its directory behind, and the next run clears it.
    """
    for entry in os.scandir(parent):
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False) and not _alive(pid):
            shutil.rmtree(entry.path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
