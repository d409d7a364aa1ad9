"""`--model REPO` / `REPO:FILE` for a Hugging Face GGUF repo: the model GGUF and its mmproj (the
towers) come from huggingface_hub's cache or are downloaded, and are converted together once.

The hub cannot be reached here: a fake local hub cache (huggingface_hub's own layout, read by
huggingface_hub itself offline) and a stand-in for the online listing and download."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants as constants
import pytest
from tiny_chat_model import write_model

from gemma_mlx import hub
from gemma_mlx.hub import ModelNotFoundError, pick_gguf_files, resolve_model

REPO = "google/gemma-tiny-it-qat-q4_0-gguf"


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Our model cache and an empty, offline huggingface_hub cache."""
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    hf = tmp_path / "hf"
    hf.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "cache", hf


@pytest.fixture
def converter(monkeypatch):
    """Stands in for the GGUF converter (tested on its own): records what it was given."""
    calls = []

    def convert_gguf(src, out, progress=True, mmproj=None):
        calls.append((Path(src).read_bytes(), None if mmproj is None else mmproj.read_bytes()))
        write_model(out)

    monkeypatch.setattr("gemma_mlx.convert.convert_gguf", convert_gguf, raising=False)
    return calls


def cached_repo(hf: Path, repo: str, files: dict[str, bytes]) -> Path:
    """A snapshot of `repo` in huggingface_hub's cache layout."""
    folder = hf / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("c" * 40)
    return snapshot


def test_gguf_repo_from_the_local_hub_cache(caches, converter):
    _, hf = caches
    cached_repo(hf, REPO, {"gemma-tiny-q4_0.gguf": b"model", "mmproj-model-f16.gguf": b"towers"})
    first = resolve_model(REPO)
    assert (first / "config.json").is_file()
    assert converter == [(b"model", b"towers")]
    assert resolve_model(REPO) == first  # converted once
    assert resolve_model(f"{REPO}:gemma-tiny-q4_0.gguf") == first
    assert len(converter) == 1


def test_a_repo_with_several_models_needs_a_file(caches, converter):
    _, hf = caches
    files = {"tiny-q4_0.gguf": b"q4", "tiny-q8_0.gguf": b"q8", "mmproj-BF16.gguf": b"bf16",
             "mmproj-F16.gguf": b"f16"}  # fmt: skip
    cached_repo(hf, REPO, files)
    with pytest.raises(ModelNotFoundError, match=rf"holds 2 model GGUF files .*{REPO}:FILE"):
        resolve_model(REPO)
    resolve_model(f"{REPO}:tiny-q8_0.gguf")
    assert converter == [(b"q8", b"bf16")]  # the bf16 projector: exact for bf16 towers
    with pytest.raises(ModelNotFoundError, match="cannot download"):  # not cached: offline
        resolve_model(f"{REPO}:nope.gguf")


def test_gguf_repo_downloaded_when_not_cached(caches, converter, monkeypatch, tmp_path):
    remote = {"gemma-tiny-q4_0.gguf": b"model", "mmproj-F32.gguf": b"f32",
              "mmproj-model-f16.gguf": b"f16", "README.md": b"hi"}  # fmt: skip
    fetched = []

    def list_repo_files(self, repo_id, **kwargs):
        assert repo_id == REPO
        return list(remote)

    def hf_hub_download(repo_id, filename, **kwargs):
        fetched.append(filename)
        path = tmp_path / "downloads" / filename
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(remote[filename])
        return str(path)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    resolve_model(REPO)
    assert fetched == ["gemma-tiny-q4_0.gguf", "mmproj-F32.gguf"]
    assert converter == [(b"model", b"f32")]
    with pytest.raises(ModelNotFoundError, match=r"has no file nope.gguf \(its GGUF files: "):
        resolve_model(f"{REPO}:nope.gguf")


def test_gguf_repo_offline_and_not_cached(caches, converter):
    with pytest.raises(ModelNotFoundError, match=rf"cannot download '{REPO}'.*offline"):
        resolve_model(REPO)
    assert converter == []


def test_a_gguf_repo_without_mmproj_converts_the_model_alone(caches, converter):
    _, hf = caches
    snapshot = cached_repo(hf, REPO, {"gemma-tiny-q4_0.gguf": b"model"})
    resolve_model(REPO)
    assert converter == [(b"model", None)]
    # An mmproj that appears later is another conversion (the cache key holds it).
    shutil.copy(snapshot / "gemma-tiny-q4_0.gguf", snapshot / "mmproj-f16.gguf")
    resolve_model(REPO)
    assert converter[-1] == (b"model", b"model")


def test_pick_gguf_files():
    names = ["a/model.gguf", "mmproj-f16.gguf", "MMPROJ-F32.gguf"]
    assert pick_gguf_files(REPO, names, None) == ("a/model.gguf", "MMPROJ-F32.gguf")
    assert pick_gguf_files(REPO, ["m.gguf"], None) == ("m.gguf", None)
    with pytest.raises(ModelNotFoundError, match="holds 0 model GGUF files"):
        pick_gguf_files(REPO, ["mmproj.gguf"], None)


def test_gguf_repo_with_mmproj_converts_into_the_multimodal_model(caches, tmp_path):
    """The real converter on a repo's model GGUF and mmproj: one cache entry, with the towers."""
    from gguf import GGMLQuantizationType
    from gguf_reference import write_gguf
    from mmproj_reference import write_mmproj
    from multimodal_chat_model import MEDIA_TOKENS
    from multimodal_reference import VARIANTS, save_reference

    from gemma_mlx.models.gemma4_multimodal import Model

    _, hf = caches
    torch_model = save_reference(VARIANTS["e2b"](), tmp_path / "src")
    write_gguf(torch_model, tmp_path / "m.gguf", GGMLQuantizationType.Q8_0, special=MEDIA_TOKENS)
    write_mmproj(torch_model, tmp_path / "mmproj.gguf")
    files = {"tiny-q8_0.gguf": (tmp_path / "m.gguf").read_bytes(),
             "mmproj-tiny-f16.gguf": (tmp_path / "mmproj.gguf").read_bytes()}  # fmt: skip
    cached_repo(hf, REPO, files)
    directory = resolve_model(REPO)
    assert resolve_model(REPO) == directory  # converted once
    model, _ = hub.load(REPO)
    assert isinstance(model, Model) and model.media_args.audio is not None
