"""The Hub side: reading from a huggingface_hub cache offline, and pushing through HfApi.

The cache is laid out as huggingface_hub lays it out
(models--org--name/{blobs, refs/main, refs/<tag>, snapshots/<sha>/...}) in
tmp_path, and read with HF_HUB_OFFLINE=1, so no test touches the network.
Pushing runs the real HfApi client over an intercepted HTTP transport and
checks what would have been uploaded.

    .venv/bin/pytest tests/test_hub.py -x -q
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.utils import _http
from safetensors.torch import load
from tiny_models import tiny_llama, token_batch

from peftlite import LoraConfig, LoraModel, get_lora_model

warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(1)  # tiny models: extra threads only contend on a shared CPU

REPO = "org/adapters"
MAIN_SHA = "a" * 40
TAG_SHA = "b" * 40


def adapter_files(directory: Path, seed: int, prefix: str = "", r: int = 4) -> dict[str, bytes]:
    """Save a tiny Llama adapter and return its files as {path in repo: bytes}."""
    torch.manual_seed(seed)
    model = get_lora_model(tiny_llama(), LoraConfig(r=r, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    model.save_pretrained(directory)
    return {prefix + p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def add_commit(cache: Path, repo_id: str, sha: str, files: dict[str, bytes], refs: list[str]) -> None:
    """One commit in huggingface_hub's cache layout: content-addressed blobs, symlinked snapshot, refs."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for path_in_repo, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / sha / path_in_repo
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(sha)


def logits(model):
    with torch.no_grad():
        return model(token_batch()).logits


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A cache holding REPO: main = adapter 0 at the root + adapter 1 in `sub/`; tag v1 = adapter 2."""
    tmp = tmp_path_factory.mktemp("hub")
    main = {**adapter_files(tmp / "a0", 0), **adapter_files(tmp / "a1", 1, prefix="sub/", r=2)}
    add_commit(tmp / "cache", REPO, MAIN_SHA, main, ["main"])
    add_commit(tmp / "cache", REPO, TAG_SHA, adapter_files(tmp / "a2", 2), ["v1"])
    expected = {name: logits(LoraModel.from_pretrained(tiny_llama(), str(tmp / name))) for name in ("a0", "a1", "a2")}
    return tmp / "cache", expected


@pytest.fixture
def offline(monkeypatch, hub_cache):
    """HF_HUB_OFFLINE=1 with HF_HUB_CACHE at the test cache (constants are read at import, so patch them too)."""
    cache, _ = hub_cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("kwargs,expected", [
    ({}, "a0"),
    ({"revision": "main"}, "a0"),
    ({"revision": "v1"}, "a2"),
    ({"revision": TAG_SHA}, "a2"),
    ({"subfolder": "sub"}, "a1"),
])
def test_offline_from_cache(offline, hub_cache, kwargs, expected):
    model = LoraModel.from_pretrained(tiny_llama(), REPO, **kwargs)
    torch.testing.assert_close(logits(model), hub_cache[1][expected], atol=1e-6, rtol=0)


def test_cache_dir_and_local_files_only_without_offline_mode(tmp_path, hub_cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    model = LoraModel.from_pretrained(tiny_llama(), REPO, cache_dir=str(hub_cache[0]), local_files_only=True,
                                      subfolder="sub")
    torch.testing.assert_close(logits(model), hub_cache[1]["a1"], atol=1e-6, rtol=0)
    model.load_adapter(REPO, "tagged", revision="v1", cache_dir=str(hub_cache[0]), local_files_only=True)
    model.set_adapter("tagged")
    torch.testing.assert_close(logits(model), hub_cache[1]["a2"], atol=1e-6, rtol=0)


def test_config_from_the_hub_cache(offline):
    assert LoraConfig.from_pretrained(REPO, subfolder="sub").r == 2
    assert LoraConfig.from_pretrained(REPO).r == 4


@pytest.mark.parametrize("repo,kwargs", [
    ("org/not-cached", {}), (REPO, {"revision": "v2"}), (REPO, {"subfolder": "nope"}),
])
def test_offline_missing_raises_file_not_found_and_changes_nothing(offline, repo, kwargs):
    base = tiny_llama()
    before = {name: p.clone() for name, p in base.named_parameters()}
    with pytest.raises(FileNotFoundError, match=repo):
        LoraModel.from_pretrained(base, repo, **kwargs)
    assert all(torch.equal(p, before[name]) for name, p in base.named_parameters())
    assert len(before) == len(dict(base.named_parameters()))


def test_hf_hub_offline_environment_variable_in_a_fresh_process(hub_cache, tmp_path):
    """The real switch: HF_HUB_OFFLINE=1 and HF_HUB_CACHE set before huggingface_hub is imported."""
    cache, expected = hub_cache
    torch.save(expected["a1"], tmp_path / "expected.pt")
    script = (
        "import sys, torch; sys.path.insert(0, 'tests'); torch.set_num_threads(1)\n"
        "from tiny_models import tiny_llama, token_batch\n"
        "from peftlite import LoraModel\n"
        f"model = LoraModel.from_pretrained(tiny_llama(), {REPO!r}, subfolder='sub')\n"
        "with torch.no_grad(): out = model(token_batch()).logits\n"
        f"torch.testing.assert_close(out, torch.load({str(tmp_path / 'expected.pt')!r}), atol=1e-6, rtol=0)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


# ---- push -----------------------------------------------------------------------------------------
class FakeHub:
    """An HTTP transport standing in for huggingface.co: records requests, answers like the Hub."""

    def __init__(self) -> None:
        self.requests: list[httpx2.Request] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/api/repos/create":
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{REPO}", "name": REPO})
        if "/branch/" in path:
            return httpx2.Response(200, json={})
        if path == "/api/validate-yaml":  # create_commit has the Hub check a README's front matter
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if "/commit/" in path:
            return httpx2.Response(200, json={"commitUrl": f"https://huggingface.co/{REPO}/commit/{MAIN_SHA}",
                                              "commitOid": MAIN_SHA, "pullRequestUrl": None})
        return httpx2.Response(404, json={"error": f"unexpected {request.method} {path}"})

    def posted(self, fragment: str) -> list[httpx2.Request]:
        return [r for r in self.requests if r.method == "POST" and fragment in r.url.path]

    def uploaded(self) -> dict[str, bytes]:
        """{path in repo: content} from the single commit's NDJSON payload."""
        (commit,) = self.posted("/commit/")
        lines = [json.loads(line) for line in commit.content.decode().splitlines()]
        return {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                for line in lines if line["key"] == "file"}


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    _http.close_session()
    yield hub
    _http.set_client_factory(_http.default_client_factory)
    _http.close_session()


def test_push_to_hub_uploads_one_commit(fake_hub, tmp_path):
    model = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.push_to_hub(REPO, private=True, token="hf_secret", commit_message="my adapter", revision="dev")

    (create,) = fake_hub.posted("/api/repos/create")
    (card,) = fake_hub.posted("/api/validate-yaml")
    assert "library_name: peft" in json.loads(card.content)["content"]
    assert json.loads(create.content) == {"name": "adapters", "organization": "org", "visibility": "private"}
    assert create.headers["authorization"] == "Bearer hf_secret"
    assert [r.url.path for r in fake_hub.posted("/branch/")] == [f"/api/models/{REPO}/branch/dev"]
    (commit,) = fake_hub.posted("/commit/")
    assert commit.url.path == f"/api/models/{REPO}/commit/dev"
    assert json.loads(commit.content.decode().splitlines()[0])["value"]["summary"] == "my adapter"

    files = fake_hub.uploaded()
    assert sorted(files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads(files["adapter_config.json"])["peft_type"] == "LORA"
    assert "library_name: peft" in files["README.md"].decode()
    weights = load(files["adapter_model.safetensors"])
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert torch.equal(weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
                       layer.factors("default")[0].detach())


def test_push_one_named_adapter_puts_it_at_the_root(fake_hub):
    model = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("extra", LoraConfig(r=2, target_modules=["v_proj"]))
    model.push_to_hub(REPO, adapter_name="extra")
    files = fake_hub.uploaded()
    assert sorted(files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads(files["adapter_config.json"])["r"] == 2

    fake_hub.requests.clear()
    model.push_to_hub(REPO)  # all adapters: laid out as save_pretrained lays them out
    assert sorted(fake_hub.uploaded()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                           "extra/README.md", "extra/adapter_config.json",
                                           "extra/adapter_model.safetensors"]


def test_push_unknown_adapter_or_bad_repo_id_uploads_nothing(fake_hub):
    model = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="'missing'"):
        model.push_to_hub(REPO, adapter_name="missing")
    with pytest.raises(ValueError, match="repo_id='not a/valid/repo id' is invalid"):
        model.push_to_hub("not a/valid/repo id")
    assert fake_hub.requests == []
