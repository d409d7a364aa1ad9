"""The batch's cache pool (`gemma_mlx.pooled_cache`) against each sequence alone.

For every variant with a 16-token sliding window (the rings wrap within the test): sequences of
different lengths decode through one batched pass over pooled caches, with a sequence on caches
of its own beside them, one leaving and joining again, one sitting a pass out; each row's
logits equal the sequence's logits alone to within float rounding (the pool's softmax runs over
a whole slot, masked positions weighing zero) with the same argmax, in float32, bfloat16 and
float16. The caches a sequence takes back hold what its own caches hold alone. The number of
operations of a pooled pass does not grow with the batch (one write and one attention per layer).
"""

from __future__ import annotations

import io
import re

import mlx.core as mx
import numpy as np
import pytest
from speculative_helpers import random_target

from gemma_mlx.cache import KVCache, RotatingKVCache, kv_quantization, quantize_caches
from gemma_mlx.pooled_cache import CachePool
from gemma_mlx.ragged import Segment

WINDOW = 16
VARIANTS = ["31b", "e2b", "12b", "26b-a4b", "gemma3"]
# Logits of a batch against alone: the weight products see more rows (BLAS rounding).
TOLERANCE = {"float32": 2e-4, "bfloat16": 0.1, "float16": 0.02}


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(5, 500, n).tolist() for n in lengths]


def prefilled(model, ids: list[int]) -> list:
    cache = model.make_cache()
    model(mx.array([ids[:-1]]), cache)
    return cache


def assert_rows_match(got: mx.array, expected: mx.array, dtype) -> None:
    tolerance = TOLERANCE[dtype]
    np.testing.assert_allclose(
        np.array(got.astype(mx.float32)),
        np.array(expected.astype(mx.float32)),
        atol=tolerance,
        rtol=tolerance,
    )
    # Half precision: a near-tie may flip, so only where the best logit leads clearly.
    top2 = mx.sort(expected.astype(mx.float32), axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tolerance
    same = mx.argmax(got, -1) == mx.argmax(expected, -1)
    assert mx.all(same | ~clear).item()


CASES = [(v, d) for v in VARIANTS for d in ("float32", "bfloat16", "float16")]


# MLX has no half-precision CPU kernel for the MoE variant's expert products.
@pytest.mark.parametrize(
    "variant,dtype", [(v, d) for v, d in CASES if v != "26b-a4b" or d == "float32"]
)
def test_pooled_decoding_matches_each_sequence_alone(variant, dtype):
    model = random_target(variant, window=WINDOW, dtype=dtype)
    ids = prompts([5, 23, 40, 2])
    solo = [prefilled(model, p) for p in ids]
    own = [prefilled(model, p) for p in ids]
    pool = CachePool()
    caches = [*pool.join(own[:2]), *pool.join(own[2:3]), own[3]]  # the last keeps its own
    last = [p[-1] for p in ids]
    for step in range(30):  # every ring wraps (16 + 32 positions)
        active = [i for i in range(4) if not (step == 20 and i == 0)]  # 0 sits one pass out
        expected = mx.concatenate([model(mx.array([[last[i]]]), solo[i])[0] for i in active])
        segments = [Segment(caches[i], 1, 1) for i in active]
        got = model.batched(mx.array([last[i] for i in active]), segments)
        assert_rows_match(got, expected, dtype)
        for n, i in enumerate(active):
            last[i] = mx.argmax(expected[n]).item()
        if step == 10:  # sequence 1 leaves with caches of its own, and joins again later
            back = pool.own_caches(caches[1])
            pool.remove([caches[1]])
            caches[1] = back
        if step == 15:
            caches[1] = pool.join([caches[1]])[0]


@pytest.mark.parametrize("variant", ["31b", "e2b"])
def test_caches_taken_back_hold_what_they_hold_alone(variant):
    model = random_target(variant, window=WINDOW)
    ids = prompts([9, 30])
    solo = [prefilled(model, p) for p in ids]
    pool = CachePool()
    caches = pool.join([prefilled(model, p) for p in ids])
    last = [p[-1] for p in ids]
    for _ in range(25):
        model.batched(mx.array(last), [Segment(c, 1, 1) for c in caches])
        logits = [model(mx.array([[t]]), c)[0, -1] for t, c in zip(last, solo, strict=True)]
        last = [mx.argmax(row).item() for row in logits]
    for pooled, alone in zip(caches, solo, strict=True):
        back = pool.own_caches(pooled)
        for got, want in zip(back, alone, strict=True):
            assert type(got) is type(want) and got.offset == want.offset
            if isinstance(want, RotatingKVCache):
                assert got.max_trim >= want.max_trim_kept  # rollback room as alone
                assert got.window == want.window
            for x, y in zip(got.state, want.state, strict=True):
                n = x.shape[2]  # a rotating cache of its own may hold more than it must
                assert n == (want.offset if isinstance(want, KVCache) else min(n, y.shape[2]))
                np.testing.assert_allclose(x, y[:, :, y.shape[2] - n :], atol=2e-4, rtol=1e-4)
    pool.remove([caches[0]])
    assert [s.index for s in pool.slots] == [0] and caches[1][0].slot.index == 0
    pool.remove([caches[1]])
    assert not pool.slots and not pool.layers


def graph_operations(array: mx.array) -> int:
    dot = io.StringIO()
    mx.export_to_dot(dot, array)
    return len(re.findall(r'label ="[A-Za-z]', dot.getvalue()))


@pytest.mark.parametrize("variant", ["31b", "e2b"])
def test_a_pooled_pass_has_as_many_operations_at_any_batch(variant):
    """The property that carries to Metal: a step's kernels do not grow with the batch."""
    model = random_target(variant, window=WINDOW)
    counts = []
    for batch in (2, 8):
        ids = prompts([12] * batch, seed=batch)
        caches = CachePool().join([prefilled(model, p) for p in ids])
        logits = model.batched(mx.array([p[-1] for p in ids]), [Segment(c, 1, 1) for c in caches])
        counts.append(graph_operations(logits))
    assert counts[0] == counts[1]


def test_accepts_plain_caches_holding_positions_only():
    model = random_target("31b", window=WINDOW)
    assert not CachePool.accepts(model.make_cache())  # empty: no shapes to pool yet
    assert CachePool.accepts(prefilled(model, [5, 6, 7]))
    quantized = prefilled(model, list(range(5, 50)))
    quantize_caches(quantized, kv_quantization(8, 32, 0))
    assert not CachePool.accepts(quantized)


@pytest.mark.parametrize("variant", ["31b", "e2b"])
def test_a_ring_longer_than_a_step_grows_then_wraps(variant):
    """A 300-token window: the ring (332 positions) starts at 256 positions, grows whole when a
    slot passes 256, then wraps; a sequence joins past it; all decode as alone."""
    model = random_target(variant, window=300)
    ids = prompts([250, 10, 330], seed=3)
    solo = [prefilled(model, p) for p in ids]
    pool = CachePool()
    caches = pool.join([prefilled(model, p) for p in ids[:2]])

    def rings() -> list[int]:
        return [layer.capacity for layer in pool.layers if layer.ring is not None]

    assert rings() and set(rings()) == {256}
    last = [p[-1] for p in ids]
    for step in range(90):  # the first sequence passes 256, then 332
        if step == 10:
            assert set(rings()) == {332}
            caches += pool.join([prefilled(model, ids[2])])
        active = range(len(caches))
        expected = mx.concatenate([model(mx.array([[last[i]]]), solo[i])[0] for i in active])
        got = model.batched(
            mx.array([last[i] for i in active]), [Segment(caches[i], 1, 1) for i in active]
        )
        assert_rows_match(got, expected, "float32")
        for n, i in enumerate(active):
            last[i] = mx.argmax(expected[n]).item()
