"""`kv_bits` through the API: stream_generate, chat sessions (save/load), batching (batch ==
solo, the KV budget counts packed bytes), the server's prefix cache, and the CLI's errors."""

from __future__ import annotations

import mlx.core as mx
import pytest
from batch_helpers import byte_tokenizer, random_prompts, solo_tokens
from speculative_helpers import random_target
from tiny_chat_model import write_model

from gemma_mlx.batching.memory import sequence_kv_bytes
from gemma_mlx.batching.scheduler import BatchScheduler
from gemma_mlx.cache import KVQuantization, QuantizedKVCache, quantize_caches
from gemma_mlx.chat import ChatSession
from gemma_mlx.cli import run
from gemma_mlx.errors import OptionError
from gemma_mlx.generate import stream_generate
from gemma_mlx.loading import load
from gemma_mlx.server.prefix_cache import PrefixCache

QUANTIZATION = KVQuantization(4, 32, 9)
KV = {"kv_bits": 4, "kv_group_size": 32, "quantized_kv_start": 9}  # the same, as options


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("kv") / "model"
    return directory, *load(write_model(directory, head_dim=32))


def outputs(responses) -> tuple[list[int], mx.array]:
    """The tokens and the stacked log-probabilities of a generation."""
    responses = list(responses)
    return [r.token for r in responses], mx.stack([r.logprobs for r in responses])


def test_stream_generate_quantizes_a_given_cache(chat_model):
    _, model, tokenizer = chat_model
    fresh = outputs(stream_generate(model, tokenizer, "the cat sat", 12, **KV))
    plain = outputs(stream_generate(model, tokenizer, "the cat sat", 12))
    assert not mx.allclose(fresh[1], plain[1], atol=1e-4)  # 4-bit keys move the distribution
    ids = tokenizer.encode("the cat sat")
    cache = model.make_cache()
    model(mx.array([ids[:3]]), cache)  # a plain cache holding the prompt's first tokens
    again = outputs(stream_generate(model, tokenizer, ids, 12, prompt_cache=cache, **KV))
    assert any(isinstance(c, QuantizedKVCache) for c in cache)
    # Converted below `start`: what a fresh run holds (up to the prefill's chunking).
    assert again[0] == fresh[0] and mx.allclose(again[1], fresh[1], atol=1e-4)
    with pytest.raises(OptionError, match="quantized with"):
        next(stream_generate(model, tokenizer, "x", 1, prompt_cache=cache, kv_bits=8))
    with pytest.raises(OptionError, match="kv_bits must be one of"):
        next(stream_generate(model, tokenizer, "x", 1, kv_bits=2))


def test_chat_session_saves_and_loads_a_quantized_cache(chat_model, tmp_path):
    _, model, tokenizer = chat_model
    session = ChatSession(model, tokenizer, max_tokens=6, **KV)
    session.send("hello there")
    assert any(isinstance(c, QuantizedKVCache) and c.offset > 9 for c in session.cache)
    session.save(tmp_path / "s.safetensors")
    restored = ChatSession.load(tmp_path / "s.safetensors", model, tokenizer, max_tokens=6, **KV)
    assert restored.tokens == session.tokens
    assert session.send("and the dog?") == restored.send("and the dog?")


def test_cli_kv_options(chat_model, capsys):
    directory = str(chat_model[0])
    assert run(["--model", directory, "-p", "hi", "-m", "3", "--kv-bits", "8",
                "--kv-group-size", "32"]) == 0  # fmt: skip
    for bad in (["--kv-bits", "3"], ["--kv-group-size", "48"], ["--quantized-kv-start", "-1"]):
        capsys.readouterr()
        try:
            status = run(["--model", directory, "-p", "hi", *bad])
        except SystemExit as e:  # argparse's own errors
            status = e.code
        err = capsys.readouterr().err
        assert status == 2 and bad[0] in err and len(err.strip().splitlines()) == 1


def test_prefix_cache_round_trip_keeps_the_quantized_state():
    model = random_target("e2b")
    prefix = PrefixCache(lambda: quantize_caches(model.make_cache(), QUANTIZATION), 2**30)
    cache = prefix.make_cache()
    tokens = list(range(3, 40))
    model(mx.array([tokens]), cache)
    prefix.store(tokens, cache)
    restored, n = prefix.fetch([*tokens[:30], 7, 8])
    assert n == 30
    for a, b in zip(restored, cache, strict=True):
        b.trim(b.offset - 30)
        assert type(a) is type(b)
        for x, y in zip(a.state, b.state, strict=True):
            assert mx.array_equal(x, y)


@pytest.mark.parametrize("variant", ["e2b", "31b"])
def test_batch_equals_solo_and_budget_counts_packed_bytes(variant, tmp_path):
    tokenizer = byte_tokenizer(tmp_path / "bytes", 512)
    model = random_target(variant, window=16)
    prompts = random_prompts(5, (10, 40), 512, seed=2)
    references = [solo_tokens(model, tokenizer, p, 8, **KV) for p in prompts]
    scheduler = BatchScheduler(model, tokenizer, prefill_step_size=16, kv_budget=2**30)
    uids = [scheduler.submit(p, 8, **KV) for p in prompts]
    got = {uid: [] for uid in uids}
    while scheduler.has_work:
        for uid, response in scheduler.step():
            got[uid].append(response.token)
    assert [got[u] for u in uids] == references
    plain = sequence_kv_bytes(model, 400, 32, 16)
    packed = sequence_kv_bytes(model, 400, 32, 16, QUANTIZATION)
    assert packed < plain
    cache = quantize_caches(model.make_cache(), QUANTIZATION)
    model(mx.array([list(range(5, 405))]), cache)
    assert sum(c.nbytes for c in cache) <= packed
