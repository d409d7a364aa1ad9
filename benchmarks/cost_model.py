"""What one decoded token costs, for every Gemma 4 size, gemma_mlx against mlx-lm: a Mac-free measure.

    python -m benchmarks.cost_model [--context 4096] [--sizes e2b,...] [--out FILE] [--force]

For E2B, E4B, 12B, 26B-A4B and 31B (`benchmarks.configs.GEMMA4`), both implementations
(`gemma_mlx.models.gemma4`, `mlx_lm.models.gemma4_text`) are built lazily in bfloat16 and
quantized like a QAT checkpoint (affine 4-bit, group 32, bf16 scales and biases; router dense), so
no weight is ever materialized. Then:

- weight bytes per token, from shapes (`benchmarks.roofline`) and from the graph (which primitive
  reads each parameter: a gathered row, the routed experts, or all of it);
- KV bytes per token at `--context` (bf16 cache);
- MLX primitives per token: the traced graph of one decode step (token in, logits out) at
  `--context` with caches in their steady state, counted with Metal's kernel choices for the fused
  ops (`benchmarks.graph`); "kernels" leaves out views and bookkeeping that launch nothing. Ours
  twice: composed MLX (what runs without Metal) and with gemma_mlx's Metal kernels in place
  (`gemma_mlx.kernels.trace`); and the same for a speculative verify's forward pass of
  VERIFY_TOKENS tokens;
- host syncs per token: counted in each implementation's own decode loop (`stream_generate`), on a
  tiny model of the same structure (syncs do not depend on width).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gemma_mlx  # noqa: F401  (preloads OpenBLAS before MLX)

# isort: split
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from rich.console import Console
from rich.progress import Progress

from benchmarks.bandwidth import apple_bandwidth
from benchmarks.batch_cost import batch_lines
from benchmarks.configs import GEMMA4
from benchmarks.engines import MlxLm, Ours, package_version
from benchmarks.graph import (
    VIEWS,
    bytes_read,
    kernel_counts,
    metal_fast_ops,
    parameter_readers,
    zero_leaf,
)
from benchmarks.kv_cost import kv_cache_lines
from benchmarks.pipeline_cost import pipeline_lines
from benchmarks.q6k_routes import head_lines
from benchmarks.roofline import WeightBytes, kv_bytes, weight_bytes_per_token
from benchmarks.syncs import blocking, count_syncs
from benchmarks.tiny_model import BITS, GROUP_SIZE, qat_quantizable, write_tiny_model
from gemma_mlx.kernels.trace import kernel_path
from gemma_mlx.models import get_model_classes
from gemma_mlx.outputs import write_file_atomically

IMPLEMENTATIONS = ("gemma_mlx", "mlx-lm")
CHIPS = ("M4", "M4 Pro", "M4 Max", "M5 Max")
DEFAULT_OUT = Path(__file__).parent / "cost_model.md"
KV_DTYPE = mx.bfloat16
SYNC_TOKENS = 16
VERIFY_TOKENS = 4  # a verify window: 3 drafts and the token after them


def kernels_in(primitives: Counter[str]) -> int:
    return sum(n for name, n in primitives.items() if name not in VIEWS)


@dataclass
class Cost:
    weight_bytes_shapes: int
    weight_bytes_graph: int
    primitives: Counter[str]  # one decode step, composed MLX
    window: Counter[str]  # a forward pass of VERIFY_TOKENS tokens, composed MLX
    metal: Counter[str] | None = None  # one decode step with gemma_mlx's kernels (ours only)
    window_metal: Counter[str] | None = None
    syncs: float = 0.0
    submissions: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.primitives.values())

    @property
    def kernels(self) -> int:
        return kernels_in(self.primitives)


def build(implementation: str, config: dict[str, Any]) -> nn.Module:
    """A QAT-quantized model whose parameters are zero leaves (full shapes, ~no memory)."""
    if implementation == "gemma_mlx":
        model_class, args_class = get_model_classes(config)
    else:
        from mlx_lm.models import gemma4_text

        model_class, args_class = gemma4_text.Model, gemma4_text.ModelArgs
    model = model_class(args_class.from_dict(config))
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, GROUP_SIZE, BITS, class_predicate=qat_quantizable)
    model.update(tree_map(lambda p: zero_leaf(p.shape, p.dtype), model.parameters()))
    # Buffers computed at construction (RoPE frequencies) are materialized before any decode step.
    mx.eval([v for _, m in model.named_modules() for v in m.values() if isinstance(v, mx.array)])
    return model


def _capacity(positions: int, step: int = 256) -> int:
    return (positions + step) // step * step  # room for the next token without growing


def steady_cache(implementation: str, model: nn.Module, args, context: int) -> list:
    """Caches holding `context` positions (zero leaves), as after a long decode:
    the next token is written in place, with no buffer growth or rotation copy."""
    cache = model.make_cache()
    for layer, c in enumerate(cache):
        n_kv, head_dim = args.n_kv_heads(layer), args.layer_head_dim(layer)
        sliding = args.is_sliding(layer)
        if implementation == "gemma_mlx" and sliding:
            held = min(context, c._keep)
            c.filled, size = held, held + c.step
        elif sliding:  # mlx-lm's RotatingKVCache: a ring of `max_size` once full
            size = args.sliding_window if context >= args.sliding_window else _capacity(context)
            c._idx = context % args.sliding_window if context >= args.sliding_window else context
        else:
            size = _capacity(context)
        c.keys = zero_leaf((1, n_kv, size, head_dim), KV_DTYPE)
        c.values = zero_leaf((1, n_kv, size, head_dim), KV_DTYPE)
        c.offset = context
    return cache


def traced_step(
    implementation: str, model: nn.Module, args, context: int, tokens: int, kernels: bool = False
) -> tuple[Counter[str], mx.array]:
    """Primitives of a forward pass of `tokens` tokens at `context`, and its logits; `kernels`:
    with gemma_mlx's Metal kernels in place of their composed references."""
    cache = steady_cache(implementation, model, args, context)
    inputs = mx.array([[1] * tokens], mx.int32)  # materialized: a leaf, no kernel
    launched = kernel_path() if kernels else nullcontext(Counter())
    with metal_fast_ops() as stand_ins, launched as launches:
        logits = model(inputs, cache=cache)
    return kernel_counts(logits, stand_ins + launches), logits


def trace_cost(implementation: str, config: dict[str, Any], context: int) -> Cost:
    """Bytes and primitives of one decode step at `context`, and of a verify window's forward
    pass, from the lazy graphs."""
    model = build(implementation, config)
    args = get_model_classes(config)[1].from_dict(config)
    primitives, logits = traced_step(implementation, model, args, context, 1)
    params = dict(tree_flatten(model.parameters()))
    routed = (args.top_k_experts / args.num_experts) if args.enable_moe_block else 0.0
    ours = implementation == "gemma_mlx"
    return Cost(
        weight_bytes_shapes=weight_bytes_per_token(model).total,
        weight_bytes_graph=bytes_read(parameter_readers(logits, params), params, routed),
        primitives=primitives,
        window=traced_step(implementation, model, args, context, VERIFY_TOKENS)[0],
        metal=traced_step(implementation, model, args, context, 1, True)[0] if ours else None,
        window_metal=(
            traced_step(implementation, model, args, context, VERIFY_TOKENS, True)[0]
            if ours
            else None
        ),
    )


def measure_syncs(size: str, tokens: int = SYNC_TOKENS) -> dict[str, tuple[float, float]]:
    """(blocking syncs, graph submissions) per decoded token in each implementation's own loop,
    counted from the first to the last-but-one token (the steady state, without the boundaries)."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="gemma-mlx-syncs-") as tmp:
        directory = write_tiny_model(size, Path(tmp))
        ours = Ours(directory, prefill_step_size=512)
        for engine in (ours, MlxLm(directory, 512, like=ours)):
            snapshots = {}
            with count_syncs() as counts:
                for n, _ in enumerate(engine.stream(list(range(4, 36)), tokens), start=1):
                    if n in (1, tokens - 1):
                        snapshots[n] = counts.copy()
            window = snapshots[tokens - 1] - snapshots[1]
            steps = tokens - 2
            out[engine.name] = (blocking(window) / steps, window["async_eval"] / steps)
    return out


def costs(context: int, sizes: Sequence[str], progress: Progress) -> dict[str, dict[str, Cost]]:
    table: dict[str, dict[str, Cost]] = {}
    task = progress.add_task("cost model", total=len(sizes) * (len(IMPLEMENTATIONS) + 1))
    for size in sizes:
        config = GEMMA4[size]
        table[size] = {}
        for implementation in IMPLEMENTATIONS:
            progress.update(task, description=f"{size}: tracing {implementation}")
            table[size][implementation] = trace_cost(implementation, config, context)
            progress.advance(task)
        progress.update(task, description=f"{size}: counting syncs on tiny:{size}")
        for implementation, (syncs, submissions) in measure_syncs(size).items():
            table[size][implementation].syncs = syncs
            table[size][implementation].submissions = submissions
        progress.advance(task)
    return table


def batch_weights(size: str) -> tuple[WeightBytes, int, int]:
    """(weight bytes per token, experts, top-k) of `size` for the batch table."""
    config = GEMMA4[size]
    weights = weight_bytes_per_token(build("gemma_mlx", config))
    return weights, config["num_experts"] or 0, config["top_k_experts"] or 0


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def metal_ratio(costs: dict[str, Cost]) -> float:
    return kernels_in(costs["gemma_mlx"].metal) / costs["mlx-lm"].kernels


def summary(table: dict[str, dict[str, Cost]]) -> list[str]:
    """The lines the README quotes."""
    ratios = {s: c["gemma_mlx"].kernels / c["mlx-lm"].kernels for s, c in table.items()}
    lines = []
    same_bytes = all(
        c["gemma_mlx"].weight_bytes_graph == c["mlx-lm"].weight_bytes_graph for c in table.values()
    )
    lines.append(
        "- Weight bytes per decoded token: "
        + ", ".join(
            f"{s.upper()} {_gb(c['gemma_mlx'].weight_bytes_graph)} GB" for s, c in table.items()
        )
        + (" (the same in both implementations)." if same_bytes else ".")
    )
    lines.append(
        "- Kernels per decoded token, gemma_mlx / mlx-lm: "
        + ", ".join(
            f"{s.upper()} {c['gemma_mlx'].kernels} / {c['mlx-lm'].kernels} ({ratios[s]:.2f}x)"
            for s, c in table.items()
        )
        + "."
    )
    lines.append(
        "- On a Mac, with gemma_mlx's Metal kernels in place: "
        + ", ".join(
            f"{s.upper()} {kernels_in(c['gemma_mlx'].metal)} ({metal_ratio(c):.2f}x mlx-lm)"
            for s, c in table.items()
        )
        + f" kernels per decoded token; a {VERIFY_TOKENS}-token verify forward pass: "
        + ", ".join(
            f"{s.upper()} {kernels_in(c['gemma_mlx'].window_metal)} / "
            f"{kernels_in(c['mlx-lm'].window)}"
            for s, c in table.items()
        )
        + " (gemma_mlx / mlx-lm)."
    )
    syncs = {(round(c["gemma_mlx"].syncs, 2), round(c["mlx-lm"].syncs, 2)) for c in table.values()}
    lines.append(
        "- Host syncs per decoded token, gemma_mlx / mlx-lm: "
        + "; ".join(f"{a:g} / {b:g}" for a, b in sorted(syncs))
        + " (both pipeline the next step before reading the token)."
    )
    return lines


def kernel_path_lines(table: dict[str, dict[str, Cost]]) -> list[str]:
    """What one decoded token launches on gemma_mlx's kernel path, kernel by kernel (ours in
    snake_case, MLX's primitives in CamelCase)."""
    lines = [
        "## The kernel path of a decoded token, kernel by kernel",
        "",
        "| model | kernels (launches per decoded token) |",
        "|---|---|",
    ]
    for size, c in table.items():
        launched = sorted(
            ((n, k) for n, k in c["gemma_mlx"].metal.items() if n not in VIEWS),
            key=lambda item: (-item[1], item[0]),
        )
        lines.append(f"| {size.upper()} | " + ", ".join(f"{n} {k}" for n, k in launched) + " |")
    return lines


def markdown(table: dict[str, dict[str, Cost]], context: int) -> str:
    lines = [
        "# Decode cost model: gemma_mlx against mlx-lm, Gemma 4 at QAT 4-bit group 32",
        "",
        f"Generated by `python -m benchmarks.cost_model --context {context}` (MLX {mx.__version__}, "
        f"mlx-lm {package_version('mlx-lm')}). Per decoded token at a context of {context} "
        "positions; no weight is materialized (see the module docstring for the method). "
        "These counts transfer to any Mac: speed on the CPU backend does not.",
        "",
        *summary(table),
        "",
        "| model | weights GB/token (shapes) | weights GB/token (graph) ours / mlx-lm "
        "| KV MB/token | primitives ours / mlx-lm | kernels ours / mlx-lm "
        "| host syncs ours / mlx-lm | submissions ours / mlx-lm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, c in table.items():
        ours, peer = c["gemma_mlx"], c["mlx-lm"]
        args = get_model_classes(GEMMA4[size])[1].from_dict(GEMMA4[size])
        lines.append(
            f"| {size.upper()} | {_gb(ours.weight_bytes_shapes)} "
            f"| {_gb(ours.weight_bytes_graph)} / {_gb(peer.weight_bytes_graph)} "
            f"| {kv_bytes(args, context, KV_DTYPE) / 1e6:.1f} | {ours.total} / {peer.total} "
            f"| {ours.kernels} / {peer.kernels} | {ours.syncs:.2f} / {peer.syncs:.2f} "
            f"| {ours.submissions:.2f} / {peer.submissions:.2f} |"
        )
    lines += [
        "",
        f"## Kernels with gemma_mlx's Metal kernels, and for a {VERIFY_TOKENS}-token verify",
        "",
        "gemma_mlx composed (what runs without Metal) / gemma_mlx with its Metal kernels in "
        f"place / mlx-lm, for one decode step and for the forward pass of a speculative verify "
        f"of {VERIFY_TOKENS - 1} drafts ({VERIFY_TOKENS} tokens).",
        "",
        "| model | decode step kernels | verify forward kernels |",
        "|---|---|---|",
    ]
    for size, c in table.items():
        ours, peer = c["gemma_mlx"], c["mlx-lm"]
        lines.append(
            f"| {size.upper()} | {ours.kernels} / {kernels_in(ours.metal)} / {peer.kernels} "
            f"| {kernels_in(ours.window)} / {kernels_in(ours.window_metal)} "
            f"/ {kernels_in(peer.window)} |"
        )
    lines += ["", *kernel_path_lines(table)]
    lines += [
        "",
        f"## Decode ceilings (tok/s): bandwidth / (weights + KV at {context})",
        "",
        "| model | "
        + " | ".join(f"{chip} ({apple_bandwidth(chip).gbs:g} GB/s)" for chip in CHIPS)
        + " |",
        "|---|" + "---|" * len(CHIPS),
    ]
    for size, c in table.items():
        args = get_model_classes(GEMMA4[size])[1].from_dict(GEMMA4[size])
        per_token = c["gemma_mlx"].weight_bytes_graph + kv_bytes(args, context, KV_DTYPE)
        cells = [f"{apple_bandwidth(chip).gbs * 1e9 / per_token:.0f}" for chip in CHIPS]
        lines.append(f"| {size.upper()} | " + " | ".join(cells) + " |")
    lines += ["", *batch_lines({s: batch_weights(s) for s in table})]
    lines += ["", *kv_cache_lines(list(table))]
    lines += ["", *pipeline_lines({s: batch_weights(s)[0] for s in table}, context)]
    lines += ["", *head_lines(table)]
    lines += [
        "",
        "## Where the kernel counts differ (per decoded token)",
        "",
        "| model | primitive | gemma_mlx | mlx-lm |",
        "|---|---|---|---|",
    ]
    for size, c in table.items():
        ours, peer = c["gemma_mlx"].primitives, c["mlx-lm"].primitives
        differing = sorted(
            (
                name
                for name in ours.keys() | peer.keys()
                if name not in VIEWS and ours[name] != peer[name]
            ),
            key=lambda n: (-abs(ours[n] - peer[n]), n),
        )
        lines += [f"| {size.upper()} | {n} | {ours[n]} | {peer[n]} |" for n in differing[:8]]
    lines += [
        "",
        "## How it is counted",
        "",
        "- Weights: every linear, embedding and expert stack quantized to affine 4-bit, group 32, "
        "bf16 scales and biases (5.0 bits per weight); norms, scalars and the MoE router dense "
        "bf16. Embedding tables read one row per token, a tied head reads its table once, MoE "
        "experts count top-k / experts of their stacks.",
        "- KV: every attention layer reads its keys and values at the context (sliding layers at "
        "most their window; KV-shared layers re-read their producer's cache), bf16.",
        "- Primitives: nodes of the lazy graph from the token to the logits, parameters and cache "
        "buffers as leaves. On a Metal stream `rms_norm` and `rope` are one kernel and attention is "
        "one kernel where MLX has a fused kernel for the shapes; decode attention over 512-wide "
        "heads (Gemma 4 full layers) is not among them in MLX 0.32, so those layers run MLX's "
        "unfused composition (on gemma_mlx's kernel path, its own two-launch decode attention). "
        "Kernels = primitives minus views (reshape, transpose, broadcast, slice, ...). "
        "`mx.compile`d functions count as one primitive each; on the kernel path each launch of a "
        "gemma_mlx kernel counts one (`gemma_mlx.kernels.trace`).",
        "- Host syncs: calls that block on the device (`mx.eval`, `item`, `tolist`, `int()`...) "
        "between the first and the last decoded token of each implementation's `stream_generate`; "
        "submissions: `mx.async_eval` calls.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.cost_model", description=__doc__.splitlines()[0]
    )
    p.add_argument("--context", type=int, default=4096, help="tokens in the cache (4096)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown file to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument(
        "--sizes", default=",".join(GEMMA4), help=f"comma-separated ({','.join(GEMMA4)})"
    )
    args = p.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    console = Console(stderr=True)
    if args.context < 1:
        console.print("error: --context must be >= 1")
        return 2
    unknown = [s for s in sizes if s not in GEMMA4]
    if unknown or not sizes:
        console.print(f"error: --sizes: {args.sizes!r}; known sizes are {', '.join(GEMMA4)}")
        return 2
    if args.out.exists() and not args.force:
        console.print(f"error: {args.out} exists; pass --force to replace it")
        return 2
    with Progress(console=console) as progress:
        table = costs(args.context, sizes, progress)
    text = markdown(table, args.context)
    write_file_atomically(args.out, lambda path: path.write_text(text), force=args.force)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
