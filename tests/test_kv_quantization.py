"""KV-cache quantization: attention over packed keys/values, the cache's exactness under any
chunking and rollback, saving, option checks, and greedy speculative decoding over a quantized
cache (dense, E-style and MoE tiny models), which must equal plain greedy with the same cache."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from speculative_helpers import PartlyRightDrafter, random_assistant, random_target

from gemma_mlx.cache import (
    KVCache,
    KVQuantization,
    QuantizedKVCache,
    RotatingKVCache,
    attention_mask,
    kv_quantization,
    quantize_caches,
)
from gemma_mlx.drafters import AssistantDrafter, PromptLookupDrafter
from gemma_mlx.errors import GemmaMLXError, OptionError, OptionTypeError
from gemma_mlx.kernels.attention import attention
from gemma_mlx.kernels.quantized_attention import QuantizedKeys, dequantized_attention
from gemma_mlx.speculative import SpeculationStats, speculative_tokens

DTYPES = [mx.float32, mx.bfloat16, mx.float16]


def _kv(shape, dtype, seed):
    k1, k2 = mx.random.split(mx.random.key(seed))
    return mx.random.normal(shape, key=k1).astype(dtype), mx.random.normal(shape, key=k2).astype(
        dtype
    )


def _filled(quantization, keys, values, chunks):
    cache = QuantizedKVCache(quantization)
    out, start = None, 0
    for end in chunks:
        out = cache.update_and_fetch(keys[..., start:end, :], values[..., start:end, :])
        start = end
    return cache, out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "head_dim, positions, queries, start, mask",
    [
        (512, 700, 1, 0, None),  # a Gemma 4 full layer decoding one token
        (256, 300, 5, 0, "causal"),  # a verify / prefill chunk
        (256, 300, 5, 120, "causal"),  # with a dense prefix
        (256, 300, 4, 0, "window"),  # a boolean mask (windowed or multimodal)
    ],
)
def test_attention_matches_dequantized_reference(dtype, head_dim, positions, queries, start, mask):
    """Quantized matmuls on the packed cache = MLX's attention over the dequantized cache, within
    what MLX's own attention in that dtype loses against float32 (plus a float32 margin)."""
    keys, values = _kv((1, 2, positions, head_dim), dtype, 0)
    cache, _ = _filled(KVQuantization(8, 64, start), keys, values, [positions])
    k, v = cache.fetch()
    assert isinstance(k, QuantizedKeys) and k.shape == keys.shape
    assert k.blocks is not None and k.tail is not None  # every part of the layout in play
    q = mx.random.normal((1, 8, queries, head_dim), key=mx.random.key(1)).astype(dtype)
    if mask == "window":
        mask = attention_mask(positions - queries, positions, 0, 64)
    scale = head_dim**-0.5
    got = attention(q, k, v, scale, mask).astype(mx.float32)
    want = dequantized_attention(q, k, v, scale, mask).astype(mx.float32)
    dense = [x.astype(dtype) for x in (k.dequantized(), v.dequantized())]
    mlx_own = mx.fast.scaled_dot_product_attention(q, *dense, scale=scale, mask=mask)
    allowed = 2 * mx.abs(mlx_own.astype(mx.float32) - want).max().item() + 1e-5
    assert mx.abs(got - want).max().item() <= allowed


def test_a_chunk_attends_as_its_queries_would_one_at_a_time():
    """Queries of one chunk that arrive before and after a key block is completed see it as they
    would alone: chunked attention equals token-by-token attention up to float32 rounding (the
    products' row counts differ), where seeing the block quantized would differ by far more."""
    q = KVQuantization(8, 32, 20)
    keys, values = _kv((1, 2, 200, 64), mx.float32, 7)
    queries = mx.random.normal((1, 4, 200, 64), key=mx.random.key(8))
    one = QuantizedKVCache(q, max_trim=9)
    alone = []
    for i in range(200):
        kv = one.update_and_fetch(keys[..., i : i + 1, :], values[..., i : i + 1, :])
        alone.append(attention(queries[:, :, i : i + 1], *kv, 0.125, None))
    chunked, start, split = QuantizedKVCache(q, max_trim=9), 0, 0
    for end in (20, 25, 34, 40, 41, 70, 101, 133, 140, 200):  # across block ends
        k, v = chunked.update_and_fetch(keys[..., start:end, :], values[..., start:end, :])
        got = attention(
            queries[:, :, start:end], k, v, 0.125, "causal" if end - start > 1 else None
        )
        want = mx.concatenate(alone[start:end], axis=2)
        assert mx.abs(got - want).max().item() < 1e-6, (start, end)
        if isinstance(k, QuantizedKeys) and len(set(k.seen)) > 1:  # seeing every block quantized
            split += 1
            one_view = dataclasses.replace(k, seen=())
            wrong = attention(queries[:, :, start:end], one_view, v, 0.125, "causal")
            assert mx.abs(wrong - want).max().item() > 1e-4
        start = end
    assert split >= 3


def test_prefix_only_cache_returns_plain_arrays():
    """Below `start` nothing is quantized: the model computes exactly as without quantization."""
    keys, values = _kv((1, 2, 10, 64), mx.float32, 2)
    cache, (k, v) = _filled(KVQuantization(8, 64, 10), keys, values, [4, 10])
    assert isinstance(k, mx.array) and mx.array_equal(k, keys) and mx.array_equal(v, values)
    cache.update_and_fetch(*_kv((1, 2, 1, 64), mx.float32, 3))
    assert isinstance(cache.fetch()[0], QuantizedKeys)


@pytest.mark.parametrize("start", [0, 37])
@pytest.mark.parametrize("bits", [8, 4])
def test_chunking_and_trim_are_exact(start, bits):
    """The stored bits do not depend on chunking, and a trim of up to `max_trim_kept` positions
    restores the earlier state bitwise, across the dense/quantized boundary, key blocks being
    completed and the buffers' growth steps; a deeper trim stops at the quantized key blocks."""
    q = KVQuantization(bits, 32, start)
    keys, values = _kv((1, 2, 600, 64), mx.bfloat16, 3)
    one, _ = _filled(q, keys, values, [600])
    many, _ = _filled(q, keys, values, [1, 2, 40, 41, 255, 256, 257, 400, 600])
    assert len(one.state) == len(many.state) == (9 if start else 7)
    for a, b in zip(one.state, many.state, strict=True):
        assert mx.array_equal(a, b)
    other_k, other_v = _kv((1, 2, 600, 64), mx.bfloat16, 4)
    rolled = QuantizedKVCache(q, max_trim=9)
    for end in range(5, 600, 5):  # a verify of 5 drafts + 4 extra, rejected, then 5 accepted
        rolled.update_and_fetch(
            other_k[..., end - 5 : end + 4, :], other_v[..., end - 5 : end + 4, :]
        )
        assert rolled.trim(9) == 9
        rolled.update_and_fetch(keys[..., end - 5 : end, :], values[..., end - 5 : end, :])
    rolled.update_and_fetch(keys[..., 595:, :], values[..., 595:, :])
    reference = QuantizedKVCache(q, max_trim=9)
    reference.update_and_fetch(keys, values)
    for a, b in zip(reference.state, rolled.state, strict=True):
        assert mx.array_equal(a, b)
    # Whole blocks are quantized; keys of the newest `max_trim_kept` (32) positions and the rest
    # of their block stay as computed too, and a trim stops where they start.
    kept = one.max_trim
    assert 32 <= kept < 64 and one.tail_start == 600 - start - kept
    assert one.blocked == (600 - start) // 32 * 32
    assert one.trim(100) == kept and one.max_trim == 0 and one.trim(1) == 0
    short, _ = _filled(q, keys, values, [30])
    assert short.trim(30) == 30 and short.offset == 0  # nothing quantized yet: any depth


@pytest.mark.parametrize("start", [0, 5, 50])
def test_state_round_trip_and_conversion(start):
    """`state`/`meta_state` restore an equal cache; converting a filled KVCache gives the same
    bits as quantizing while filling; nbytes counts the packed bytes."""
    q = KVQuantization(4, 64, start)
    keys, values = _kv((1, 1, 150, 128), mx.float32, 5)
    cache, _ = _filled(q, keys, values, [3, 150])
    restored = QuantizedKVCache(KVQuantization(8, 32))
    restored.state = tuple(mx.array(a) for a in cache.state)
    restored.meta_state = cache.meta_state
    assert restored.offset == 150 and restored.quantization == q
    blocked = (150 - start) // 64 * 64
    assert restored.blocked == cache.blocked == blocked and restored.max_trim_kept == 32
    assert restored.tail_start == cache.tail_start == 64
    dense = KVCache()
    dense.update_and_fetch(keys, values)
    caches = quantize_caches([dense, RotatingKVCache(8)], q)
    assert isinstance(caches[1], RotatingKVCache)
    for other in (restored, caches[0]):
        for a, b in zip(cache.state, other.state, strict=True):
            assert mx.array_equal(a, b)
        assert mx.array_equal(attention_of(cache), attention_of(other))
    quantized = 150 - start
    # Values at 4 bits: 64 bytes per 128-value row, plus a float32 scale and bias per 64 values;
    # keys: whole blocks of 64 positions at 4 bits with a float32 scale and bias per channel,
    # and from position 64 on (the newest 32 and the rest of their block) float32 as well.
    values_bytes = quantized * (64 + 2 * 2 * 4)
    keys_bytes = blocked * 128 // 2 + blocked // 64 * 128 * 2 * 4 + (quantized - 64) * 128 * 4
    assert cache.nbytes == values_bytes + keys_bytes + 2 * start * 128 * 4
    with pytest.raises(OptionError, match="quantized with"):
        quantize_caches(caches, KVQuantization(8, 64, start))


def attention_of(cache):
    q = mx.random.normal((1, 2, 1, 128), key=mx.random.key(9))
    return attention(q, *cache.fetch(), 1.0, None)


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"kv_bits": 3}, OptionError, "kv_bits must be one of"),
        ({"kv_bits": "8"}, OptionTypeError, "kv_bits must be an integer"),
        ({"kv_bits": 8, "kv_group_size": 48}, OptionError, "kv_group_size must be one of"),
        ({"kv_bits": 8, "quantized_kv_start": -1}, OptionError, "quantized_kv_start must be >= 0"),
        ({"kv_bits": None, "kv_group_size": 1.5}, OptionTypeError, "kv_group_size"),
    ],
)
def test_option_errors(options, error, match):
    with pytest.raises(error, match=match):
        kv_quantization(**options)


def test_group_size_must_divide_head_size():
    cache = QuantizedKVCache(KVQuantization(8, 128))
    with pytest.raises(GemmaMLXError, match=r"kv_group_size 128 does not divide .* 64"):
        cache.update_and_fetch(*_kv((1, 1, 2, 64), mx.float32, 6))


LENGTH = 160
KV = KVQuantization(4, 32, 50)  # 4-bit: the largest change to the logits; crossed mid-run


def plain_greedy(model, prompt, cache):
    """Reference: one token per forward pass, no trimming."""
    logits = model(mx.array([prompt]), cache)[0, -1]
    out = []
    for _ in range(LENGTH):
        out.append(int(mx.argmax(logits)))
        logits = model(mx.array([[out[-1]]]), cache)[0, -1]
    return out


@pytest.mark.parametrize("variant", ["31b", "e2b", "26b-a4b"])
def test_speculative_greedy_equals_plain_greedy(variant):
    """Rollbacks of every length (0..k drafts kept) over a quantized cache crossing `start`:
    the tokens equal plain greedy decoding with the same quantized cache."""
    target = random_target(variant)
    prompt = np.random.default_rng(0).integers(1, target.args.vocab_size, 30).tolist()
    expected = plain_greedy(target, prompt, quantize_caches(target.make_cache(), KV))
    unquantized = plain_greedy(target, prompt, target.make_cache())
    assert expected != unquantized, "quantization changed nothing: a weak test"
    for drafter, k in (
        (PartlyRightDrafter(AssistantDrafter(random_assistant(target), target), 30, expected), 4),
        (PromptLookupDrafter(), "auto"),
    ):
        stats = SpeculationStats()
        cache = quantize_caches(target.make_cache(max_trim=8), KV)
        steps = speculative_tokens(
            target, prompt, cache, drafter, num_draft=k, max_tokens=LENGTH, stats=stats
        )
        assert [s.token for s in steps] == expected
        assert isinstance(cache[-1], QuantizedKVCache) and cache[-1].offset >= LENGTH
