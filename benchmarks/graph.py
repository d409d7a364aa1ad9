"""Count the MLX primitives of a lazy graph, as Metal would run it, without evaluating anything.

`mx.export_to_dot` writes the graph behind some output arrays; `parse_dot` reads it back as
primitives (nodes with a label) and the arrays flowing between them. Materialized arrays are
leaves. Weights that must not take memory are made leaves by `zero_leaf`: a broadcast scalar,
evaluated, which MLX stores as one element with zero strides while reporting its full shape.

The trace runs on the CPU backend, where MLX expands its fused ops (`mx.fast.rms_norm`, `rope`,
`scaled_dot_product_attention`, affine `mx.dequantize`) into reference compositions while building
the graph. On a Metal stream `rms_norm`, `rope` and `dequantize` are always one kernel
(mlx/fast.cpp, mlx/ops.cpp), and attention is one kernel when MLX's fused kernels support the
shapes (mlx/backend/metal/scaled_dot_product_attention.cpp: `has_fused_kernel`, `use_fallback`).
`metal_fast_ops` applies those rules while tracing: a single `Depends` node (which no model uses
otherwise) where Metal runs one kernel, MLX's own composition where Metal falls back to it (e.g.
Gemma 4's 512-wide full-attention heads in decode).

"Views" (reshape, transpose, broadcast, slice...) are counted apart: they usually launch nothing,
though a view MLX must make contiguous costs a copy at run time that the graph does not show.
"""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from gemma_mlx.kernels.activations import as_on_gpu

# Primitives that make no kernel of their own on Metal (views, or bookkeeping).
VIEWS = frozenset(
    {
        "Reshape",
        "Transpose",
        "Broadcast",
        "BroadcastAxes",
        "ExpandDims",
        "Squeeze",
        "Flatten",
        "Unflatten",
        "AsStrided",
        "Slice",
        "StopGradient",
    }
)
STAND_IN = "Depends"
# nanobind takes at most 1024 keyword arguments: name arrays in batches below that.
NAMES_PER_EXPORT = 1000

_PRIMITIVE = re.compile(r'^\{ (\d+) \[label ="([^"]+)"')
_ARRAY = re.compile(r'^\{ (?:rank=\w+; )?"([^"]+)"; \}')
_EDGE = re.compile(r'^("?)([^"\s]+)\1 -> ("?)([^"\s]+)\3$')


@dataclass
class Graph:
    """Primitive applications and the arrays between them.

    A primitive object can be applied many times (a compiled function reuses one), so nodes are
    keyed by application, in the order `export_to_dot` writes them, not by primitive address.
    """

    labels: dict[int, str] = field(default_factory=dict)  # application -> primitive name
    inputs: dict[int, list[str]] = field(default_factory=dict)  # application -> input arrays
    outputs: dict[int, list[str]] = field(default_factory=dict)  # application -> output arrays
    producer: dict[str, int] = field(default_factory=dict)  # array -> the application making it
    consumers: dict[str, list[int]] = field(default_factory=dict)  # array -> applications using it


def parse_dot(text: str) -> Graph:
    """Read `mx.export_to_dot` output: each primitive line is followed by its input and output
    edges; quoted names are arrays."""
    graph = Graph()
    current, address = -1, ""
    for line in text.splitlines():
        line = line.strip()
        if match := _PRIMITIVE.match(line):
            current, address = current + 1, match.group(1)
            graph.labels[current] = match.group(2)
            graph.inputs[current], graph.outputs[current] = [], []
        elif _ARRAY.match(line) or line in ("digraph {", "}"):
            continue
        elif match := _EDGE.match(line):
            source_quoted, source, _, target = match.groups()
            if (target if source_quoted else source) != address:
                raise ValueError(f"export_to_dot: edge {line!r} outside its primitive's block")
            if source_quoted:  # array -> primitive: an input
                graph.inputs[current].append(source)
                graph.consumers.setdefault(source, []).append(current)
            else:  # primitive -> array: an output
                graph.producer[target] = current
                graph.outputs[current].append(target)
    return graph


def zero_leaf(shape: Sequence[int], dtype: mx.Dtype) -> mx.array:
    """An evaluated array of `shape` that holds one element: a leaf of any graph, ~0 bytes."""
    leaf = mx.broadcast_to(mx.array(0, dtype), shape)
    mx.eval(leaf)
    return leaf


def export(outputs: dict[str, mx.array], named: dict[str, mx.array] | None = None) -> Graph:
    """The graph behind `outputs` with the arrays of `outputs` and `named` labelled by their keys."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "graph.dot"
        mx.export_to_dot(str(path), *outputs.values(), **(named or {}), **outputs)
        return parse_dot(path.read_text())


def reachable(graph: Graph, outputs: list[str]) -> set[int]:
    """The primitive applications that compute `outputs` (from materialized leaves)."""
    seen: set[int] = set()
    stack = list(outputs)
    while stack:
        primitive = graph.producer.get(stack.pop())
        if primitive is None or primitive in seen:
            continue
        seen.add(primitive)
        stack.extend(graph.inputs[primitive])
    return seen


def readers(graph: Graph, array: str, primitives: set[int]) -> set[str]:
    """Names of the primitives that read `array`, looking through views of it."""
    found: set[str] = set()
    stack = [array]
    while stack:
        for primitive in graph.consumers.get(stack.pop(), []):
            if primitive not in primitives:
                continue
            label = graph.labels[primitive]
            if label in VIEWS:
                stack.extend(graph.outputs.get(primitive, []))
            else:
                found.add(label)
    return found


def parameter_readers(output: mx.array, params: dict[str, mx.array]) -> dict[str, set[str]]:
    """For each parameter, the names of the primitives computing `output` that read it."""
    found: dict[str, set[str]] = {}
    names = list(params)
    for start in range(0, len(names), NAMES_PER_EXPORT):
        batch = {n: params[n] for n in names[start : start + NAMES_PER_EXPORT]}
        graph = export({"output": output}, batch)
        primitives = reachable(graph, ["output"])
        found.update({name: readers(graph, name, primitives) for name in batch})
    return found


def bytes_read(readers_of: dict[str, set[str]], params: dict[str, mx.array], routed: float) -> int:
    """Parameter bytes one decode step reads, from who reads each parameter in the graph.

    A table only gathered reads one row (one token); a vector only gathered (per-expert scales)
    is counted whole, as a bound; a parameter read by a gathered matmul reads the routed share of
    its experts; any other reader reads all of it, counted once.
    """
    total = 0
    for name, kinds in readers_of.items():
        value = params[name]
        if not kinds:
            continue
        if kinds <= {"Gather"} and value.ndim > 1:
            total += value.nbytes // value.shape[0]
        elif kinds & {"GatherQMM", "GatherMM"}:
            total += int(value.nbytes * routed)
        else:
            total += value.nbytes
    return total


# mlx/backend/metal/scaled_dot_product_attention.cpp (MLX 0.32), inference without logsumexp.
_VECTOR_HEAD_DIMS = frozenset({64, 96, 128, 192, 256})
_FULL_HEAD_DIMS = frozenset({64, 72, 80, 96, 128, 192, 256})


def metal_fused_attention(q: mx.array, k: mx.array, v: mx.array) -> bool:
    """Whether Metal runs this attention as one fused kernel (else MLX's unfused composition)."""
    q_len, k_len, d, dv = q.shape[2], k.shape[2], q.shape[-1], v.shape[-1]
    gqa = q.shape[1] // k.shape[1]
    if q_len > 8:
        supported = d == dv and d in _FULL_HEAD_DIMS
        return supported and d not in (192, 256)  # unfused is faster there (use_fallback)
    supported = (d == dv and d in _VECTOR_HEAD_DIMS) or (d, dv) == (192, 128)
    return supported and q_len <= k_len and q_len * gqa <= 32 and not (d == dv == 192)


@contextmanager
def metal_fast_ops() -> Iterator[Counter[str]]:
    """While tracing, make `mx.fast` ops and `mx.dequantize` one `Depends` node where Metal runs one
    kernel. Yields the count of stand-ins made per kernel ("RMSNorm", "RoPE", ...).
    """
    fast = mx.fast
    real = {
        name: getattr(fast, name) for name in ("rms_norm", "rope", "scaled_dot_product_attention")
    }
    real_dequantize = mx.dequantize
    made: Counter[str] = Counter()

    def one_node(kernel: str, like: mx.array, *reads) -> mx.array:
        """A single node shaped like `like` that reads `reads`."""
        deps = [r for r in reads if isinstance(r, mx.array)] or [like]
        made[kernel] += 1
        return mx.depends([like], deps)[0]

    def dequantize(w, scales, biases=None, group_size=64, bits=4, mode="affine", **kwargs):
        if mode != "affine":  # only affine has the one-kernel path traced here
            return real_dequantize(w, scales, biases, group_size, bits, mode, **kwargs)
        out = zero_leaf((*w.shape[:-1], w.shape[-1] * 32 // bits), scales.dtype)
        return one_node("Dequantize", out, w, scales, biases)

    def rms_norm(x, weight, eps=None, **_):
        return one_node("RMSNorm", x, weight)

    def rope(x, dims, *, traditional, base, scale, offset, freqs=None, **_):
        return one_node("RoPE", x, offset, freqs)

    def sdpa(q, k, v, *, scale, mask=None, sinks=None, **kwargs):
        if not metal_fused_attention(q, k, v):
            return real["scaled_dot_product_attention"](
                q, k, v, scale=scale, mask=mask, sinks=sinks, **kwargs
            )
        return one_node("ScaledDotProductAttention", q, k, v, mask, sinks)

    fast.rms_norm, fast.rope, fast.scaled_dot_product_attention = rms_norm, rope, sdpa
    mx.dequantize = dequantize
    try:
        with as_on_gpu():
            yield made
    finally:
        for name, function in real.items():
            setattr(fast, name, function)
        mx.dequantize = real_dequantize


def short_name(label: str) -> str:
    """'CompiledBroadcastBroadcastPowerBroadcastBroadcastMultiply' -> 'Compiled(Power·Multiply)'."""
    if not label.startswith("Compiled"):
        return label
    ops = [
        op for op in re.findall(r"[A-Z][a-z0-9]*", label[len("Compiled") :]) if op != "Broadcast"
    ]
    return f"Compiled({'·'.join(ops)})"


def kernel_counts(output: mx.array, stand_ins: Counter[str]) -> Counter[str]:
    """Primitives computing `output`, by name, with the stand-ins named after their kernels."""
    graph = export({"output": output})
    counts = Counter(short_name(graph.labels[p]) for p in reachable(graph, ["output"]))
    if counts.pop(STAND_IN, 0) != sum(stand_ins.values()):
        raise RuntimeError("a fused-kernel stand-in is not part of the traced output")
    return counts + stand_ins
