"""GGUF Q6_K weights kept as their blocks: row lookup and products, one kernel each on Metal
(`metal/q6k_rows.metal`, `metal/q6k_matmul.metal`).

Q6_K stores 256 weights in 210 bytes: 6-bit codes with one signed 8-bit scale per 16 weights and
one float16 `d` per block, `w = d * scale * (q - 32)`. MLX's affine format cannot hold it (its
groups start at 32 weights); kept as the GGUF bytes it is exact at 6.5625 bits per weight. Every
weight is exact in float32 (an 11-bit by 8-bit scale times a 6-bit code), so the lookup rounds
once to the output dtype and products accumulate in float32.

The references below (composed MLX: decode the blocks, then gather or matmul) are what runs
without Metal and the kernels' test oracle. A table is `blocks`, uint8 [rows, K / 256 * 210], the
GGUF bytes row by row.
"""

from __future__ import annotations

import mlx.core as mx

from .backend import CHECK_KEY, KernelOp
from .spec import Kernels, KernelSpec, Launch, whole_groups

MODE = "gguf_q6_k"  # the "mode" of a Q6_K module's entry in config.json's "quantization"
BLOCK_WEIGHTS = 256
BLOCK_BYTES = 210
SIMD_WIDTH = 32
SIMDGROUPS = 4  # weight rows per threadgroup of the product (one SIMD-group each)
MAX_ROWS = 8  # rows of x one product launch multiplies (accumulators per lane)
MAX_LAUNCHES = 8  # beyond MAX_ROWS * MAX_LAUNCHES rows of x, decode the table and matmul
LOOKUP_THREADS = 256
# The references decode at most this many weights at a time (64 MB of float32).
DECODE_CHUNK = 1 << 24
CHECK_ROWS = 1000  # table rows the self-check of a product uses

MATMUL = KernelSpec("q6k_matmul", ("x", "blocks"), ("out",), "q6k_matmul.metal", ("q6k.h",))
ROWS = KernelSpec("q6k_rows", ("ids", "blocks"), ("out",), "q6k_rows.metal", ("q6k.h",))


def columns(blocks: mx.array) -> int:
    """K, the weights per row of a Q6_K table."""
    return blocks.shape[-1] // BLOCK_BYTES * BLOCK_WEIGHTS


def check_table(blocks: mx.array, where: str) -> None:
    if blocks.dtype != mx.uint8 or blocks.ndim != 2 or blocks.shape[-1] % BLOCK_BYTES:
        raise ValueError(
            f"{where}: expected Q6_K blocks uint8 [rows, K / 256 * 210], got {blocks.dtype} "
            f"{blocks.shape}"
        )


# --- references -------------------------------------------------------------------------------


def decode(blocks: mx.array) -> mx.array:
    """float32 [..., K] of Q6_K blocks [..., K / 256 * 210] (ggml's `dequantize_row_q6_K`)."""
    lead, n = blocks.shape[:-1], blocks.shape[-1] // BLOCK_BYTES
    b = blocks.reshape(*lead, n, BLOCK_BYTES)
    ql = b[..., :128].reshape(*lead, n, 2, 1, 64)
    qh = b[..., 128:192].reshape(*lead, n, 2, 1, 32)
    low = (ql >> mx.array([0, 4], mx.uint8).reshape(2, 1)) & 15  # [.., half, nibble, 64]
    high = (qh >> mx.array([0, 2, 4, 6], mx.uint8).reshape(4, 1)) & 3  # [.., half, k, 32]
    q = (low.reshape(*lead, n, 2, 4, 32) | (high << 4)).reshape(*lead, n, 16, 16)
    d = b[..., 208:210].view(mx.float16).astype(mx.float32)
    scale = d * b[..., 192:208].view(mx.int8).astype(mx.float32)  # [.., n, 16]
    w = scale[..., None] * (q.astype(mx.float32) - 32)
    return w.reshape(*lead, n * BLOCK_WEIGHTS)


def _chunks(rows: int, k: int) -> list[tuple[int, int]]:
    step = max(1, DECODE_CHUNK // max(k, 1))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def dequantize(blocks: mx.array) -> mx.array:
    """The whole table as float32 [rows, K], decoded a chunk of rows at a time (decoding takes
    several times the output's size in temporaries)."""
    parts = []
    for start, end in _chunks(blocks.shape[0], columns(blocks)):
        part = decode(blocks[start:end])
        mx.eval(part)
        parts.append(part)
    return mx.concatenate(parts) if len(parts) > 1 else parts[0]


def rows_reference(blocks: mx.array, ids: mx.array, dtype: mx.Dtype) -> mx.array:
    """Rows `ids` [N] of the table, [N, K] in `dtype`."""
    return decode(blocks[ids]).astype(dtype)


def matmul_reference(x: mx.array, blocks: mx.array, dtype: mx.Dtype) -> mx.array:
    """x [M, K] times the table's transpose: [M, rows] in `dtype`, summed in float32 (the table
    decoded a chunk of rows at a time)."""
    x32 = x.astype(mx.float32)
    parts = [
        x32 @ decode(blocks[start:end]).T
        for start, end in _chunks(blocks.shape[0], columns(blocks))
    ]
    out = mx.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    return out.astype(dtype)


# --- kernels ----------------------------------------------------------------------------------


def words(blocks: mx.array) -> mx.array:
    """The table as the kernels read it: 105 uint16 words per block."""
    return blocks.view(mx.uint16)


def matmul_launch(x: mx.array, blocks: mx.array, dtype: mx.Dtype) -> Launch:
    """One SIMD-group per table row, SIMDGROUPS rows per threadgroup."""
    M = x.shape[0]
    V = blocks.shape[0]
    threads = SIMD_WIDTH * SIMDGROUPS
    return Launch(
        inputs=(x, words(blocks)),
        grid=(threads * -(-V // SIMDGROUPS), 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=((M, V),),
        output_dtypes=(dtype,),
        template=(("M", M), ("SIMDGROUPS", SIMDGROUPS), ("T", dtype)),
    )


def rows_launch(blocks: mx.array, ids: mx.array, dtype: mx.Dtype) -> Launch:
    """One thread per 16 weights of a row, the rows along y."""
    slices = columns(blocks) // 16
    threads = min(LOOKUP_THREADS, whole_groups(slices, SIMD_WIDTH))
    return Launch(
        inputs=(ids, words(blocks)),
        grid=(whole_groups(slices, threads), ids.shape[0], 1),
        threadgroup=(threads, 1, 1),
        output_shapes=((ids.shape[0], columns(blocks)),),
        output_dtypes=(dtype,),
        template=(("T", dtype),),
    )


def _matmul_kernel(kernels: Kernels, x, blocks, dtype) -> mx.array:
    """One launch per MAX_ROWS rows of x (the accumulators a lane holds)."""
    parts = [
        kernels.run(MATMUL, matmul_launch(x[i : i + MAX_ROWS], blocks, dtype))[0]
        for i in range(0, x.shape[0], MAX_ROWS)
    ]
    return mx.concatenate(parts) if len(parts) > 1 else parts[0]


def _rows_kernel(kernels: Kernels, blocks, ids, dtype) -> mx.array:
    return kernels.run(ROWS, rows_launch(blocks, ids, dtype))[0]


def _matmul_check_args(x, blocks, dtype) -> tuple:
    """Random x of the caller's shape and dtype times the first CHECK_ROWS rows of its table."""
    return mx.random.normal(x.shape, key=CHECK_KEY).astype(x.dtype), blocks[:CHECK_ROWS], dtype


def _rows_check_args(blocks, ids, dtype) -> tuple:
    rows = mx.random.randint(0, blocks.shape[0], ids.shape, key=CHECK_KEY).astype(ids.dtype)
    return blocks, rows, dtype


def _matmul_accepts(got: mx.array, args: tuple) -> str | None:
    """Within float32 summation error of the reference (the order of the sum differs): 1e-5 of
    sum |x| |w| per entry, plus the output dtype's rounding."""
    x, blocks, dtype = args
    want = matmul_reference(x, blocks, mx.float32)
    magnitude = mx.abs(x.astype(mx.float32)) @ mx.abs(dequantize(blocks)).T
    eps = {mx.float32: 2**-24, mx.float16: 2**-11, mx.bfloat16: 2**-8}[dtype]
    tolerance = 1e-5 * magnitude + 2 * eps * mx.abs(want)
    if got.shape != want.shape:
        return f"output has shape {got.shape}, the reference {want.shape}"
    if not mx.all(mx.abs(got.astype(mx.float32) - want) <= tolerance).item():
        return "output differs from the reference"
    return None


_matmul = KernelOp(
    "q6k.matmul",
    _matmul_kernel,
    matmul_reference,
    instance=lambda x, blocks, dtype: (x.shape, x.dtype, dtype),
    check_args=_matmul_check_args,
    accepts=_matmul_accepts,
)
_rows = KernelOp(
    "q6k.rows",
    _rows_kernel,
    rows_reference,
    instance=lambda blocks, ids, dtype: (blocks.shape[-1], ids.dtype, dtype),
    check_args=_rows_check_args,
)


def rows(blocks: mx.array, ids: mx.array, dtype: mx.Dtype) -> mx.array:
    """Rows `ids` [...] (each < rows) of the table, [..., K] in `dtype`: only those rows are read."""
    check_table(blocks, "q6k.rows")
    if not mx.issubdtype(ids.dtype, mx.integer):
        raise ValueError(f"q6k.rows: ids must be integers, got {ids.dtype}")
    flat = ids.reshape(-1)
    if flat.dtype not in (mx.int32, mx.uint32):
        flat = flat.astype(mx.int32)
    out = _rows(blocks, flat, dtype) if flat.size else rows_reference(blocks, flat, dtype)
    return out.reshape(*ids.shape, columns(blocks))


def matmul(x: mx.array, blocks: mx.array, dtype: mx.Dtype) -> mx.array:
    """x [..., K] times the table's transpose: [..., rows] in `dtype`, summed in float32."""
    check_table(blocks, "q6k.matmul")
    K = columns(blocks)
    if x.shape[-1] != K:
        raise ValueError(f"q6k.matmul: x has {x.shape[-1]} columns, the table {K}")
    lead = x.shape[:-1]
    flat = x.reshape(-1, K)
    M = flat.shape[0]
    # One call for all rows: the reference decodes the table once, the kernel launches per 8.
    if M == 0 or M > MAX_ROWS * MAX_LAUNCHES:
        out = matmul_reference(flat, blocks, dtype)
    else:
        out = _matmul(flat, blocks, dtype)
    return out.reshape(*lead, blocks.shape[0])
