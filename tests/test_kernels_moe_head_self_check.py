"""The MoE and drafter-head kernels' automatic self-check (what a Mac runs on first use) through the
CPU emulator at production shapes, with the fallback warning made an error: the 26B-A4B router
(128 experts, top 8) for a decoded token and verify windows, the dispatch at the sizes where the
model now runs it (from 512 pairs), and the E2B assistant's head (2048 centroids, top 32, a
262,144-token ordering, width 256), in float32, bfloat16 and float16."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import mlx.core as mx
import pytest

from gemma_mlx.kernels import drafter_head, moe
from gemma_mlx.kernels.backend import KernelFallbackWarning, use_kernel_factory
from gemma_mlx.kernels.drafter_head import HeadTable

DTYPES = [mx.float32, mx.bfloat16, mx.float16]
EXPERTS, TOP_K = 128, 8  # 26B-A4B
CENTROIDS, CENTROID_TOP_K, CLUSTER, WIDTH = 2048, 32, 128, 256  # E2B's assistant


def self_checked(emulator, call: Callable[[], object]) -> tuple[object, int]:
    """`call()` on the kernel path in auto mode, as on a Mac: the self-check on first use, a
    fallback failing the test. Returns the result and the launches made."""
    with use_kernel_factory(emulator.metal_kernel, mode="auto"), warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        before = emulator.launches
        result = call()
        mx.eval(result)
        return result, emulator.launches - before


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 4, 9])  # a decoded token; verify windows of 3 and 8 drafts
def test_route(emulator, dtype, tokens):
    key = mx.random.key(tokens)
    logits = mx.random.normal((tokens, EXPERTS), key=key).astype(dtype)
    scale = mx.random.uniform(0.5, 2.0, (EXPERTS,), key=key).astype(mx.bfloat16)
    (weights, ids), launches = self_checked(emulator, lambda: moe.route(logits, scale, TOP_K))
    assert launches == 2  # the self-check's launch, then the call's
    want_weights, want_ids = moe.route_reference(logits, scale, TOP_K)
    assert mx.array_equal(ids, want_ids).item()
    assert mx.allclose(weights, want_weights, rtol=1e-6).item()


@pytest.mark.parametrize("tokens", [64, 512])  # where the dispatch starts to pay; a prefill chunk
def test_dispatch(emulator, tokens):
    assert moe.dispatch_pays(tokens * TOP_K, EXPERTS)
    logits = mx.random.normal((tokens, EXPERTS), key=mx.random.key(tokens))
    ids = moe.route_reference(logits, mx.ones((EXPERTS,)), TOP_K)[1]  # the router's uint32 ids
    got, launches = self_checked(emulator, lambda: moe.dispatch(ids, EXPERTS))
    assert launches == 2
    want = moe.dispatch_reference(ids, EXPERTS)
    for name, a, b in zip(moe.Dispatch._fields, got, want, strict=True):
        assert mx.array_equal(a, b).item(), name


def e2b_table(dtype: mx.Dtype, bits: int, key: mx.array) -> HeadTable:
    """The head's 262,144 rows, `dtype` floats or affine `bits`-bit with group 32 and `dtype`
    scales: 8192 random rows repeated (cheap to make; a repeated row among the candidates ties
    exactly, and the lower token id must win)."""
    a, b, c = mx.random.split(key, 3)
    distinct, copies = 8192, CENTROIDS * CLUSTER // 8192

    def tiled(x: mx.array) -> mx.array:
        return mx.tile(x, (copies, 1))

    if not bits:
        return HeadTable(tiled(mx.random.uniform(-1, 1, (distinct, WIDTH), key=a).astype(dtype)))
    codes = mx.random.randint(0, 256, (distinct, WIDTH * bits // 8), key=a).astype(mx.uint8)
    groups = (distinct, WIDTH // 32)
    return HeadTable(
        tiled(codes.view(mx.uint32)),
        tiled(mx.random.uniform(0.01, 0.1, groups, key=b).astype(dtype)),
        tiled(mx.random.uniform(-0.5, 0.5, groups, key=c).astype(dtype)),
        32,
        bits,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [0, 8], ids=["float", "8-bit"])  # unquantized; the converter's
def test_drafter_head(emulator, dtype, bits):
    keys = mx.random.split(mx.random.key(bits), 4)
    table = e2b_table(dtype, bits, keys[0])
    ordering = mx.random.permutation(CENTROIDS * CLUSTER, key=keys[1]).astype(mx.int32)
    scores = mx.random.normal((1, CENTROIDS), key=keys[2]).astype(dtype)
    z = mx.random.normal((1, WIDTH), key=keys[3]).astype(dtype)
    args = (scores, z, ordering, table, CENTROID_TOP_K)
    token, launches = self_checked(emulator, lambda: drafter_head.greedy_token(*args))
    assert launches == 4  # the self-check's two launches, then the call's
    assert token.item() == drafter_head.greedy_token_reference(*args).item()
