"""Kernels per decoded token, composed-MLX path vs our Metal kernels, as each would dispatch on Metal.

    python -m benchmarks.kernel_census [--results-dir DIR] [shape options]

Counted from lazy graphs traced on any machine (`benchmarks.graph`; nothing is evaluated, weights
are zero leaves): the composed path is what runs where there is no Metal, the kernel path puts one
stand-in node per kernel launch (`gemma_mlx.kernels.trace.kernel_path`). Views launch nothing and
are left out; `mx.fast` ops and `mx.dequantize` count one kernel each, as on Metal.

- a 26B-A4B-shaped MoE block (router + experts; 128 experts, top 8, 4-bit experts) for one decoded
  token and for a verify window of K + 1 tokens;
- speculative verify (greedy and sampling) of K drafts over a 262,144-token vocabulary;
- the E2B assistant's greedy drafter head (2048 centroids, top 32, 128 tokens each, width 256,
  8-bit) per draft token;
- one greedy speculative round: K drafter heads and the verify.

Prints a table and appends one JSON line per row to `<results-dir>/kernel-census.jsonl`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gemma_mlx  # noqa: F401  (preloads OpenBLAS before MLX)

# isort: split
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from rich.console import Console
from rich.table import Table

from benchmarks import store
from benchmarks.configs import GEMMA4
from benchmarks.graph import (
    STAND_IN,
    VIEWS,
    export,
    metal_fast_ops,
    reachable,
    short_name,
    zero_leaf,
)
from gemma_mlx.kernels import verify
from gemma_mlx.kernels.trace import kernel_path
from gemma_mlx.models import gemma4, gemma4_assistant

RESULTS_FILE = "kernel-census.jsonl"
EXPERT_BITS, EXPERT_GROUP = 4, 32  # QAT experts
DRAFTER_BITS, DRAFTER_GROUP = 8, 32  # `convert --quantize-drafter`


@dataclass(frozen=True)
class Shape:
    """What is counted; the defaults are 26B-A4B's MoE block and the E2B assistant's head."""

    hidden: int = 2816
    experts: int = 128
    top_k: int = 8
    expert_width: int = 704
    vocab: int = 262_144
    drafts: int = 3
    centroids: int = 2048
    centroid_top_k: int = 32
    draft_width: int = 256


@dataclass
class Census:
    """Kernels (by primitive or kernel name) of one operation on each path."""

    what: str
    composed: Counter[str]
    kernels: Counter[str]
    launches: Counter[str]  # our kernels among `kernels`

    @property
    def reduction(self) -> float:
        return 1 - total(self.kernels) / total(self.composed)


def total(counts: Counter[str]) -> int:
    return sum(counts.values())


Outputs = mx.array | tuple[mx.array, ...]


def kernels_of(trace: Callable[[], Outputs], launches: Counter[str] | None = None) -> Counter[str]:
    """The kernels computing `trace()`'s outputs on Metal, by name: primitives less views, with
    each stand-in named after its fused op or kernel (`launches`: those of the kernel path)."""
    with metal_fast_ops() as fused:
        outputs = trace()
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    named = {f"output{i}": x for i, x in enumerate(outputs)}
    graph = export(named)
    counts = Counter(short_name(graph.labels[p]) for p in reachable(graph, list(named)))
    counts = Counter({name: n for name, n in counts.items() if name not in VIEWS})
    stand_ins = fused + (launches or Counter())
    if counts.pop(STAND_IN, 0) != total(stand_ins):
        raise RuntimeError("a stand-in kernel is not part of the traced output")
    return counts + stand_ins


def census(what: str, trace: Callable[[], Outputs]) -> Census:
    """`trace` on the composed path, then on the kernel path."""
    composed = kernels_of(trace)
    with kernel_path() as launches:
        kernels = kernels_of(trace, launches)
    return Census(what, composed, kernels, Counter(launches))


def leaves(module: nn.Module) -> nn.Module:
    """`module` with every parameter a zero leaf: full shapes, no memory, never evaluated."""
    module.update(tree_map(lambda p: zero_leaf(p.shape, p.dtype), module.parameters()))
    return module


def moe_census(shape: Shape, tokens: int) -> Census:
    """Router and experts of one MoE block, bf16 with 4-bit experts, for `tokens` tokens."""
    config = GEMMA4["26b-a4b"] | {
        "hidden_size": shape.hidden,
        "num_experts": shape.experts,
        "top_k_experts": shape.top_k,
        "moe_intermediate_size": shape.expert_width,
    }
    args = gemma4.ModelArgs.from_dict(config)
    router, experts = gemma4.Router(args), gemma4.Experts(args)
    for module in (router, experts):
        module.set_dtype(mx.bfloat16)
    nn.quantize(experts, EXPERT_GROUP, EXPERT_BITS)
    leaves(router), leaves(experts)
    h = zero_leaf((1, tokens, shape.hidden), mx.bfloat16)

    def block() -> mx.array:
        weights, ids = router(h)
        return experts(h, ids, weights)

    return census(f"MoE block, {tokens} token{'s' * (tokens > 1)}", block)


def verify_census(shape: Shape, sampling: bool) -> Census:
    """One round's verify of `shape.drafts` drafts over the vocabulary."""
    K, V = shape.drafts, shape.vocab
    rows, drafts = zero_leaf((K + 1, V), mx.float32), zero_leaf((K,), mx.int32)
    if sampling:
        draft_probs, uniforms = zero_leaf((K, V), mx.float32), zero_leaf((K + 1,), mx.float32)
        return census(
            f"sampling verify, K = {K}",
            lambda: verify.verify_sampling(rows, draft_probs, drafts, uniforms),
        )
    return census(f"greedy verify, K = {K}", lambda: verify.verify_greedy(rows, drafts))


def drafter(shape: Shape) -> gemma4_assistant.Model:
    """An E2B-shaped assistant with a centroid head, bf16, quantized as the converter does."""
    target = gemma4.ModelArgs.from_dict(GEMMA4["e2b"] | {"vocab_size": shape.vocab})
    config = gemma4_assistant.config_for_target(
        target,
        hidden_size=shape.draft_width,
        num_centroids=shape.centroids,
        centroid_intermediate_top_k=shape.centroid_top_k,
    )
    model = gemma4_assistant.Model(gemma4_assistant.ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, DRAFTER_GROUP, DRAFTER_BITS)
    return leaves(model)


def head_census(shape: Shape) -> Census:
    """The greedy drafter head for one draft token (`Model.greedy_token`)."""
    model = drafter(shape)
    z = zero_leaf((1, 1, shape.draft_width), mx.bfloat16)
    return census("drafter head, 1 draft", lambda: model.greedy_token(z))


def round_census(head: Census, verify_round: Census, drafts: int) -> Census:
    """A greedy round: `drafts` heads, then the verify (the drafter's layers and the target's
    forward pass are the same on both paths and left out)."""

    def times(counts: Counter[str]) -> Counter[str]:
        return Counter({name: n * drafts for name, n in counts.items()})

    return Census(
        f"greedy round: {drafts} heads + verify",
        times(head.composed) + verify_round.composed,
        times(head.kernels) + verify_round.kernels,
        times(head.launches) + verify_round.launches,
    )


def run(shape: Shape) -> list[Census]:
    greedy = verify_census(shape, sampling=False)
    head = head_census(shape)
    return [
        moe_census(shape, 1),
        moe_census(shape, shape.drafts + 1),
        greedy,
        verify_census(shape, sampling=True),
        head,
        round_census(head, greedy, shape.drafts),
    ]


def record(row: Census, shape: Shape) -> dict:
    return {
        "benchmark": "kernel_census",
        "date": time.strftime("%Y-%m-%d"),
        "mlx_version": mx.__version__,
        "what": row.what,
        "shape": vars(shape),
        "composed_kernels": total(row.composed),
        "kernel_path_kernels": total(row.kernels),
        "reduction": round(row.reduction, 4),
        "composed": dict(row.composed),
        "kernel_path": dict(row.kernels),
        "launches": dict(row.launches),
    }


def table(rows: Sequence[Census]) -> Table:
    out = Table(title="Kernels on Metal: composed MLX vs gemma_mlx kernels")
    for column in ("operation", "composed", "kernel path", "reduction", "our kernels"):
        out.add_column(
            column, justify="left" if column in ("operation", "our kernels") else "right"
        )
    for row in rows:
        out.add_row(
            row.what,
            str(total(row.composed)),
            str(total(row.kernels)),
            f"{row.reduction:.0%}",
            ", ".join(f"{name} x{n}" for name, n in sorted(row.launches.items())),
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    defaults = Shape()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results-dir", type=Path, default=store.RESULTS_DIR)
    for name, value in vars(defaults).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    args = p.parse_args(argv)
    shape = Shape(**{name: getattr(args, name) for name in vars(defaults)})
    if shape.vocab % shape.centroids or not 0 < shape.centroid_top_k <= shape.centroids:
        p.error("--vocab must be a multiple of --centroids, --centroid-top-k in 1..--centroids")
    console = Console()
    rows = run(shape)
    console.print(table(rows))
    for row in rows:
        console.print(
            f"[bold]{row.what}[/]\n  composed {dict(row.composed)}\n  kernels  {dict(row.kernels)}"
        )
    path = args.results_dir / RESULTS_FILE
    store.append(path, [record(row, shape) for row in rows])
    console.print(f"appended {len(rows)} records to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
