"""Prompt-cache files (`gemma_mlx.prompt_cache`, `python -m gemma_mlx.cache_prompt`): generation
from a saved prompt equals a fresh run over the whole prompt (dense and E-style models, the three
dtypes a Mac computes in); a file of another model, a truncated file, a damaged header or damaged
data each give one clear error (exit 2 from the command line); an interrupted write leaves the
old file intact."""

from __future__ import annotations

import json
import struct

import mlx.core as mx
import pytest
from speculative_helpers import random_target
from tiny_chat_model import write_model

from gemma_mlx import cli
from gemma_mlx.cache import KVQuantization, QuantizedKVCache, quantize_caches
from gemma_mlx.decode import prefill
from gemma_mlx.errors import OptionError
from gemma_mlx.generate import stream_generate
from gemma_mlx.loading import load
from gemma_mlx.outputs import FAULT_ENV, Terminated
from gemma_mlx.prompt_cache import (
    PromptCache,
    PromptCacheError,
    cache_prompt,
    load_prompt_cache,
    save_prompt_cache,
)

PROMPT = [2, *range(40, 80)]  # 41 tokens: past the sliding window of 8
CACHED = 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model directory (sliding window 8) and its loaded (model, tokenizer)."""
    path = write_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)
    return path, load(path)


def greedy(model, tokenizer, prompt, cache=None, n=12, **options) -> list[int]:
    steps = stream_generate(model, tokenizer, prompt, max_tokens=n, prompt_cache=cache, **options)
    return [r.token for r in steps]


@pytest.mark.parametrize("variant", ["gemma3", "e2b"])
def test_saved_prompt_continues_like_a_fresh_run(tiny, tmp_path, variant, dtype):
    tokenizer = tiny[1][1]
    model = random_target(variant, window=8, dtype=dtype)
    path = tmp_path / "prompt.safetensors"
    save_prompt_cache(path, cache_prompt(model, PROMPT[:CACHED], prefill_step_size=7), model)

    loaded = load_prompt_cache(path, model)
    assert loaded.tokens == PROMPT[:CACHED]
    assert [type(c) for c in loaded] == [type(c) for c in model.make_cache()]
    first = greedy(model, tokenizer, PROMPT[CACHED:], loaded)
    assert first == greedy(model, tokenizer, PROMPT)

    # The cache and its tokens moved on together: a second continuation also equals a fresh run.
    held = list(loaded.tokens)
    assert held == (PROMPT + first)[: len(held)] and loaded[0].offset == len(held)
    assert greedy(model, tokenizer, [100, 101], loaded, n=6) == greedy(
        model, tokenizer, [*held, 100, 101], n=6
    )


def test_quantized_caches_round_trip(tiny, tmp_path):
    """Every cache kind is saved from its state and meta state: 8-bit KV caches come back
    bitwise, and continue exactly as a fresh run with the same quantization."""
    tokenizer = tiny[1][1]
    model = random_target("e2b", window=8)  # full layers: head size 32
    quantized = {"kv_bits": 8, "kv_group_size": 32}
    caches = quantize_caches(model.make_cache(), KVQuantization(8, 32))
    prefill(model, caches, PROMPT[:CACHED], 16)
    path = tmp_path / "q.safetensors"
    save_prompt_cache(path, PromptCache(caches, PROMPT[:CACHED]), model)
    loaded = load_prompt_cache(path, model)
    assert any(isinstance(c, QuantizedKVCache) for c in loaded)
    for got, want in zip(loaded, caches, strict=True):
        assert type(got) is type(want) and got.meta_state == want.meta_state
        assert all(mx.array_equal(a, b) for a, b in zip(got.state, want.state, strict=True))
    assert greedy(model, tokenizer, PROMPT[CACHED:], loaded, **quantized) == greedy(
        model, tokenizer, PROMPT, **quantized
    )


@pytest.mark.real_model
def test_real_model_round_trip(tmp_path):
    """The built-in 270M: the saved prompt continues exactly as the whole prompt does."""
    from gemma_mlx.hub import load as load_builtin

    model, tokenizer = load_builtin(None)
    head = tokenizer.encode("The history of the Roman Empire spans many centuries. It began")
    tail = tokenizer.encode(" with Augustus, who", add_special_tokens=False)
    path = tmp_path / "p.safetensors"
    save_prompt_cache(path, cache_prompt(model, head), model)
    loaded = load_prompt_cache(path, model)
    assert greedy(model, tokenizer, " with Augustus, who", loaded, n=4) == greedy(
        model, tokenizer, head + tail, n=4
    )


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    _, (model, _) = tiny
    path = tmp_path_factory.mktemp("saved") / "prompt.safetensors"
    save_prompt_cache(path, cache_prompt(model, PROMPT[:CACHED]), model)
    return path


def header_and_data(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), 8 + length, data


def damaged_copies(saved, directory) -> dict[str, tuple]:
    """name -> (file, the error's words): truncated, a damaged header, flipped data."""
    header, start, data = header_and_data(saved)
    truncated = directory / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    bad_header = directory / "header.safetensors"
    bad_header.write_bytes(data[:8] + b"{not json" + data[17:])
    begin, end = header["cache.0.0"]["data_offsets"]
    flipped = bytearray(data)
    flipped[start + (begin + end) // 2] ^= 0x10
    flipped_file = directory / "flipped.safetensors"
    flipped_file.write_bytes(bytes(flipped))
    return {
        "truncated": (truncated, "cannot be read as a prompt cache"),
        "header": (bad_header, "cannot be read as a prompt cache"),
        "flipped": (flipped_file, r"damaged \(its checksum does not match"),
    }


def test_bad_files_are_refused_by_name(tiny, saved, tmp_path):
    _, (model, _) = tiny
    for file, words in damaged_copies(saved, tmp_path).values():
        with pytest.raises(PromptCacheError, match=words) as caught:
            load_prompt_cache(file, model)
        assert str(file) in str(caught.value)
    other = load(write_model(tmp_path / "other", seed=1))[0]  # same shapes, other weights
    with pytest.raises(PromptCacheError, match=r"different model \(same shapes, other weights\)"):
        load_prompt_cache(saved, other)


def test_command_line_round_trip_and_errors(tiny, tmp_path, capsys):
    path, (model, tokenizer) = tiny
    file = tmp_path / "cli.safetensors"
    head, tail = "hello there how are", " you today"
    assert (
        cli.run_cache_prompt(["--model", str(path), "-p", head, "--prompt-cache-file", str(file)])
        == 0
    )
    capsys.readouterr()
    args = ["--model", str(path), "-m", "6", "--prompt-cache-file", str(file), "-p", tail]
    assert cli.run(args) == 0
    out = capsys.readouterr().out
    ids = tokenizer.encode(head) + tokenizer.encode(tail, add_special_tokens=False)
    expected = "".join(r.text for r in stream_generate(model, tokenizer, ids, max_tokens=6))
    assert out == expected + "\n"

    # The file is never replaced without --force; foreign and damaged files: one line, exit 2.
    again = ["--model", str(path), "-p", head, "--prompt-cache-file", str(file)]
    assert cli.run_cache_prompt(again) == 2
    assert "already exists" in capsys.readouterr().err
    other = write_model(tmp_path / "other", seed=1)
    cases = {name: file for name, (file, _) in damaged_copies(file, tmp_path).items()}
    for name, bad in [*cases.items(), ("other model", file)]:
        model_dir = other if name == "other model" else path
        argv = ["--model", str(model_dir), "--prompt-cache-file", str(bad), "-p", tail]
        assert cli.run(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(bad) in err, (name, err)


def test_interrupted_write_leaves_the_old_file(tiny, saved, tmp_path, monkeypatch):
    _, (model, _) = tiny
    file = tmp_path / "kept.safetensors"
    file.write_bytes(saved.read_bytes())
    monkeypatch.setenv(FAULT_ENV, "commit=TERM")  # after writing, before the rename
    with pytest.raises(Terminated):
        save_prompt_cache(file, cache_prompt(model, [2, 50, 51]), model, force=True)
    assert file.read_bytes() == saved.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["kept.safetensors"]
    assert load_prompt_cache(file, model).tokens == PROMPT[:CACHED]


def test_misuse_is_named(tiny, saved):
    _, (model, tokenizer) = tiny
    loaded = load_prompt_cache(saved, model)
    with pytest.raises(OptionError, match="messages"):
        greedy(model, tokenizer, [{"role": "user", "content": "hi"}], loaded)
    with pytest.raises(OptionError, match="PromptCache"):
        save_prompt_cache(saved.parent / "x.safetensors", model.make_cache(), model)
    assert isinstance(loaded, PromptCache) and mx.array(loaded[0].state[0]).size
