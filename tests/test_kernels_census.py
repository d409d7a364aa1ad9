"""Kernels per decoded token, composed-MLX path vs kernel path, as each would dispatch on Metal
(`benchmarks.kernel_census`): a 26B-A4B-shaped MoE block, speculative verify over a 262,144-token
vocabulary and the E2B assistant's drafter head. Each kernel path launches our kernels once and
fewer kernels in all; the composed path's sorts and vocabulary-wide reductions are gone."""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # `benchmarks` lives beside the package

from benchmarks.kernel_census import Shape, head_census, moe_census, total, verify_census
from gemma_mlx.kernels import verify
from gemma_mlx.kernels.trace import kernel_path

SHAPE = Shape()


def test_moe_block_verify_window():
    row = moe_census(SHAPE, SHAPE.drafts + 1)
    assert row.launches == {"moe_route": 1, "moe_dispatch": 1}
    assert row.kernels["moe_route"] == row.kernels["moe_dispatch"] == 1
    assert total(row.kernels) < total(row.composed)
    assert "ArgSort" in row.composed and "ArgSort" not in row.kernels


def test_moe_block_one_token_needs_no_dispatch():
    """A decoded token's experts are distinct: nothing to group, so neither path sorts."""
    row = moe_census(SHAPE, 1)
    assert row.launches == {"moe_route": 1}
    assert total(row.kernels) < total(row.composed)
    assert "ArgSort" not in row.kernels


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
def test_verify(sampling):
    row = verify_census(SHAPE, sampling)
    name = "verify_sampling" if sampling else "verify_greedy"
    assert row.launches == {name: 1}
    assert row.kernels == {name: 1}  # the round's verify is one kernel and nothing else
    assert total(row.composed) > 1


def test_drafter_head():
    row = head_census(SHAPE)
    assert row.launches == {"drafter_head": 1}
    assert row.kernels == {"QuantizedMatmul": 1, "drafter_head": 1}  # centroid scores + kernel
    assert {"ArgSort", "Dequantize", "Matmul"} <= set(row.composed)


@pytest.mark.parametrize("k", [1, 8])
def test_trace_counts_one_launch_per_call(k):
    with kernel_path() as launches:
        verify.verify_greedy(mx.zeros((k + 1, 100)), mx.zeros((k,), mx.int32))
    assert launches == {"verify_greedy": 1}
