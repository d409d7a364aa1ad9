"""A saved chat session belongs to one model's weights and is checked for damage: another model of
the same shapes (a base and an instruction-tuned checkpoint look alike) and flipped bits are
refused with a clear error, and saving is atomic and never replaces a file."""

from __future__ import annotations

import json
import struct

import mlx.core as mx
import pytest
from tiny_chat_model import write_model

from gemma_mlx.chat import ChatSession, SessionFileError
from gemma_mlx.errors import GemmaMLXError
from gemma_mlx.fingerprint import model_fingerprint
from gemma_mlx.loading import load


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two models of identical shapes and tokenizer, different weights (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("identity")
    return load(write_model(root / "base", seed=0)), load(write_model(root / "tuned", seed=1))


@pytest.fixture(scope="module")
def saved(models, tmp_path_factory):
    """A session file of the first model after one turn, and the session itself."""
    session = ChatSession(*models[0], max_tokens=5)
    session.send("hello there")
    path = tmp_path_factory.mktemp("saved") / "chat.safetensors"
    session.save(path)
    return path, session


def header_and_data(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), 8 + length, data


def test_same_shapes_other_weights_are_refused(models, saved):
    path, _ = saved
    (base, tokenizer), (tuned, _) = models
    assert ChatSession.load(path, base, tokenizer).tokens  # its own model takes it
    with pytest.raises(SessionFileError, match=r"different model \(same shapes, other weights\)"):
        ChatSession.load(path, tuned, tokenizer)


def test_flipped_bit_in_the_cache_is_refused(models, saved, tmp_path):
    path, _ = saved
    header, start, data = header_and_data(path)
    begin, end = header["cache.0.0"]["data_offsets"]
    damaged = bytearray(data)
    damaged[start + (begin + end) // 2] ^= 0x10
    copy = tmp_path / "flipped.safetensors"
    copy.write_bytes(bytes(damaged))
    with pytest.raises(SessionFileError, match=r"damaged \(its checksum does not match"):
        ChatSession.load(copy, *models[0])


@pytest.mark.parametrize("field", ["tokens", "messages", "weights"])
def test_edited_metadata_is_refused(models, saved, tmp_path, field):
    """The same length, so the file stays readable: only the checksum can tell."""
    path, _ = saved
    header, start, data = header_and_data(path)
    value = header["__metadata__"][field]
    header["__metadata__"][field] = value.replace("1", "2", 1) if "1" in value else value.upper()
    assert header["__metadata__"][field] != value
    encoded = json.dumps(header).encode()
    copy = tmp_path / "edited.safetensors"
    copy.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[start:])
    with pytest.raises(SessionFileError, match="checksum"):
        ChatSession.load(copy, *models[0])


def test_truncated_or_foreign_files_are_refused(models, saved, tmp_path):
    path, _ = saved
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SessionFileError, match=r"truncated\.safetensors"):
        ChatSession.load(truncated, *models[0])
    foreign = tmp_path / "weights.safetensors"
    mx.save_safetensors(str(foreign), {"a": mx.zeros(3)}, metadata={"format": "other"})
    with pytest.raises(SessionFileError, match="not a chat session saved by this version"):
        ChatSession.load(foreign, *models[0])


def test_saving_is_atomic_and_never_replaces(models, saved, tmp_path):
    _, session = saved
    existing = tmp_path / "mine.safetensors"
    existing.write_text("keep me")
    with pytest.raises(SessionFileError, match="already exists"):
        session.save(existing)
    assert existing.read_text() == "keep me"
    with pytest.raises(GemmaMLXError, match="no such directory"):
        session.save(tmp_path / "missing" / "chat.safetensors")
    plain = tmp_path / "chat.session"  # any name: not renamed to *.safetensors
    session.save(plain)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.session", "mine.safetensors"]
    assert ChatSession.load(plain, *models[0]).messages == session.messages


def test_fingerprint_follows_the_weights_not_the_compute_dtype(models, tmp_path):
    (base, _), (tuned, _) = models
    assert model_fingerprint(base) != model_fingerprint(tuned)
    directory = write_model(tmp_path / "again", seed=0)
    again, _ = load(directory, dtype="bfloat16")
    assert model_fingerprint(again) == model_fingerprint(base)  # same checkpoint, other dtype
    weights = mx.load(str(directory / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1e-3
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    assert model_fingerprint(load(directory)[0]) != model_fingerprint(base)


def test_models_built_without_load_get_a_fingerprint_once(models):
    """A model made in code (no `load`) is fingerprinted from its parameters, once."""
    (base, _), _ = models
    fresh = type(base)(base.args)
    fresh.update(base.parameters())
    first = model_fingerprint(fresh)
    assert fresh.weights_fingerprint == first and model_fingerprint(fresh) == first
