"""A layer's residual steps in one launch each (`metal/residual_norm.metal`).

Gemma's sandwich norms: every block's output is RMS-normed before it joins the residual stream,
and the next block starts with another RMSNorm of the sum. `residual` does both in one kernel:
out = (r + post_norm(a)) [* layer_scalar] and up to three norms of out. The layer calls it after
attention (out = h, normed: the MLP's input norm; with the MoE block also the experts' and the
router's), after the MLP (the residual sum the per-layer-input gate reads) and at its end (with
the layer scalar): one launch for two to five MLX kernels each time.

The reference below is the model's composed code. The kernel runs one threadgroup per row
(THREADS threads, each holding every THREADS-th entry, adjacent threads reading adjacent
entries): any number of rows, so decode steps, verify windows and prefill chunks alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from .backend import CHECK_KEY, KernelOp
from .operands import Norm, float_constants, placeholder
from .projection import FLOATS, random_norm
from .spec import Kernels, KernelSpec, Launch
from .tolerance import normwise_mismatch

SIMD_WIDTH = 32
MAX_THREADS = 256
MAX_NORMS = 3
PARAMS_PER_NORM = 3  # eps, offset, scale

RESIDUAL = KernelSpec(
    "residual_norm",
    ("r", "a", "post_w", "scalar", "w0", "w1", "w2", "params"),
    ("out", "normed"),
    "residual_norm.metal",
    ("norm.h",),
)


def residual_reference(
    r: mx.array,
    a: mx.array,
    post: Norm,
    scalar: mx.array | None = None,
    norms: Sequence[Norm] = (),
) -> tuple[mx.array, tuple[mx.array, ...]]:
    out = r + post(a)
    if scalar is not None:
        out = out * scalar
    return out, tuple(n(out) for n in norms)


def _params(norms: Sequence[Norm], dtype: mx.Dtype) -> mx.array:
    values: list[float] = []
    for n in norms:
        values += [n.eps, *n.constants(dtype)]
    values += [0.0] * (PARAMS_PER_NORM * (1 + MAX_NORMS) - len(values))
    return float_constants(tuple(values))


def residual_launch(r, a, post, scalar, norms) -> Launch:
    H = r.shape[-1]
    rows = r.size // H
    threads = min(MAX_THREADS, -(-H // SIMD_WIDTH) * SIMD_WIDTH)
    weights = [n.weight for n in norms] + [placeholder()] * (MAX_NORMS - len(norms))
    return Launch(
        inputs=[
            r.reshape(rows, H),
            a.reshape(rows, H),
            post.weight,
            placeholder() if scalar is None else scalar.reshape(1),
            *weights,
            _params([post, *norms], r.dtype),
        ],
        grid=(threads, rows, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=((rows, H), (len(norms), rows, H) if norms else (1,)),
        output_dtypes=(r.dtype, r.dtype),
        template=[
            ("T", r.dtype),
            ("THREADS", threads),
            ("PER_THREAD", -(-H // threads)),
            ("SCALAR", scalar is not None),
            ("NORMS", len(norms)),
        ],
    )


def _residual_kernel(kernels: Kernels, r, a, post, scalar, norms):
    out, normed = kernels.run(RESIDUAL, residual_launch(r, a, post, scalar, norms))
    planes = (normed[i : i + 1].reshape(r.shape) for i in range(len(norms)))  # views
    return out.reshape(r.shape), tuple(planes)


def _check_args(r, a, post, scalar, norms) -> tuple:
    keys = mx.random.split(CHECK_KEY, 4 + len(norms))
    return (
        mx.random.normal(r.shape, key=keys[0]).astype(r.dtype),
        (mx.random.normal(a.shape, key=keys[1]) * 4).astype(a.dtype),
        random_norm(post, keys[2]),
        None
        if scalar is None
        else mx.random.uniform(0.5, 2, scalar.shape, key=keys[3]).astype(scalar.dtype),
        tuple(random_norm(n, k) for n, k in zip(norms, keys[4:], strict=True)),
    )


def _flatten(result: tuple[mx.array, tuple[mx.array, ...]]) -> tuple[mx.array, ...]:
    return (result[0], *result[1])


_residual = KernelOp(
    "residual_norm",
    _residual_kernel,
    residual_reference,
    instance=lambda r, a, post, scalar, norms: (
        r.shape[-1],
        r.dtype,
        scalar is None,
        len(norms),
    ),
    check_args=_check_args,
    accepts=lambda got, args: normwise_mismatch(
        _flatten(got), _flatten(residual_reference(*args)), args[0].dtype
    ),
)


def residual(
    r: mx.array,
    a: mx.array,
    post: Norm,
    scalar: mx.array | None = None,
    norms: Sequence[Norm] = (),
) -> tuple[mx.array, tuple[mx.array, ...]]:
    """(out, norms of out) for out = (r + post(a)) * scalar (no scalar: 1), r and a [..., H]:
    one kernel launch."""
    norms = tuple(norms)
    if len(norms) > MAX_NORMS:
        raise ValueError(f"residual: at most {MAX_NORMS} norms of the sum, got {len(norms)}")
    dtype = r.dtype
    covered = (
        r.shape == a.shape
        and r.size > 0
        and dtype in FLOATS
        and a.dtype == dtype
        and all(n.weight is not None and n.weight.dtype == dtype for n in (post, *norms))
        and (scalar is None or (scalar.size == 1 and scalar.dtype == dtype))
    )
    if not covered:
        return residual_reference(r, a, post, scalar, norms)
    return _residual(r, a, post, scalar, norms)
