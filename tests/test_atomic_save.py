"""Saving never leaves a half-written adapter, and leaves no stray temporary files.

Each file is written to a hidden temporary file in the target directory, fsynced and renamed
over the target (weights first, then config, then model card). So at any instant every target
file is complete, either its old or its new version. Interrupted saves are tested for real:
a subprocess saving an adapter is killed (SIGKILL, which runs no cleanup; SIGINT, which does)
at fixed points — halfway through writing the weights, between two renames — and at random
moments; in-process, writes and renames are made to fail after the temporary file exists.
A SIGKILL cannot clean up after itself: its temporary file is removed by the next save.

Run: .venv/bin/pytest -q tests/test_atomic_save.py
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import peftlite.io.files as files
from peftlite import LoraConfig, LoraModel, get_lora_model

NAMES = ("adapter_model.safetensors", "adapter_config.json", "README.md")


def base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))


def adapter(seed: int) -> LoraModel:
    """Version `seed` of one adapter: same config every time, different weights (a ~0.5 MB file)."""
    model = base()
    torch.manual_seed(seed)
    return get_lora_model(model, LoraConfig(r=128, target_modules=["0", "1"], init_lora_weights=False))


# The child saves version 1 over a directory holding version 0. Its hooks, chosen by `stage`,
# stop it at a fixed point, print PAUSED and wait there to be killed.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (a `&` job)
    sys.path.insert(0, {tests!r})
    import peftlite.io.files as files
    from test_atomic_save import adapter
    directory, stage = sys.argv[1], sys.argv[2]
    model = adapter(1)

    def pause():
        print("PAUSED", flush=True)
        time.sleep(60)

    real_save, real_replace = files.write_safetensors, os.replace
    def half_written(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        pause()
    def replace_then_pause(src, dst):
        real_replace(src, dst)
        pause()
    if stage == "mid-write":
        files.write_safetensors = half_written
    elif stage == "between-renames":
        os.replace = replace_then_pause
    if stage == "loop":
        print("PAUSED", flush=True)
        while True:
            model.save_pretrained(directory)
    model.save_pretrained(directory)
""")


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """The exact bytes of each file for version 0 and version 1."""
    out = {}
    for seed in (0, 1):
        directory = tmp_path_factory.mktemp(f"v{seed}")
        adapter(seed).save_pretrained(directory)
        out[seed] = {name: (directory / name).read_bytes() for name in NAMES}
    assert out[0]["adapter_model.safetensors"] != out[1]["adapter_model.safetensors"]
    return out


def start_child(tmp_path: Path, directory: Path, stage: str) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    child = subprocess.Popen([sys.executable, str(script), str(directory), stage], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    line = child.stdout.readline()
    if line.strip() != "PAUSED":
        child.kill()
        raise AssertionError(f"child did not reach its pause: {line!r} {child.stderr.read()[-2000:]}")
    return child


def weights_version(directory: Path, versions) -> int:
    """Which version the weights hold; fails if any file is neither version (half-written or missing)."""
    for name in NAMES:
        data = (directory / name).read_bytes()
        assert any(v[name] == data for v in versions.values()), \
            f"{name} is neither the old nor the new version ({len(data)} bytes): half-written"
    data = (directory / NAMES[0]).read_bytes()
    return next(seed for seed, v in versions.items() if v[NAMES[0]] == data)


def temporaries(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name not in NAMES)


def saved_version_0(tmp_path: Path) -> Path:
    directory = tmp_path / "adapter"
    adapter(0).save_pretrained(directory)
    return directory


def test_sigkill_halfway_through_the_weights_leaves_the_old_adapter(tmp_path, versions):
    directory = saved_version_0(tmp_path)
    child = start_child(tmp_path, directory, "mid-write")
    half_written = temporaries(directory)
    assert len(half_written) == 1  # the half-written weights, under a hidden temporary name
    # Orphan removal takes only files of dead processes: a save running beside this one keeps its file.
    adapter(0).save_pretrained(directory)
    assert temporaries(directory) == half_written
    child.kill()
    child.wait()
    assert weights_version(directory, versions) == 0
    loaded = LoraModel.from_pretrained(base(), str(directory))  # and it loads
    x = torch.randn(3, 256)
    torch.testing.assert_close(loaded(x), adapter(0)(x), rtol=0, atol=0)
    # The orphaned temporary file is removed by the next save, which writes the new version.
    adapter(1).save_pretrained(directory)
    assert temporaries(directory) == []
    assert weights_version(directory, versions) == 1


def test_sigkill_between_renames_leaves_every_file_complete(tmp_path, versions):
    directory = saved_version_0(tmp_path)
    child = start_child(tmp_path, directory, "between-renames")
    child.kill()
    child.wait()
    # The first rename is the commit (a journal of the staged files); every file is still complete.
    assert weights_version(directory, versions) in (0, 1)
    assert temporaries(directory)
    LoraModel.from_pretrained(base(), str(directory))  # the load finishes the committed save
    assert weights_version(directory, versions) == 1 and temporaries(directory) == []
    adapter(1).save_pretrained(directory)
    assert temporaries(directory) == []


def test_ctrl_c_mid_write_cleans_up_and_leaves_the_old_adapter(tmp_path, versions):
    directory = saved_version_0(tmp_path)
    child = start_child(tmp_path, directory, "mid-write")
    child.send_signal(signal.SIGINT)  # KeyboardInterrupt: the save's cleanup runs
    child.wait(timeout=60)
    assert "KeyboardInterrupt" in child.stderr.read()
    assert weights_version(directory, versions) == 0
    assert temporaries(directory) == []


def test_sigkill_at_random_moments_never_leaves_a_half_written_file(tmp_path, versions):
    """A child saving in a loop is killed at random times; the next save always cleans up."""
    directory = saved_version_0(tmp_path)
    rng = random.Random(0)
    for _ in range(2):
        child = start_child(tmp_path, directory, "loop")
        time.sleep(rng.uniform(0.05, 0.5))
        child.kill()
        child.wait()
        weights_version(directory, versions)
        LoraModel.from_pretrained(base(), str(directory))
    adapter(0).save_pretrained(directory)
    assert temporaries(directory) == []


# ---- in-process failures after the temporary file exists ----------------------------------------
def failing(stage: str, monkeypatch):
    """Make the save fail at `stage`, after at least one temporary file has been written."""
    if stage == "fsync":
        def fsync(fd):
            raise OSError("I/O error on fsync")
        monkeypatch.setattr(files.os, "fsync", fsync)
    elif stage == "rename":
        def replace(src, dst):
            raise OSError("rename failed")
        monkeypatch.setattr(files.os, "replace", replace)
    elif stage == "config":  # the weights are staged, the config is written, then Ctrl-C
        real_text_writer = files.text_writer

        def text_writer(text):
            write = real_text_writer(text)

            def write_then_interrupt(path):
                write(path)
                raise KeyboardInterrupt  # not even an Exception: the cleanup must still run
            return write_then_interrupt
        monkeypatch.setattr(files, "text_writer", text_writer)


@pytest.mark.parametrize("stage,error", [("fsync", OSError), ("rename", OSError), ("config", KeyboardInterrupt)])
def test_a_failure_after_the_temporary_file_exists_changes_no_file(tmp_path, monkeypatch, versions, stage, error):
    directory = saved_version_0(tmp_path)
    model = adapter(1)
    failing(stage, monkeypatch)
    with pytest.raises(error):
        model.save_pretrained(directory)
    monkeypatch.undo()
    assert {name: (directory / name).read_bytes() for name in NAMES} == versions[0]
    assert temporaries(directory) == []


def test_config_save_is_atomic_too(tmp_path, monkeypatch):
    config = LoraConfig(r=4, target_modules=["q"])
    config.save_pretrained(tmp_path)
    old = (tmp_path / "adapter_config.json").read_bytes()

    def fsync(fd):
        raise OSError("I/O error on fsync")
    monkeypatch.setattr(files.os, "fsync", fsync)
    with pytest.raises(OSError):
        LoraConfig(r=8, target_modules=["q"]).save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").read_bytes() == old
    assert os.listdir(tmp_path) == ["adapter_config.json"]

