"""Kernels per operation, composed-MLX path vs kernel path, as each would dispatch on Metal, and
every launch's geometry (`benchmarks.kernel_census`): a 26B-A4B-shaped MoE block, speculative
verify over a 262,144-token vocabulary and the E2B assistant's drafter head. Each kernel path
launches fewer kernels; the composed path's sorts and vocabulary-wide reductions are gone."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import mlx.core as mx
import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # `benchmarks` lives beside the package

from benchmarks.kernel_census import (
    TOO_MUCH_PER_THREADGROUP,
    Shape,
    first_grouped,
    geometry,
    head_census,
    moe_census,
    total,
    verify_census,
)
from gemma_mlx.kernels import (
    attention,
    drafter_head,
    heads,
    moe,
    projection,
    residual,
    verify,
)
from gemma_mlx.kernels.spec import KernelSpec
from gemma_mlx.kernels.trace import kernel_path

SHAPE = Shape()


def test_moe_block_verify_window_needs_no_dispatch():
    """A verify window's 32 (token, expert) pairs over 128 experts: MLX multiplies them pair by
    pair sorted or not, so the block launches what a decoded token launches, but for the
    router's norm and logits, one fused projection for a single token."""
    window, token = moe_census(SHAPE, SHAPE.drafts + 1), moe_census(SHAPE, 1)
    assert window.launches == {"moe_route": 1}
    assert token.launches == {"moe_route": 1, "projection": 1}
    assert window.composed == token.composed
    router = {"RMSNorm": 1, "Multiply": 1, "Matmul": 1, "AsType": 1}  # the composed router
    assert window.kernels - token.kernels == Counter(router)
    assert total(window.kernels) < total(window.composed)
    assert "ArgSort" in window.composed and "ArgSort" not in window.kernels  # the router's sort
    # the experts' row indices are a constant, not an Arange launched per gathered product
    assert "Arange" not in token.composed and "Arange" not in window.composed


def test_moe_block_groups_pairs_where_mlx_sorts():
    tokens = first_grouped(SHAPE)
    assert tokens == 64  # 512 pairs: 4 per expert (mlx/backend/metal/quantized.cpp)
    row = moe_census(SHAPE, tokens)
    assert row.launches == {"moe_route": 1, "moe_dispatch": 1}
    assert row.composed["ArgSort"] == 3  # router, the pairs' order, its inverse
    assert "ArgSort" not in row.kernels


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
def test_verify(sampling):
    row = verify_census(SHAPE, sampling)
    name = "verify_sampling" if sampling else "verify_greedy"
    assert row.launches and all(kernel.startswith(name) for kernel in row.launches)
    assert row.kernels == row.launches  # the round's verify is our kernels and nothing else
    assert total(row.composed) > total(row.kernels)


def test_drafter_head():
    row = head_census(SHAPE)
    assert row.launches == {"drafter_head": 1, "drafter_head_pick": 1}
    # centroid scores, then the kernels
    assert row.kernels == {"QuantizedMatmul": 1, "drafter_head": 1, "drafter_head_pick": 1}
    assert {"ArgSort", "Dequantize", "Matmul"} <= set(row.composed)


def test_trace_records_each_launch():
    logits, scale = mx.zeros((5, 128)), mx.ones((128,))
    with kernel_path() as launches:
        moe.route(logits, scale, 8)
    assert launches == {"moe_route": 1}
    ((name, launch),) = launches.calls
    assert name == "moe_route" and launch.grid == (32, 5, 1) and launch.inputs[0].shape == (5, 128)


def all_kernels() -> set[str]:
    modules = (moe, verify, drafter_head, projection, residual, heads, attention)
    return {v.name for m in modules for v in vars(m).values() if isinstance(v, KernelSpec)}


def test_geometry_covers_every_kernel_within_limits():
    """Every kernel the wrappers define shows in the geometry at production shapes; each launch
    uses at most 256 threads per threadgroup and reads at most 1 MB per threadgroup."""
    rows = geometry(SHAPE)
    assert {r.kernel for r in rows} == all_kernels()
    for r in rows:
        where = f"{r.kernel}, {r.case}, {r.dtype}"
        assert r.threads <= 256 and r.threads % 32 == 0, where
        assert 0 < r.bytes_per_threadgroup <= TOO_MUCH_PER_THREADGROUP, where
        assert r.bytes_read >= r.bytes_per_threadgroup, where


def test_drafter_head_geometry_by_hand():
    """E2B: 4096 candidates in 32 threadgroups of 128; each reads the row's 2048 bf16 scores and
    256 bf16 state values, then 128 ordering entries (int32) and table rows: 8-bit (64 words,
    8 bf16 scales and 8 biases) or bf16 (256 values)."""
    rows = {r.case.rsplit(", ", 1)[1]: r for r in geometry(SHAPE) if r.kernel == "drafter_head"}
    for table, row_bytes in (("8-bit table", 64 * 4 + 8 * 2 + 8 * 2), ("bfloat16 table", 512)):
        row = rows[table]
        assert row.threadgroups == 32 and row.threads == 256
        assert row.bytes_per_threadgroup == 2048 * 2 + 256 * 2 + 128 * (4 + row_bytes)
