"""The multi-Mac table (`benchmarks.pipeline_cost`) against the arithmetic written out by hand."""

from __future__ import annotations

import mlx.core as mx
import pytest

from benchmarks.configs import GEMMA4
from benchmarks.pipeline_cost import LINKS, hop_bytes, pipeline_lines
from benchmarks.roofline import WeightBytes, kv_bytes
from gemma_mlx.models import get_model_classes

VOCAB, BF16 = 262144, 2


def row(lines: list[str], start: str) -> list[str]:
    line = next(line for line in lines if line.startswith(start))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_bytes_and_latency_of_a_31b_pipeline():
    weights = {"31b": WeightBytes(19_000_000_000, 0, 0)}
    lines = pipeline_lines(weights, 4096, ranks=(2, 3))
    # 2 ranks: one hop of 5376 bf16 values; the all-reduce: each rank sends 2 halves of V
    hidden = 5376 * BF16
    assert hop_bytes("31b", 2, 4096) == [hidden]
    two = row(lines, "| 31B | 2 |")
    assert two[2] == f"{(hidden + 2 * VOCAB * BF16) / 1e3:.0f}"
    tb_tcp, _, ten_gbe = LINKS
    expected = (
        tb_tcp.latency_s + hidden / tb_tcp.bytes_per_s
        + 2 * (tb_tcp.latency_s + VOCAB * BF16 / 2 / tb_tcp.bytes_per_s)
    )  # fmt: skip
    assert float(two[3]) == pytest.approx(expected * 1e3, abs=0.005)
    # 3 ranks: two hops; 4 all-reduce steps of V/3 values; every rank sends 4/3 V values
    three = row(lines, "| 31B | 3 |")
    assert three[2] == f"{(2 * hidden + 3 * 4 / 3 * VOCAB * BF16) / 1e3:.0f}"
    # the ceiling: the whole model's bytes at one M4 Pro's 273 GB/s, plus the link
    ceiling = row(lines, f"| {ten_gbe.name} |")
    config = GEMMA4["31b"]
    kv = kv_bytes(get_model_classes(config)[1].from_dict(config), 4096, mx.bfloat16)
    compute = (19e9 + kv) / 273e9
    added = (
        ten_gbe.latency_s + hidden / ten_gbe.bytes_per_s
        + 2 * (ten_gbe.latency_s + VOCAB * BF16 / 2 / ten_gbe.bytes_per_s)
    )  # fmt: skip
    assert float(ceiling[2]) == pytest.approx(1 / (compute + added), abs=0.05)


def test_e_models_send_the_later_ranks_per_layer_inputs():
    # E2B: layers 13..34 are one block (KV sharing) on the last rank; rank 0 sends the hidden
    # state and 256 per-layer-input values for each layer after its own
    (first,) = hop_bytes("e2b", 2, 4096)
    layers_after = (first // BF16 - 1536) // 256
    assert (first // BF16 - 1536) % 256 == 0 and 22 <= layers_after < 35
