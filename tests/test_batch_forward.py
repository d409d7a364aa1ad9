"""The batched forward pass (`model.batched`, `gemma_mlx.ragged`) against each sequence alone.

For every variant (dense 31B-like, E2B/E4B-like with per-layer inputs and KV sharing, 12B-like,
26B-A4B-like MoE, Gemma 3) with a 16-token sliding window: one sequence through the batched pass
is bit-for-bit the plain forward pass; several sequences at different positions (prefill chunks,
decode rows, verify rows, past the window) give each sequence's logits to within BLAS rounding
(the weight products see more rows: a one-row product runs as sgemv, 2-8 rows through the
few-row kernel, more as sgemm, which sum in different orders) and the same argmax, and leave its
caches equal to its caches alone.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from speculative_helpers import random_target

from gemma_mlx.ragged import RaggedBatch, Segment

WINDOW = 16
VARIANTS = ["31b", "e2b", "e4b", "12b", "26b-a4b", "gemma3"]


@pytest.fixture(scope="module", params=VARIANTS)
def model(request):
    return random_target(request.param, window=WINDOW)


def tokens(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(5, 500, n).tolist()


def test_one_sequence_is_bitwise_the_plain_pass(model):
    ids = tokens(61, 0)
    solo, batched = model.make_cache(), model.make_cache()
    position = 0
    for n in (13, 1, 1, 6, 1, 20, 4, 1, 14):  # chunks, decode steps and verifies; past the window
        chunk = ids[position : position + n]
        position += n
        expected = model(mx.array([chunk]), solo)[0]
        got = model.batched(mx.array(chunk), [Segment(batched, n, n)])
        assert mx.array_equal(got, expected).item(), f"differs at position {position}"


def test_prefill_rows_are_skipped_like_logits_to_keep_zero(model):
    """keep=0 writes the caches as `model(..., logits_to_keep=0)` does (KV-shared layers skip)."""
    ids = tokens(30, 1)
    solo, batched = model.make_cache(), model.make_cache()
    model(mx.array([ids]), solo, logits_to_keep=0)
    assert model.batched(mx.array(ids), [Segment(batched, 30, 0)]).shape == (
        0,
        model.args.vocab_size,
    )
    for a, b in zip(solo, batched, strict=True):
        assert a.offset == b.offset == 30
        for x, y in zip(a.state, b.state, strict=True):
            assert mx.array_equal(x, y).item()


def test_ragged_batch_matches_each_sequence_alone(model):
    """Four sequences at different positions, in three passes: a mixed pass (a prefill chunk
    with no logits, a decode row, a verify of 4 rows, a prefill chunk keeping its last 2), then
    two decode-only passes. The second sequence is past the window throughout."""
    histories = [tokens(5, 2), tokens(40, 3), tokens(9, 4), tokens(1, 5)]
    passes = [
        [(12, 0), (1, 1), (4, 4), (7, 2)],
        [(1, 1), (1, 1), (3, 3), (2, 2)],
        [(1, 1), (1, 1), (1, 1), (1, 1)],
    ]
    rng = np.random.default_rng(6)
    solo = [model.make_cache() for _ in histories]
    batched = [model.make_cache() for _ in histories]
    for cache_s, cache_b, history in zip(solo, batched, histories, strict=True):
        model(mx.array([history]), cache_s)
        model.batched(mx.array(history), [Segment(cache_b, len(history), 0)])
    for feeds in passes:
        new = [rng.integers(5, 500, n).tolist() for n, _ in feeds]
        segments = [Segment(c, n, keep) for c, (n, keep) in zip(batched, feeds, strict=True)]
        got = model.batched(mx.array([t for seq in new for t in seq]), segments)
        row = 0
        for cache, seq, (n, keep) in zip(solo, new, feeds, strict=True):
            expected = model(mx.array([seq]), cache)[0, n - keep :]
            if keep:
                np.testing.assert_allclose(got[row : row + keep], expected, atol=2e-4, rtol=1e-4)
                assert mx.array_equal(mx.argmax(got[row : row + keep], -1), mx.argmax(expected, -1))
            row += keep
        assert row == got.shape[0]
    for cs, cb in zip(solo, batched, strict=True):
        for a, b in zip(cs, cb, strict=True):
            assert a.offset == b.offset
            for x, y in zip(a.state, b.state, strict=True):
                np.testing.assert_allclose(x, y, atol=2e-4, rtol=1e-4)


def test_per_sequence_trim_after_a_shared_verify(model):
    """Two sequences verify 5 rows each in one pass, then keep different numbers of them: each
    trims only its own caches, and the next pass equals a run that never saw the rejects."""
    a, b = tokens(20, 7), tokens(33, 8)
    caches = [model.make_cache(max_trim=8) for _ in range(2)]
    for cache, history in zip(caches, (a, b), strict=True):
        model.batched(mx.array(history), [Segment(cache, len(history), 0)])
    verify = [tokens(5, 9), tokens(5, 10)]
    model.batched(mx.array(verify[0] + verify[1]), [Segment(c, 5, 5) for c in caches])
    kept = (1, 4)
    for cache, n in zip(caches, kept, strict=True):
        for c in cache:
            c.trim(5 - n)
    after = [tokens(2, 11), tokens(2, 12)]
    got = model.batched(mx.array(after[0] + after[1]), [Segment(c, 2, 2) for c in caches])
    for i, (history, n) in enumerate(zip((a, b), kept, strict=True)):
        reference = model.make_cache()
        full = history + verify[i][:n] + after[i]
        expected = model(mx.array([full]), reference)[0, -2:]
        np.testing.assert_allclose(got[2 * i : 2 * i + 2], expected, atol=2e-4, rtol=1e-4)


def test_layout_rows_positions_and_masks():
    class Cache:
        def __init__(self, offset):
            self.offset = offset

    segments = [Segment([Cache(3)], 4, 0), Segment([Cache(30)], 1, 1), Segment([Cache(0)], 3, 2)]
    layout = RaggedBatch.of(segments, {"sliding": 2, "full": None})
    assert layout.rows == [(0, 4), (4, 5), (5, 8)]
    assert layout.positions.tolist() == [3, 4, 5, 6, 30, 0, 1, 2]
    assert layout.masks["full"] == ["causal", None, "causal"]
    kept = layout.kept()
    assert kept.rows == [(0, 0), (0, 1), (1, 3)]
    assert kept.positions.tolist() == [30, 1, 2]
    assert layout.kept_rows().tolist() == [4, 6, 7]
    # The kept queries of the third segment (positions 1, 2) see keys 0..2, lower-right aligned.
    assert kept.masks["full"][2] == "causal"
    # Queries 3..6 of the first, window 2, over the keys its cache returns (from position 2).
    assert layout.masks["sliding"][0].tolist() == [
        [True, True, False, False, False],
        [False, True, True, False, False],
        [False, False, True, True, False],
        [False, False, False, True, True],
    ]


@pytest.mark.parametrize("length, keep", [(0, 0), (2, 3), (2, -1)])
def test_bad_segment(length, keep):
    with pytest.raises(ValueError, match="segment"):
        Segment([], length, keep)


@pytest.mark.parametrize("variant", ["31b", "e2b"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_batch_is_bitwise_each_alone(variant, dtype):
    """MLX's CPU half-precision products compute each row on its own: in bfloat16 and float16
    a ragged batch is bit for bit each sequence alone, also where sequences attend stacked. (The MoE variant's expert products have no
    half-precision CPU kernel in MLX, alone or batched.)"""
    model = random_target(variant, window=WINDOW)
    model.set_dtype(getattr(mx, dtype))
    # The 1st and 5th, and the 2nd and 4th, have the same shapes: they attend stacked.
    histories = [tokens(5, 13), tokens(40, 14), tokens(9, 15), tokens(40, 19), tokens(5, 20)]
    new = [tokens(1, 16), tokens(1, 17), tokens(3, 18), tokens(1, 21), tokens(1, 22)]
    solo = [model.make_cache() for _ in histories]
    batched = [model.make_cache() for _ in histories]
    for cache_s, cache_b, history in zip(solo, batched, histories, strict=True):
        model(mx.array([history]), cache_s)
        model(mx.array([history]), cache_b)
    segments = [Segment(c, len(n), len(n)) for c, n in zip(batched, new, strict=True)]
    got = model.batched(mx.array([t for n in new for t in n]), segments)
    expected = mx.concatenate([model(mx.array([n]), c)[0] for c, n in zip(solo, new, strict=True)])
    assert got.dtype == getattr(mx, dtype)
    assert mx.array_equal(got, expected).item()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_stacked_attention_is_each_segment_alone(dtype):
    """`RaggedBatch.attention` puts segments with the same shapes and mask in one call: each
    segment's output is bit for bit its call alone, in row order (a group that is not
    contiguous in the rows, a multi-row group, a window mask that keeps its segment alone, a
    segment with no kept rows)."""

    class Cache:
        def __init__(self, offset):
            self.offset = offset

    feeds = [(20, 1, 1), (20, 1, 1), (7, 3, 3), (20, 1, 1), (7, 3, 3), (7, 3, 0), (2, 5, 5)]
    segments = [Segment([Cache(offset)], n, keep) for offset, n, keep in feeds]
    layout = RaggedBatch.of(segments, {"sliding": 4, "full": None}).kept()
    heads, kv_heads, D = 4, 2, 32
    rng = np.random.default_rng(23)

    def normal(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(getattr(mx, dtype))

    q = normal(layout.n_rows, heads, 1, D)
    calls = []  # the batch size of each attention call

    def attend(q, k, v, mask):
        calls.append(q.shape[0])
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)

    for layer_type in ("full", "sliding"):
        kvs = [
            tuple(normal(1, kv_heads, offset + n - max(0, offset - 3), D) for _ in "kv")
            if layer_type == "sliding"
            else tuple(normal(1, kv_heads, offset + n, D) for _ in "kv")
            for offset, n, _ in feeds
        ]
        calls.clear()
        got = layout.attention(q, kvs, layer_type, attend)
        alone = []
        for i, (first, last) in enumerate(layout.rows):
            if first < last:
                qi = q[first:last].transpose(2, 1, 0, 3)
                out = attend(qi, *kvs[i], layout.masks[layer_type][i])
                alone.append(out.transpose(0, 2, 1, 3).reshape(last - first, -1))
        expected = mx.concatenate(alone)
        stacked = calls[: len(calls) - len(alone)]
        assert sorted(stacked) == ([1, 2, 3] if layer_type == "full" else [1, 1, 1, 3])
        assert got.shape == expected.shape
        assert mx.array_equal(got, expected).item(), layer_type
        # KV-shared layers read one owner's keys and values: stacked once, then reused, and
        # never mistaken for other keys and values.
        reused = layout.attention(q, kvs, layer_type, attend, reused=True)
        assert mx.array_equal(reused, expected).item()
        other = [(k + 1, v) for k, v in kvs]
        got = layout.attention(q, other, layer_type, attend, reused=True)
        assert not mx.array_equal(got, reused).item()
        assert mx.array_equal(got, layout.attention(q, other, layer_type, attend)).item()
