"""KV-cache quantization: attention over packed keys/values, the cache's exactness under any
chunking and rollback, saving, option checks, and greedy speculative decoding over a quantized
cache (dense, E-style and MoE tiny models), which must equal plain greedy with the same cache."""

from __future__ import annotations

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
from gemma_mlx.kernels.quantized_attention import QuantizedKV, dequantized_attention
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
    _, (k, v) = _filled(KVQuantization(8, 64, start), keys, values, [positions])
    assert isinstance(k, QuantizedKV) and k.shape == keys.shape
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


def test_prefix_only_cache_returns_plain_arrays():
    """Below `start` nothing is quantized: the model computes exactly as without quantization."""
    keys, values = _kv((1, 2, 10, 64), mx.float32, 2)
    cache, (k, v) = _filled(KVQuantization(8, 64, 10), keys, values, [4, 10])
    assert isinstance(k, mx.array) and mx.array_equal(k, keys) and mx.array_equal(v, values)
    cache.update_and_fetch(*_kv((1, 2, 1, 64), mx.float32, 3))
    assert isinstance(cache.fetch()[0], QuantizedKV)


@pytest.mark.parametrize("start", [0, 37])
@pytest.mark.parametrize("bits", [8, 4])
def test_chunking_and_trim_are_exact(start, bits):
    """The stored bits do not depend on chunking, and a trim restores the earlier state bitwise,
    across the dense/quantized boundary and the buffer's growth steps."""
    q = KVQuantization(bits, 32, start)
    keys, values = _kv((1, 2, 600, 64), mx.bfloat16, 3)
    one, _ = _filled(q, keys, values, [600])
    many, _ = _filled(q, keys, values, [1, 2, 40, 41, 255, 256, 257, 400, 600])
    assert len(one.state) == len(many.state) == (8 if start else 6)
    for a, b in zip(one.state, many.state, strict=True):
        assert mx.array_equal(a, b)
    # Roll back 300 positions (past the boundary when start > 0 is not reached: 600 - 300 > 37),
    # then 290 more (into the dense prefix), then feed the same positions again.
    assert many.trim(300) == 300 and many.trim(290) == 290 and many.offset == 10
    other_k, other_v = _kv((1, 2, 10, 64), mx.bfloat16, 4)
    short, _ = _filled(q, keys, values, [10])
    for a, b in zip(short.state, many.state, strict=True):
        assert mx.array_equal(a, b)
    many.update_and_fetch(other_k, other_v)  # different tokens in the trimmed slots
    many.trim(10)
    many.update_and_fetch(keys[..., 10:, :], values[..., 10:, :])
    for a, b in zip(one.state, many.state, strict=True):
        assert mx.array_equal(a, b)


@pytest.mark.parametrize("start", [0, 5, 50])
def test_state_round_trip_and_conversion(start):
    """`state`/`meta_state` restore an equal cache; converting a filled KVCache gives the same
    bits as quantizing while filling; nbytes counts the packed bytes."""
    q = KVQuantization(4, 64, start)
    keys, values = _kv((1, 1, 20, 128), mx.float32, 5)
    cache, _ = _filled(q, keys, values, [3, 20])
    restored = QuantizedKVCache(KVQuantization(8, 32))
    restored.state = tuple(mx.array(a) for a in cache.state)
    restored.meta_state = cache.meta_state
    assert restored.offset == 20 and restored.quantization == q
    dense = KVCache()
    dense.update_and_fetch(keys, values)
    caches = quantize_caches([dense, RotatingKVCache(8)], q)
    assert isinstance(caches[1], RotatingKVCache)
    for other in (restored, caches[0]):
        for a, b in zip(cache.state, other.state, strict=True):
            assert mx.array_equal(a, b)
        assert mx.array_equal(attention_of(cache), attention_of(other))
    quantized = 20 - min(start, 20)
    # 4 bits: 64 bytes per 128-value row, plus a float32 scale and bias per 64 values.
    packed = 2 * quantized * (64 + 2 * 2 * 4)
    assert cache.nbytes == packed + 2 * min(start, 20) * 128 * 4
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
