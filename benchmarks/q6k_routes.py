"""Two exact ways to run a GGUF Q6_K table in MLX, measured: why gemma_mlx keeps the blocks.

    python -m benchmarks.q6k_routes [--width 1536] [--rows 65536] [--no-time]

- blocks: the GGUF bytes (6.5625 bits per weight), one Metal kernel per lookup and per product
  (`gemma_mlx.kernels.q6k`), the composed decode elsewhere;
- halves: MLX's own affine format, which has no 16-weight groups: a 32-weight group spans two
  Q6_K sub-blocks, so the table becomes two 6-bit group-32 matrices, one with the even
  sub-blocks (codes 32, i.e. zero, in the odd ones), one with the odd, scales d * scale in float32
  (bias -32 scale), and the products are added: exact, no custom kernel, 16 bits per weight;
- for comparison, the 8-bit requantization (inexact; what mlx-lm loads) and the QAT safetensors'
  4-bit group-32 bf16 table that `benchmarks.cost_model` assumes.

Printed: the tied head's bytes per decoded token for the five Gemma 4 sizes; MLX kernels per
decoded token for the head (one bfloat16 row, float32 logits) and the lookup, as Metal would run
them (traced, `benchmarks.kernel_census`); and, unless `--no-time`, CPU milliseconds of one and of
four rows times a `--rows` x `--width` table of random Q6_K blocks, in float32 (a secondary signal:
the CPU backend expands tables to dense float32 by default).
"""

from __future__ import annotations

import argparse
import sys
import time

import gemma_mlx  # noqa: F401  (preloads OpenBLAS before MLX)

# isort: split
import mlx.core as mx
import numpy as np
from gemma_mlx.convert.mlx_format import pack

from benchmarks.configs import GEMMA4
from benchmarks.graph import zero_leaf
from benchmarks.kernel_census import census, total
from gemma_mlx.kernels import q6k

# Bits per weight of a V x H table stored each way (scales and biases included).
BITS = {
    "Q6_K blocks (gemma_mlx)": 8 * q6k.BLOCK_BYTES / q6k.BLOCK_WEIGHTS,
    "two 6-bit halves, float32 scales": 2 * (6 + 2 * 32 / 32),
    "8-bit g32 requantized (inexact)": 8 + 2 * 16 / 32,
    "4-bit g32 bf16 (cost model)": 4 + 2 * 16 / 32,
}
CHUNK_ROWS = 8192


def head_bytes() -> dict[str, dict[str, float]]:
    """size -> form -> bytes of the tied head read per decoded token (the whole table)."""
    return {
        size: {
            form: config["vocab_size"] * config["hidden_size"] * bits / 8
            for form, bits in BITS.items()
        }
        for size, config in GEMMA4.items()
    }


def head_lines(sizes) -> list[str]:
    """`benchmarks.cost_model`'s section on the tied head of a QAT GGUF (Q6_K), per size."""
    forms = list(BITS)
    table = head_bytes()
    lines = [
        "## The tied head of a QAT GGUF (Q6_K), GB read per decoded token",
        "",
        "Google's Q4_0 QAT GGUFs store the tied embedding / head as Q6_K. gemma_mlx keeps its "
        "blocks (exact; one kernel per head product and per lookup on Metal). The exact "
        "alternative in MLX's own format, two 6-bit group-32 halves with float32 scales, and the "
        "inexact 8-bit requantization mlx-lm can load, beside the 4-bit table counted above "
        "(`python -m benchmarks.q6k_routes`).",
        "",
        "| model | " + " | ".join(f"{f} ({BITS[f]:.4g} bits/weight)" for f in forms) + " |",
        "|---|" + "---|" * len(forms),
    ]
    for size in sizes:
        row = table[size]
        lines.append(
            f"| {size.upper()} | " + " | ".join(f"{row[f] / 1e9:.3f}" for f in forms) + " |"
        )
    return lines


def random_blocks(rows: int, width: int, rng: np.random.Generator) -> np.ndarray:
    raw = rng.integers(0, 256, (rows * width // 256, 210), dtype=np.uint8)
    d = (rng.standard_normal(len(raw)) * 1e-3).astype(np.float16)
    raw[:, 208:210] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def halves(raw: np.ndarray) -> list[tuple[mx.array, mx.array, mx.array]]:
    """The two exact 6-bit group-32 matrices (even, odd sub-blocks) of Q6_K rows."""
    parts: list[list[list[np.ndarray]]] = [[[], [], []], [[], [], []]]
    for start in range(0, raw.shape[0], CHUNK_ROWS):
        chunk = raw[start : start + CHUNK_ROWS]
        rows, width = chunk.shape[0], q6k.columns(mx.array(chunk[:1]))
        b = chunk.reshape(-1, 210)
        low = (b[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8)[:, None]) & 15
        high = (
            b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]
        ) & 3
        q = (low.reshape(-1, 2, 4, 32) | (high << 4)).reshape(rows, width // 16, 16)
        d = b[:, 208:210].copy().view(np.float16).astype(np.float32)
        scale = (d * b[:, 192:208].view(np.int8).astype(np.float32)).reshape(rows, -1)
        for parity in (0, 1):
            codes = q.copy()
            codes[:, 1 - parity :: 2] = 32  # the other sub-blocks: zero
            s = scale[:, parity::2]
            for part, value in zip(
                parts[parity], (pack(codes.reshape(rows, width), 6), s, -32 * s), strict=True
            ):
                part.append(value)
    return [tuple(mx.array(np.concatenate(p)) for p in parity) for parity in parts]


def halves_product(x: mx.array, matrices) -> mx.array:
    even, odd = (mx.quantized_matmul(x, w, s, b, group_size=32, bits=6) for w, s, b in matrices)
    return even + odd


def halves_lookup(ids: mx.array, matrices, dtype: mx.Dtype) -> mx.array:
    even, odd = (
        mx.dequantize(w[ids], s[ids], b[ids], group_size=32, bits=6) for w, s, b in matrices
    )
    return (even + odd).astype(dtype)


def kernel_counts(width: int, vocab: int = 262_144) -> dict[str, tuple[int, int]]:
    """(route, operation) -> kernels on Metal (traced with zero-leaf tables)."""
    blocks = zero_leaf((vocab, width // 256 * 210), mx.uint8)
    words = width * 6 // 32
    matrices = [
        (
            zero_leaf((vocab, words), mx.uint32),
            zero_leaf((vocab, width // 32), mx.float32),
            zero_leaf((vocab, width // 32), mx.float32),
        )
        for _ in range(2)
    ]
    x = zero_leaf((1, width), mx.bfloat16)
    ids = zero_leaf((1,), mx.int32)
    traces = {
        "blocks: head": lambda: q6k.matmul(x, blocks, mx.float32),
        "blocks: lookup": lambda: q6k.rows(blocks, ids, mx.bfloat16),
        "halves: head": lambda: halves_product(x, matrices),
        "halves: lookup": lambda: halves_lookup(ids, matrices, mx.bfloat16),
    }
    out = {}
    for what, trace in traces.items():
        counted = census(what, trace)
        # The uint16 view of the blocks shares their buffer (MLX's View): no launch.
        out[what] = tuple(total(c) - c["View uint16"] for c in (counted.composed, counted.kernels))
    return out


def milliseconds(f, repeats: int = 5) -> float:
    mx.eval(f())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(f())
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def cpu_times(rows: int, width: int) -> dict[str, dict[int, float]]:
    """form -> rows of x -> ms of x @ table.T in float32 on this CPU."""
    raw = random_blocks(rows, width, np.random.default_rng(0))
    blocks = mx.array(raw)
    dense = q6k.dequantize(blocks)
    matrices = halves(raw)
    q8 = mx.quantize(dense, group_size=32, bits=8)
    q8 = (q8[0], *(a.astype(mx.float16).astype(mx.float32) for a in q8[1:]))
    mx.eval(dense, matrices, q8)
    forms = {
        "dense float32 (the CPU default)": lambda x: x @ dense.T,
        "Q6_K blocks, composed decode": lambda x: q6k.matmul_reference(x, blocks, mx.float32),
        "two 6-bit halves": lambda x: halves_product(x, matrices),
        "8-bit requantized": lambda x: mx.quantized_matmul(x, *q8, group_size=32, bits=8),
    }
    out = {}
    for form, product in forms.items():
        out[form] = {}
        for m in (1, 4):
            x = mx.random.normal((m, width), key=mx.random.key(m))
            out[form][m] = milliseconds(lambda: product(x), repeats=3)  # noqa: B023
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.q6k_routes", description=__doc__)
    p.add_argument("--width", type=int, default=1536, help="table width (E2B: 1536)")
    p.add_argument("--rows", type=int, default=65536, help="table rows for the CPU timings")
    p.add_argument("--no-time", dest="time", action="store_false", help="skip the CPU timings")
    args = p.parse_args(argv)
    forms = list(BITS)
    print("Tied head, GB read per decoded token:")
    print("| size | " + " | ".join(f"{f} ({BITS[f]:.4g} bpw)" for f in forms) + " |")
    for size, row in head_bytes().items():
        print(f"| {size.upper()} | " + " | ".join(f"{row[f] / 1e9:.3f}" for f in forms) + " |")
    print(f"\nKernels per decoded token at width {args.width} (composed / with our kernels):")
    for what, (composed, kernels) in kernel_counts(args.width).items():
        print(f"  {what}: {composed} / {kernels}")
    if args.time:
        print(f"\nCPU ms, x [M, {args.width}] @ table [{args.rows}, {args.width}].T, float32:")
        for form, times in cpu_times(args.rows, args.width).items():
            print(f"  {form}: " + ", ".join(f"M={m} {t:.1f}" for m, t in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
