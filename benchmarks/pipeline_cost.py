"""What a pipeline over several Macs adds per decoded token (the multi-Mac table of
`benchmarks.cost_model`).

`gemma_mlx.distributed` splits the layers over the ranks; per decoded token each rank but the
last sends the next one its hidden state (bf16, hidden_size values; on E2B/E4B rank 0 adds the
per-layer inputs of the later ranks' layers), and the last rank's logits (bf16, 262,144 values)
reach every rank in one ring all-reduce: 2 (N - 1) steps of V / N values per rank. The ranks run
one after another, so a pipeline of N Macs decodes one sequence no faster than one Mac holding
the whole model: it adds the transfers and buys memory, not speed.

Link figures (one direction):
- Thunderbolt 5: 80 Gb/s signalling; 7.4 GB/s measured between Macs with MLX's RDMA backend
  (JACCL); about 300 us per message over TCP (the ring backend, what gemma_mlx is tested with)
  and under 10 us (5-9 us reported) with RDMA over Thunderbolt (macOS 26.2, Apple TN3205).
- 10 GbE: 1.25 GB/s; 100 us per message over TCP through a switch (an assumption: a typical
  one-way figure, not measured here).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from benchmarks.bandwidth import apple_bandwidth
from benchmarks.configs import GEMMA4
from benchmarks.roofline import WeightBytes, kv_bytes
from gemma_mlx.distributed.split import plan_split
from gemma_mlx.models import get_model_classes

BF16 = 2
CEILING_SIZE, CEILING_CHIP = "31b", "M4 Pro"


@dataclass(frozen=True)
class Link:
    name: str
    bytes_per_s: float
    latency_s: float  # per message


LINKS = (
    Link("Thunderbolt 5, TCP (ring backend)", 7.4e9, 300e-6),
    Link("Thunderbolt 5, RDMA (JACCL)", 7.4e9, 8e-6),
    Link("10 GbE, TCP", 1.25e9, 100e-6),
)


@functools.cache
def _shapes(size: str) -> tuple[Any, dict[str, int]]:
    """`size`'s ModelArgs and bf16 bytes per tensor (built lazily: nothing is materialized)."""
    config = GEMMA4[size]
    model_class, args_class = get_model_classes(config)
    model = model_class(args_class.from_dict(config))
    return model.args, {name: v.size * BF16 for name, v in tree_flatten(model.parameters())}


def hop_bytes(size: str, ranks: int, context: int) -> list[int]:
    """Bytes each rank but the last sends the next per decoded token, for the split that
    `plan_split` makes on equal ranks (bf16 shapes; the proportions hold at any uniform
    quantization)."""
    args, sizes = _shapes(size)
    split = plan_split(args, sizes, [2**50] * ranks, context, BF16)
    P, L = args.hidden_size_per_layer_input, args.num_hidden_layers
    return [
        (args.hidden_size + (L - split.layers[r][1]) * P if P else args.hidden_size) * BF16
        for r in range(ranks - 1)
    ]


def logits_bytes(size: str, ranks: int) -> float:
    """Bytes one rank sends in the logits' ring all-reduce."""
    return 2 * (ranks - 1) * GEMMA4[size]["vocab_size"] * BF16 / ranks


def added_seconds(size: str, hops: list[int], link: Link) -> float:
    """The hops one after another, then the all-reduce's 2 (N - 1) steps."""
    ranks = len(hops) + 1
    hop_time = sum(link.latency_s + b / link.bytes_per_s for b in hops)
    step = logits_bytes(size, ranks) / (2 * (ranks - 1))
    return hop_time + 2 * (ranks - 1) * (link.latency_s + step / link.bytes_per_s)


def pipeline_lines(
    weights: dict[str, WeightBytes], context: int, ranks: tuple[int, ...] = (2, 3)
) -> list[str]:
    """Markdown: bytes sent and time added per decoded token per size, link and rank count;
    then the decode ceiling of the 31B on two M4 Pro Macs with `context` tokens of KV."""
    lines = [
        "## Several Macs: what a pipeline adds per decoded token",
        "",
        "`gemma_mlx.distributed` (docs/distributed.md): each hop carries one bf16 hidden state "
        "(E2B/E4B: plus the later ranks' per-layer inputs); the logits (bf16, 262,144 values) "
        "reach every rank through a ring all-reduce. KB: bytes all ranks send per token; "
        "ms: time added per token (hops and all-reduce steps run one after another; per-message "
        "latency and link speed in `benchmarks/pipeline_cost.py`).",
        "",
        "| model | ranks | KB sent | " + " | ".join(f"ms, {link.name}" for link in LINKS) + " |",
        "|---|---|---|" + "---|" * len(LINKS),
    ]
    hops = {(s, n): hop_bytes(s, n, context) for s in weights for n in ranks}
    for size in weights:
        for n in ranks:
            sent = sum(hops[size, n]) + n * logits_bytes(size, n)
            cells = " | ".join(
                f"{added_seconds(size, hops[size, n], link) * 1e3:.2f}" for link in LINKS
            )
            lines.append(f"| {size.upper()} | {n} | {sent / 1e3:.0f} | {cells} |")
    if CEILING_SIZE in weights:
        lines += ["", *ceiling_lines(weights[CEILING_SIZE], hops[CEILING_SIZE, 2], context)]
    lines.append("")
    return lines


def ceiling_lines(weights: WeightBytes, hops: list[int], context: int) -> list[str]:
    """Markdown: decode ceilings of CEILING_SIZE on two CEILING_CHIP Macs, per link."""
    bandwidth = apple_bandwidth(CEILING_CHIP).gbs * 1e9
    config = GEMMA4[CEILING_SIZE]
    args = get_model_classes(config)[1].from_dict(config)
    read = weights.total + kv_bytes(args, context, mx.bfloat16)
    compute = read / bandwidth  # each Mac reads its share in turn: the whole model per token
    lines = [
        f"Decode ceiling, {CEILING_SIZE.upper()} (QAT 4-bit) on two {CEILING_CHIP} Macs "
        f"({bandwidth / 1e9:.0f} GB/s each), {context} tokens of context: each token reads "
        f"{read / 1e9:.2f} GB, {compute * 1e3:.1f} ms at one Mac's bandwidth (the ranks take "
        "turns), plus the link:",
        "",
        "| link | ms per token | tok/s ceiling | of one (hypothetical) Mac holding it all |",
        "|---|---|---|---|",
    ]
    for link in LINKS:
        total = compute + added_seconds(CEILING_SIZE, hops, link)
        lines.append(
            f"| {link.name} | {total * 1e3:.1f} | {1 / total:.1f} | {compute / total:.1%} |"
        )
    return lines
