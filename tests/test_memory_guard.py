"""The memory guard: with the machine's memory faked small, loading and a long context are refused
before any work, with a message naming the sizes and the options; with real memory they pass. The
KV estimate is checked against what the caches really allocate."""

from __future__ import annotations

import re

import openai
import pytest
from server_helpers import serving
from tiny_chat_model import write_model

from gemma_mlx import cli, machine_memory
from gemma_mlx.cache import KVQuantization
from gemma_mlx.chat import ChatSession
from gemma_mlx.errors import ModelTooLargeError
from gemma_mlx.generate import stream_generate
from gemma_mlx.loading import load
from gemma_mlx.memory_guard import MemoryLimitError, check_context, context_bytes

GB_FIGURE = re.compile(r"\d+\.\d\d GB")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_model(tmp_path_factory.mktemp("guard") / "model", seed=0)
    return path, load(path)


def fake_memory(monkeypatch, available: int) -> None:
    monkeypatch.setattr(machine_memory, "available_memory", lambda: available)


def test_estimate_covers_what_the_caches_allocate(tiny):
    _, (model, tokenizer) = tiny
    prompt, max_tokens = [2, *range(10, 200)], 20  # well past the window of 8
    cache = model.make_cache()
    for _ in stream_generate(model, tokenizer, prompt, max_tokens, prompt_cache=cache):
        pass
    allocated = sum(c.keys.nbytes + c.values.nbytes for c in cache)
    kv, _ = context_bytes(model, len(prompt) + max_tokens, prefill_step_size=64)
    assert allocated <= kv <= 2 * allocated
    # Sliding layers hold at most their window: the estimate grows only by the full layer.
    longer, _ = context_bytes(model, 10 * (len(prompt) + max_tokens), prefill_step_size=64)
    full_width = 2 * model.args.num_key_value_heads * model.args.head_dim * 4  # one full layer
    assert longer - kv <= full_width * (9 * (len(prompt) + max_tokens) + 256)


def test_long_context_is_refused_with_the_sizes(tiny, monkeypatch):
    _, (model, tokenizer) = tiny
    prompt = [2, *range(10, 200)]
    kv, activations = context_bytes(model, len(prompt) + 50)
    fake_memory(monkeypatch, (kv + activations) // 2)
    with pytest.raises(MemoryLimitError) as caught:
        next(stream_generate(model, tokenizer, prompt, 50))
    message = str(caught.value)
    assert len(GB_FIGURE.findall(message)) >= 3
    assert f"{len(prompt) + 50} tokens" in message
    assert all(option in message for option in ("--kv-bits", "--max-kv-size", "smaller model"))
    session = ChatSession(model, tokenizer, max_tokens=50)
    fake_memory(monkeypatch, 1000)
    with pytest.raises(MemoryLimitError):
        session.send("hello")

    fake_memory(monkeypatch, 2 * (kv + activations))  # enough: it runs
    assert len(list(stream_generate(model, tokenizer, prompt, 50))) >= 1


def test_command_line_exits_2_naming_the_sizes(tiny, monkeypatch, capsys):
    path, _ = tiny
    fake_memory(monkeypatch, 1000)
    assert cli.run(["--model", str(path), "-p", "hello there", "-m", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "GB" in err and str(path) in err


def test_weights_that_do_not_fit_are_refused_before_loading(tiny, monkeypatch):
    path, (model, tokenizer) = tiny
    fake_memory(monkeypatch, 1000)
    with pytest.raises(ModelTooLargeError, match=r"weights need \d+\.\d\d GB .* can give 0\.00 GB"):
        load(path)
    # Loaded already, a small context still fits 1 MB of memory.
    fake_memory(monkeypatch, 10**6)
    assert len(list(stream_generate(model, tokenizer, [2, 10, 11], 3))) == 3


def test_a_quantized_kv_cache_is_counted_quantized(tmp_path, monkeypatch):
    path = write_model(
        tmp_path / "m", head_dim=64, query_pre_attn_scalar=64, max_position_embeddings=8192
    )
    model, tokenizer = load(path)
    total = 6000
    plain = sum(context_bytes(model, total))
    quantized = sum(context_bytes(model, total, quantization=KVQuantization(8)))
    assert quantized < plain
    fake_memory(monkeypatch, (plain + quantized) // 2)
    check_context(model, total, quantization=KVQuantization(8))  # fits
    with pytest.raises(MemoryLimitError):
        next(stream_generate(model, tokenizer, [2, 10, 11], total - 3))


def test_server_answers_400_for_a_context_the_memory_cannot_hold(tiny, monkeypatch):
    """The server's default KV budget is half the memory the machine can give: faked small, a
    long request is refused in the API's shape, naming the sizes, and the server stays up."""
    _, (model, tokenizer) = tiny
    fake_memory(monkeypatch, 8_000_000)  # a 4 MB budget: a short request fits, not a long one
    with serving(model, tokenizer, "--served-model-name", "m") as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match=r"\d+\.\d MiB.*kv_bits"):
            client.completions.create(model="m", prompt="hello " * 100, max_tokens=8)
        assert client.completions.create(model="m", prompt="hi", max_tokens=2).choices
