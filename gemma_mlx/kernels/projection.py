"""Projections of one input row in one launch each (a decode step's shapes).

- `project`: up to three matrices times the input, optionally RMS-normed first: a layer's
  input norm and its q, k, v projections (one launch for four MLX kernels), the MoE router's
  norm, logits and their float32 cast (one for three);
- `project_geglu`: gelu_approx(gate . x) * (up . x), or times a given vector: the MLP's gate,
  up and GeGLU (one launch for four MLX kernels: two products and the compiled GeGLU's two),
  the per-layer-input gate of E2B/E4B (one for three).

`metal/projection.metal`, `metal/projection_geglu.metal`, their arithmetic in
`metal/projection.h`: dense or affine 2/4/8-bit matrices (the QAT checkpoints are 4-bit, group
32), float32 sums, the products and the epilogue rounded to the model's dtype where MLX rounds
them. The references below are the model's composed code. The kernels take one input row: other
shapes (prefill, verify windows, batches) take the reference, which is MLX's own kernels.

Launch geometry: a SIMD-group computes ROWS rows, its lanes reading adjacent 16-value runs of
each row (2 words of 4-bit codes, 32 bytes of bfloat16); SIMDGROUPS per threadgroup, MLX qmv's
8 rows per threadgroup of 64 threads, so a projection spreads over N / 8 threadgroups (E2B's
q, k, v: 320), each reading 8 rows (a few KB). The output head stays MLX's (a 262,144-row
product and the compiled softcap: the kernel would save one launch per token on the largest
read of all, which MLX's tuned qmv streams).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import mlx.core as mx

from .activations import geglu
from .backend import CHECK_KEY, KernelOp
from .operands import VALUES_PER_LANE, Matrix, Norm, float_constants, placeholder
from .spec import Kernels, KernelSpec, Launch
from .tolerance import normwise_mismatch

SIMD_WIDTH = 32
ROWS = 4
SIMDGROUPS = 2
MAX_MATRICES = 3
FLOATS = (mx.float32, mx.bfloat16, mx.float16)

HEADERS = ("norm.h", "projection.h")
PROJECTION = KernelSpec(
    "projection",
    ("x", "norm_w", "params", "rows", "w0", "s0", "b0", "w1", "s1", "b1", "w2", "s2", "b2"),
    ("y",),
    "projection.metal",
    HEADERS,
)
PROJECTION_GEGLU = KernelSpec(
    "projection_geglu",
    ("x", "norm_w", "params", "w0", "s0", "b0", "w1", "s1", "b1"),
    ("y",),
    "projection_geglu.metal",
    HEADERS,
)


# --- references: the model's composed code ---------------------------------------------------


def project_reference(
    x: mx.array,
    matrices: Sequence[Matrix],
    norm: Norm | None = None,
    out_dtype: mx.Dtype | None = None,
    float32_sums: bool = False,
) -> tuple[mx.array, ...]:
    """`float32_sums`: the products summed in float32 (`Matrix.float32_product`), what the
    self-check compares the kernel with."""
    n = x if norm is None else norm(x)
    ys = (m.float32_product(n) if float32_sums else m(n) for m in matrices)
    return tuple(y if out_dtype is None else y.astype(out_dtype) for y in ys)


def geglu_reference(
    x: mx.array,
    gate: Matrix,
    up: Matrix | mx.array,
    norm: Norm | None = None,
    float32_sums: bool = False,
) -> mx.array:
    n = x if norm is None else norm(x)
    if float32_sums:
        g = gate.float32_product(n)
        return geglu(g, up.float32_product(n) if isinstance(up, Matrix) else up)
    return geglu(gate(n), up(n) if isinstance(up, Matrix) else up)


# --- launches ---------------------------------------------------------------------------------


def norm_params(norm: Norm | None, dtype: mx.Dtype) -> mx.array:
    """[eps, offset, scale] as the kernels read them (a cached constant)."""
    if norm is None:
        return float_constants((0.0, 0.0, 1.0))
    return float_constants((norm.eps, *norm.constants(dtype)))


def _matrix_inputs(m: Matrix | None) -> list[mx.array]:
    if m is None:
        return [placeholder()] * 3
    if not m.quantized:
        return [m.weight, placeholder(), placeholder()]
    return [m.weight, m.scales, m.biases]


def _grid(simdgroups: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    threads = SIMD_WIDTH * SIMDGROUPS
    return (threads, -(-simdgroups // SIMDGROUPS), 1), (threads, 1, 1)


def _template(m: Matrix, norm: Norm | None) -> list[tuple[str, object]]:
    """The instantiation's arguments besides the dtypes; sizes are read at run time (one
    build serves every layer shape)."""
    bits, group = m.kernel_form()
    return [("BITS", bits), ("GROUP", group), ("ROWS", ROWS), ("NORM", norm is not None)]


@cache
def _rows(rows: tuple[int, ...]) -> mx.array:
    return mx.array(rows, mx.int32)


def projection_launch(
    x: mx.array,
    matrices: Sequence[Matrix],
    norm: Norm | None,
    out_dtype: mx.Dtype | None,
) -> Launch:
    K = x.shape[-1]
    rows = [m.rows for m in matrices] + [0] * (MAX_MATRICES - len(matrices))
    padded = list(matrices) + [None] * (MAX_MATRICES - len(matrices))
    norm_w = norm.weight if norm is not None else placeholder()
    inputs = [x.reshape(K), norm_w, norm_params(norm, x.dtype), _rows(tuple(rows))]
    for m in padded:
        inputs += _matrix_inputs(m)
    grid, threadgroup = _grid(sum(-(-n // ROWS) for n in rows))
    out = out_dtype or x.dtype
    return Launch(
        inputs=inputs,
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=((sum(rows),),),
        output_dtypes=(out,),
        template=[("T", x.dtype), ("OUT", out), *_template(matrices[0], norm)],
    )


def geglu_launch(x: mx.array, gate: Matrix, up: Matrix | mx.array, norm: Norm | None) -> Launch:
    K, N = x.shape[-1], gate.rows
    norm_w = norm.weight if norm is not None else placeholder()
    up_inputs = (
        _matrix_inputs(up) if isinstance(up, Matrix) else [up.reshape(N)] + [placeholder()] * 2
    )
    grid, threadgroup = _grid(-(-N // ROWS))
    return Launch(
        inputs=[
            x.reshape(K),
            norm_w,
            norm_params(norm, x.dtype),
            *_matrix_inputs(gate),
            *up_inputs,
        ],
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=((N,),),
        output_dtypes=(x.dtype,),
        template=[
            ("T", x.dtype),
            *_template(gate, norm),
            ("UP_MATRIX", isinstance(up, Matrix)),
        ],
    )


def _split(y: mx.array, lead: tuple[int, ...], rows: Sequence[int]) -> tuple[mx.array, ...]:
    """The concatenated output as each matrix's [*lead, N_i] (views)."""
    out, start = [], 0
    for n in rows:
        out.append(y[start : start + n].reshape(*lead, n))
        start += n
    return tuple(out)


def _projection_kernel(kernels: Kernels, x, matrices, norm, out_dtype) -> tuple[mx.array, ...]:
    (y,) = kernels.run(PROJECTION, projection_launch(x, matrices, norm, out_dtype))
    return _split(y, x.shape[:-1], [m.rows for m in matrices])


def _geglu_kernel(kernels: Kernels, x, gate, up, norm) -> mx.array:
    (y,) = kernels.run(PROJECTION_GEGLU, geglu_launch(x, gate, up, norm))
    return y.reshape(*x.shape[:-1], gate.rows)


# --- self-check inputs ------------------------------------------------------------------------


def random_matrix(m: Matrix, key: mx.array) -> Matrix:
    """A matrix of `m`'s shape, dtype and quantization with random entries."""
    a, b, c = mx.random.split(key, 3)
    if not m.quantized:
        return Matrix(mx.random.normal(m.weight.shape, key=a).astype(m.dtype) * 0.05)
    return Matrix(
        random_words(m.weight.shape, a),
        mx.random.uniform(0.002, 0.02, m.scales.shape, key=b).astype(m.dtype),
        mx.random.uniform(-0.1, 0.1, m.biases.shape, key=c).astype(m.dtype),
        m.group_size,
        m.bits,
        m.mode,
    )


def random_words(shape: tuple[int, ...], key: mx.array) -> mx.array:
    """uint32 words of random bits (packed codes of every value)."""
    *lead, words = shape
    return mx.random.randint(0, 256, (*lead, 4 * words), mx.uint8, key=key).view(mx.uint32)


def random_norm(norm: Norm | None, key: mx.array) -> Norm | None:
    if norm is None or norm.weight is None:
        return norm
    weight = mx.random.uniform(0.5, 1.5, norm.weight.shape, key=key).astype(norm.weight.dtype)
    return Norm(weight, norm.eps, norm.offset, norm.scale)


def _projection_check_args(x, matrices, norm, out_dtype) -> tuple:
    keys = mx.random.split(CHECK_KEY, len(matrices) + 2)
    x = mx.random.normal(x.shape, key=keys[0]).astype(x.dtype)
    matrices = tuple(random_matrix(m, k) for m, k in zip(matrices, keys[2:], strict=True))
    return x, matrices, random_norm(norm, keys[1]), out_dtype


def _geglu_check_args(x, gate, up, norm) -> tuple:
    a, b, c, d = mx.random.split(CHECK_KEY, 4)
    x = mx.random.normal(x.shape, key=a).astype(x.dtype)
    if isinstance(up, Matrix):
        up = random_matrix(up, c)
    else:
        up = mx.random.normal(up.shape, key=c).astype(up.dtype)
    return x, random_matrix(gate, b), up, random_norm(norm, d)


def _forms(matrices: Sequence[Matrix]) -> tuple:
    return tuple((m.rows, m.columns, m.kernel_form(), m.dtype) for m in matrices)


_projection = KernelOp(
    "projection",
    _projection_kernel,
    project_reference,
    instance=lambda x, matrices, norm, out_dtype: (
        x.dtype,
        _forms(matrices),
        norm is None,
        out_dtype,
    ),
    check_args=_projection_check_args,
    accepts=lambda got, args: normwise_mismatch(
        got, project_reference(*args, float32_sums=True), args[0].dtype
    ),
)

_projection_geglu = KernelOp(
    "projection.geglu",
    _geglu_kernel,
    geglu_reference,
    instance=lambda x, gate, up, norm: (
        x.dtype,
        _forms([gate]),
        _forms([up]) if isinstance(up, Matrix) else up.dtype,
        norm is None,
    ),
    check_args=_geglu_check_args,
    accepts=lambda got, args: normwise_mismatch(
        got, geglu_reference(*args, float32_sums=True), args[0].dtype
    ),
)


# --- entry points -----------------------------------------------------------------------------


def _kernel_reads(x: mx.array, matrices: Sequence[Matrix], norm: Norm | None) -> bool:
    """Whether the kernels cover these operands: one input row of a float dtype, every matrix
    [N, K] of that dtype in one form the kernels read, K in whole 16-value runs, a weighted
    norm of that dtype."""
    K = x.shape[-1]
    forms = {m.kernel_form() for m in matrices}
    return (
        x.size == K
        and x.dtype in FLOATS
        and K % VALUES_PER_LANE == 0
        and len(forms) == 1
        and None not in forms
        and all(m.columns == K and m.dtype == x.dtype and m.rows > 0 for m in matrices)
        and (norm is None or (norm.weight is not None and norm.weight.dtype == x.dtype))
    )


def project(
    x: mx.array,
    matrices: Sequence[Matrix],
    norm: Norm | None = None,
    out_dtype: mx.Dtype | None = None,
) -> tuple[mx.array, ...]:
    """`matrix(norm(x))` for each matrix (x [..., K] -> [..., N_i]), cast to `out_dtype` when
    given (float32 only): one kernel launch for a single row."""
    matrices = tuple(matrices)
    if not 0 < len(matrices) <= MAX_MATRICES:
        raise ValueError(f"project: 1 to {MAX_MATRICES} matrices, got {len(matrices)}")
    wider = out_dtype is not None and out_dtype != mx.float32
    if wider or not _kernel_reads(x, matrices, norm):
        return project_reference(x, matrices, norm, out_dtype)
    return _projection(x, matrices, norm, out_dtype)


def project_geglu(
    x: mx.array, gate: Matrix, up: Matrix | mx.array, norm: Norm | None = None
) -> mx.array:
    """geglu(gate(norm(x)), up(norm(x))), or geglu(gate(norm(x)), up) for an array `up` of the
    gate's output shape: one kernel launch for a single row."""
    vector_up = isinstance(up, mx.array)
    matrices = [gate] if vector_up else [gate, up]
    covered = _kernel_reads(x, matrices, norm) and (
        not vector_up or (up.size == gate.rows and up.dtype == x.dtype)
    )
    if not covered:
        return geglu_reference(x, gate, up, norm)
    return _projection_geglu(x, gate, up, norm)
