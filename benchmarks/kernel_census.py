"""Our Metal kernels as Metal would run them: kernels per operation (composed MLX vs our kernels)
and every launch's geometry at production shapes.

    python -m benchmarks.kernel_census [--results-dir DIR] [shape options]

Counted from lazy graphs traced on any machine (`benchmarks.graph`; nothing is evaluated, weights
are zero leaves): the composed path is what runs where there is no Metal, the kernel path puts one
stand-in node per kernel launch (`gemma_mlx.kernels.trace.kernel_path`). Views launch nothing and
are left out; `mx.fast` ops and `mx.dequantize` count one kernel each, as on Metal.

Kernels per operation:
- a 26B-A4B-shaped MoE block (router + experts; 128 experts, top 8, 4-bit experts) for one decoded
  token, a verify window of K + 1 tokens, and the fewest tokens whose (token, expert) pairs are
  grouped by expert (`gemma_mlx.kernels.moe.dispatch_pays`);
- speculative verify (greedy and sampling) of K drafts over a 262,144-token vocabulary;
- the E2B assistant's greedy drafter head (2048 centroids, top 32, 128 tokens each, width 256,
  8-bit) per draft token;
- one greedy speculative round: K drafter heads and the verify.

Launch geometry: each launch the wrappers make (the `Launch` objects, so a kernel that becomes two
launches shows as two) at production shapes and dtypes: threadgroups, threads per threadgroup,
and bytes read per threadgroup: the launch's input bytes split evenly over its threadgroups,
except for kernels that pick what they read at run time (the drafter head's candidate rows, the
sampled row of a sampling verify), whose reads are counted from their source (`READS`). A launch
above `TOO_MUCH_PER_THREADGROUP` is marked: one GPU core would stream it alone. Kernels per
decoded token for the five Gemma 4 sizes are `benchmarks.cost_model`'s.

Prints both tables, appends one JSON line per row to `<results-dir>/kernel-census.jsonl` and
writes `<results-dir>/kernel-census.md`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import gemma_mlx  # noqa: F401  (preloads OpenBLAS before MLX)

# isort: split
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from rich.console import Console
from rich.table import Table

from benchmarks import layer_operations, store
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
from gemma_mlx.kernels import drafter_head, moe, verify
from gemma_mlx.kernels.spec import Launch
from gemma_mlx.kernels.trace import kernel_path
from gemma_mlx.models import gemma4, gemma4_assistant
from gemma_mlx.outputs import write_file_atomically

RESULTS_FILE = "kernel-census.jsonl"
REPORT_FILE = "kernel-census.md"
TOO_MUCH_PER_THREADGROUP = 1 << 20
DTYPES = (mx.float32, mx.bfloat16, mx.float16)
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
    prefill: int = 512
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


def first_grouped(shape: Shape) -> int:
    """The fewest tokens whose (token, expert) pairs the MoE block groups by expert."""
    return next(t for t in count(1) if moe.dispatch_pays(t * shape.top_k, shape.experts))


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


# The fused layer operations counted per size: all of E2B's, what only the others have.
LAYER_OPERATIONS = {
    "e2b": lambda name: True,
    "26b-a4b": lambda name: "router" in name or "2 input norm" in name or "MoE" in name,
    "31b": lambda name: "full layer" in name,
}


def layer_operations_of() -> list[tuple[str, Callable[[], object]]]:
    """(what, call) of each fused layer operation counted, at its size's decode shapes."""
    return [
        (f"{size.upper()} {name}, 1 token", call)
        for size, counted in LAYER_OPERATIONS.items()
        for name, call in layer_operations.operations(size).items()
        if counted(name)
    ]


def run(shape: Shape) -> list[Census]:
    greedy = verify_census(shape, sampling=False)
    head = head_census(shape)
    return [
        moe_census(shape, 1),
        moe_census(shape, shape.drafts + 1),
        moe_census(shape, first_grouped(shape)),
        greedy,
        verify_census(shape, sampling=True),
        head,
        round_census(head, greedy, shape.drafts),
        *(census(what, call) for what, call in layer_operations_of()),
    ]


# --- launch geometry ------------------------------------------------------------------------

MAX_DRAFTS = 8  # the longest draft the verify rows cover


@dataclass(frozen=True)
class LaunchRow:
    """One kernel launch at one production shape, as its wrapper built it."""

    kernel: str
    case: str
    dtype: str  # of the data the operation reduces
    launch: Launch

    @property
    def threadgroups(self) -> int:
        groups = 1
        for size, group in zip(self.launch.grid, self.launch.threadgroup, strict=True):
            groups *= -(-size // min(group, size))  # MLX clamps the threadgroup to the grid
        return groups

    @property
    def threads(self) -> int:
        threads = 1
        for size, group in zip(self.launch.grid, self.launch.threadgroup, strict=True):
            threads *= min(group, size)
        return threads

    @property
    def gathers(self) -> bool:
        return self.kernel in READS

    @property
    def bytes_per_threadgroup(self) -> int:
        if self.gathers:
            return READS[self.kernel](self.launch)
        return -(-sum(x.nbytes for x in self.launch.inputs) // self.threadgroups)

    @property
    def bytes_read(self) -> int:
        if self.gathers:
            return self.bytes_per_threadgroup * self.threadgroups
        return sum(x.nbytes for x in self.launch.inputs)


# --- what one threadgroup of a gathering kernel reads (from the kernel's source) -------------


def head_reads(launch: Launch) -> int:
    """drafter_head.metal: its row's scores and state, then SLICE candidates' ordering entries
    and table rows."""
    scores, z, ordering, weight, scales, biases = launch.inputs
    template = dict(launch.template)
    rows = (weight, scales, biases) if template["QUANTIZED"] else (weight,)
    per_candidate = ordering.itemsize + sum(a.size // a.shape[0] * a.itemsize for a in rows)
    return (
        scores.shape[1] * scores.itemsize
        + z.shape[1] * z.itemsize
        + template["SLICE"] * per_candidate
    )


def _sampling_reads(launch: Launch) -> tuple[int, int]:
    """verify.h's `accepted_drafts` (the drafts' entries of p and q, the drafts, the uniforms),
    and the bytes of one chunk of a row of p and q."""
    target, draft, drafts, uniforms = launch.inputs[:4]
    template = dict(launch.template)
    entry = target.itemsize + (draft.itemsize if template["HAS_DRAFT_PROBS"] else 0)
    acceptance = drafts.size * entry + drafts.nbytes + uniforms.nbytes
    return acceptance, template["TG"] * template["PER_THREAD"] * entry


def sampling_chunk_reads(launch: Launch) -> int:
    """verify_sampling_chunks.metal: the acceptance, then its chunk of the sampled row."""
    return sum(_sampling_reads(launch))


def sampling_reads(launch: Launch) -> int:
    """verify_sampling.metal: the acceptance, every chunk's sums, then one chunk rescanned."""
    return sum(_sampling_reads(launch)) + launch.inputs[4].nbytes


# Kernels that read less than their inputs (rows picked at run time): their read model.
READS: dict[str, Callable[[Launch], int]] = {
    drafter_head.HEAD.name: head_reads,
    verify.SAMPLING_CHUNKS.name: sampling_chunk_reads,
    verify.SAMPLING.name: sampling_reads,
}


def launches_of(case: str, dtype: mx.Dtype, call: Callable[[], object]) -> list[LaunchRow]:
    """The launches `call()` makes on the kernel path (traced, not run)."""
    with kernel_path() as launches:
        call()
    name = str(dtype).removeprefix("mlx.core.")
    return [LaunchRow(kernel, case, name, launch) for kernel, launch in launches.calls]


def moe_launches(shape: Shape) -> list[LaunchRow]:
    """The router for a decoded token and verify windows (float32 logits, as `gemma4.Router`
    passes them), the dispatch from the fewest tokens it runs for to a prefill chunk."""
    E, k = shape.experts, shape.top_k
    scale = zero_leaf((E,), mx.bfloat16)
    rows = []
    for tokens in sorted({1, shape.drafts + 1, MAX_DRAFTS + 1}):
        logits = zero_leaf((tokens, E), mx.float32)
        case = f"{tokens} token{'s' * (tokens > 1)}, {E} experts, top {k}"
        rows += launches_of(case, mx.float32, lambda logits=logits: moe.route(logits, scale, k))
    for tokens in sorted({first_grouped(shape), max(shape.prefill, first_grouped(shape))}):
        ids = zero_leaf((tokens, k), mx.uint32)
        case = f"{tokens} tokens, {E} experts, top {k}"
        rows += launches_of(case, mx.uint32, lambda ids=ids: moe.dispatch(ids, E))
    return rows


def verify_launches(shape: Shape) -> list[LaunchRow]:
    """Both verifies of K drafts over the vocabulary, rows in each dtype (sampling with the
    draft's probabilities, the larger read)."""
    V, rows = shape.vocab, []
    for K in sorted({shape.drafts, MAX_DRAFTS}):
        drafts, uniforms = zero_leaf((K,), mx.int32), zero_leaf((K + 1,), mx.float32)
        for dtype in DTYPES:
            target, draft = zero_leaf((K + 1, V), dtype), zero_leaf((K, V), dtype)
            case = f"K = {K}, V = {V:,}"
            rows += launches_of(case, dtype, lambda t=target, d=drafts: verify.verify_greedy(t, d))
            rows += launches_of(
                case,
                dtype,
                lambda t=target, q=draft, d=drafts, u=uniforms: verify.verify_sampling(t, q, d, u),
            )
    return rows


def head_launches(shape: Shape) -> list[LaunchRow]:
    """The E2B assistant's head for one draft token: its 8-bit table (`convert
    --quantize-drafter`) and a bfloat16 one; scores and state bfloat16."""
    C, D, V = shape.centroids, shape.draft_width, shape.vocab
    scores, z = zero_leaf((1, C), mx.bfloat16), zero_leaf((1, D), mx.bfloat16)
    ordering = zero_leaf((V,), mx.int32)
    groups = (V, D // DRAFTER_GROUP)
    tables = {
        f"{DRAFTER_BITS}-bit table": drafter_head.HeadTable(
            zero_leaf((V, D * DRAFTER_BITS // 32), mx.uint32),
            zero_leaf(groups, mx.bfloat16),
            zero_leaf(groups, mx.bfloat16),
            DRAFTER_GROUP,
            DRAFTER_BITS,
        ),
        "bfloat16 table": drafter_head.HeadTable(zero_leaf((V, D), mx.bfloat16)),
    }
    rows = []
    for name, table in tables.items():
        case = f"{C} centroids, top {shape.centroid_top_k}, {V // C} each, width {D}, {name}"
        rows += launches_of(
            case,
            mx.bfloat16,
            lambda t=table: drafter_head.greedy_token(scores, z, ordering, t, shape.centroid_top_k),
        )
    return rows


def layer_launches() -> list[LaunchRow]:
    """The fused layer operations' launches at decode shapes (bfloat16, QAT weights)."""
    rows = []
    for what, call in layer_operations_of():
        rows += launches_of(what.removesuffix(", 1 token"), layer_operations.DTYPE, call)
    return rows


def geometry(shape: Shape) -> list[LaunchRow]:
    return moe_launches(shape) + verify_launches(shape) + head_launches(shape) + layer_launches()


def stamp(benchmark: str, shape: Shape) -> dict:
    """The fields every record of a census run starts with."""
    return {
        "benchmark": benchmark,
        "date": time.strftime("%Y-%m-%d"),
        "mlx_version": mx.__version__,
        "shape": vars(shape),
    }


def record(row: Census, shape: Shape) -> dict:
    return stamp("kernel_census", shape) | {
        "what": row.what,
        "composed_kernels": total(row.composed),
        "kernel_path_kernels": total(row.kernels),
        "reduction": round(row.reduction, 4),
        "composed": dict(row.composed),
        "kernel_path": dict(row.kernels),
        "launches": dict(row.launches),
    }


def launch_record(row: LaunchRow, shape: Shape) -> dict:
    return stamp("kernel_census_launch", shape) | {
        "kernel": row.kernel,
        "case": row.case,
        "dtype": row.dtype,
        "grid": list(row.launch.grid),
        "threadgroup": list(row.launch.threadgroup),
        "threadgroups": row.threadgroups,
        "threads_per_threadgroup": row.threads,
        "bytes_per_threadgroup": row.bytes_per_threadgroup,
        "bytes_read": row.bytes_read,
        "read_model": "from the kernel source" if row.gathers else "inputs split evenly",
    }


def _bytes(n: int) -> str:
    for unit, size in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def geometry_cells(row: LaunchRow) -> list[str]:
    flag = " (over 1 MB)" if row.bytes_per_threadgroup > TOO_MUCH_PER_THREADGROUP else ""
    return [
        row.kernel,
        row.case,
        row.dtype,
        str(row.threadgroups),
        str(row.threads),
        _bytes(row.bytes_per_threadgroup) + flag,
        _bytes(row.bytes_read),
    ]


GEOMETRY_COLUMNS = (
    "kernel",
    "case",
    "dtype",
    "threadgroups",
    "threads / threadgroup",
    "bytes read / threadgroup",
    "bytes read",
)
CENSUS_COLUMNS = ("operation", "composed", "kernel path", "reduction", "our kernels")


def census_cells(row: Census) -> list[str]:
    return [
        row.what,
        str(total(row.composed)),
        str(total(row.kernels)),
        f"{row.reduction:.0%}",
        ", ".join(f"{name} x{n}" for name, n in sorted(row.launches.items())),
    ]


def markdown(rows: Sequence[Census], launches: Sequence[LaunchRow], shape: Shape) -> str:
    def table_lines(columns: Sequence[str], cells: list[list[str]]) -> list[str]:
        return [
            "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns),
            *("| " + " | ".join(c) + " |" for c in cells),
        ]

    options = " ".join(
        f"--{name.replace('_', '-')} {value}"
        for name, value in vars(shape).items()
        if value != getattr(Shape(), name)
    )
    return "\n".join(
        [
            "# Kernel census: gemma_mlx's Metal kernels as Metal would run them",
            "",
            f"Generated by `python -m benchmarks.kernel_census{' ' + options if options else ''}` "
            f"(MLX {mx.__version__}) from traced graphs and the kernels' `Launch` objects; "
            "nothing runs, so the counts hold on any Mac. Kernels per decoded token for the five "
            "Gemma 4 sizes: `benchmarks/cost_model.md`.",
            "",
            "## Kernels per operation: composed MLX against the kernel path",
            "",
            *table_lines(CENSUS_COLUMNS, [census_cells(r) for r in rows]),
            "",
            "## Launch geometry at production shapes",
            "",
            "Bytes read per threadgroup: the launch's input bytes split evenly over its "
            "threadgroups, except for kernels that pick what they read at run time (the "
            "drafter head's candidate rows, the sampled row of a sampling verify), counted from "
            "their source (`READS` in `benchmarks/kernel_census.py`). Marked when over "
            f"{_bytes(TOO_MUCH_PER_THREADGROUP)}: one GPU core then streams it alone.",
            "",
            *table_lines(GEOMETRY_COLUMNS, [geometry_cells(r) for r in launches]),
            "",
        ]
    )


def table(title: str, columns: Sequence[str], cells: list[list[str]]) -> Table:
    out = Table(title=title)
    for i, column in enumerate(columns):
        out.add_column(column, justify="left" if i < 2 or column == "our kernels" else "right")
    for row in cells:
        out.add_row(*row)
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
    rows, launches = run(shape), geometry(shape)
    console.print(
        table(
            "Kernels on Metal: composed MLX vs gemma_mlx kernels",
            CENSUS_COLUMNS,
            [census_cells(r) for r in rows],
        )
    )
    for row in rows:
        console.print(
            f"[bold]{row.what}[/]\n  composed {dict(row.composed)}\n  kernels  {dict(row.kernels)}"
        )
    console.print(
        table(
            "Launch geometry at production shapes",
            GEOMETRY_COLUMNS,
            [geometry_cells(r) for r in launches],
        )
    )
    path = args.results_dir / RESULTS_FILE
    records = [record(row, shape) for row in rows] + [launch_record(r, shape) for r in launches]
    store.append(path, records)
    report = markdown(rows, launches, shape)
    write_file_atomically(
        args.results_dir / REPORT_FILE, lambda path: path.write_text(report), force=True
    )
    console.print(f"appended {len(records)} records to {path}; wrote {REPORT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
