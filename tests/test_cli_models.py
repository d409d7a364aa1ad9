"""How `--model` / `load(path_or_repo)` finds a model: directories, .gguf files converted once into
the cache, Hugging Face repo ids from huggingface_hub's cache or a clear offline error."""

from __future__ import annotations

import errno
import os

import pytest
from tiny_chat_model import write_model

from gemma_mlx import hub
from gemma_mlx.hub import ModelNotFoundError, resolve_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_converter(monkeypatch):
    """Stands in for the GGUF converter; records its calls, can be told to fail half-way."""
    calls = []

    def convert_gguf(src, out, progress=True):
        calls.append(src)
        (out / "partial.bin").write_bytes(b"x")
        if src.read_bytes() == b"broken":
            raise ValueError("cannot convert")
        write_model(out)

    monkeypatch.setattr("gemma_mlx.convert.convert_gguf", convert_gguf, raising=False)
    return calls


def test_gguf_is_converted_once_and_reconverted_when_it_changes(tmp_path, cache, fake_converter):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"v1")
    first = resolve_model(gguf)
    assert first.parent == cache / "gguf" and (first / "config.json").is_file()
    assert resolve_model(str(gguf)) == first
    assert len(fake_converter) == 1
    gguf.write_bytes(b"v2 is longer")
    assert resolve_model(gguf) != first
    assert len(fake_converter) == 2


def test_failed_conversion_leaves_nothing_behind(tmp_path, cache, fake_converter):
    gguf = tmp_path / "bad.gguf"
    gguf.write_bytes(b"broken")
    with pytest.raises(ValueError, match="cannot convert"):
        resolve_model(gguf)
    assert os.listdir(cache / "gguf") == []


def test_repo_id_from_the_huggingface_cache_when_offline(tmp_path, monkeypatch):
    hf_cache = tmp_path / "hf"
    snapshot = hf_cache / "models--someone--tiny-it" / "snapshots" / ("a" * 40)
    write_model(snapshot)
    (hf_cache / "models--someone--tiny-it" / "refs").mkdir()
    (hf_cache / "models--someone--tiny-it" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("someone/tiny-it") == snapshot
    from gemma_mlx.tokenizer import load_tokenizer

    assert load_tokenizer(snapshot).instruction_tuned  # named -it in the hub cache

    with pytest.raises(ModelNotFoundError, match="offline") as error:
        resolve_model("someone/not-cached")
    assert "'someone/not-cached'" in str(error.value)


def test_directory_and_unknown_paths(tmp_path):
    assert resolve_model(tmp_path) == tmp_path
    with pytest.raises(ModelNotFoundError, match="no such model"):
        resolve_model(tmp_path / "nothing")


def test_full_disk_during_first_use_caching_is_one_line(tmp_path, cache, monkeypatch, capsys):
    """ENOSPC names no file: the command line names the step instead, on one line, exit 2."""
    from gemma_mlx.cli import run

    def convert_gguf(src, out, progress=True):
        (out / "model.safetensors").write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("gemma_mlx.convert.convert_gguf", convert_gguf, raising=False)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"v1")
    assert run(["--model", str(gguf), "-p", "hello"]) == 2
    assert capsys.readouterr().err == (
        f"gemma-mlx: error: preparing the model {gguf}: No space left on device\n"
    )
