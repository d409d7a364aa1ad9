"""A layer's residual steps in one launch each (`metal/residual_norm.metal`,
`metal/moe_residual.metal`).

Gemma's sandwich norms: every block's output is RMS-normed before it joins the residual stream,
and the next block starts with another RMSNorm of the sum. `residual` does both in one kernel:
out = (r + post_norm(a)) [* layer_scalar] and up to three norms of out. The layer calls it after
attention (out = h, normed: the MLP's input norm; with the MoE block also the experts'), after
the MLP (the residual sum the per-layer-input gate reads) and at its end (with
the layer scalar): one launch for two to four MLX kernels each time. With the MoE block (26B-A4B)
`moe_residual` ends the layer: the experts' outputs weighted by the router and summed, the MLP's
and the experts' post-norms, their sum's post-norm into the residual stream and the layer scalar,
one launch for nine MLX kernels.

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


# --- after the MoE block ----------------------------------------------------------------------

MOE_RESIDUAL = KernelSpec(
    "moe_residual",
    ("h", "m", "y", "weights", "post1_w", "post2_w", "post_w", "scalar", "params"),
    ("out",),
    "moe_residual.metal",
    ("norm.h",),
)


def moe_residual_reference(
    h: mx.array,
    m: mx.array,
    y: mx.array,
    weights: mx.array,
    post1: Norm,
    post2: Norm,
    post: Norm,
    scalar: mx.array | None = None,
) -> mx.array:
    """(h + post(post1(m) + post2(e))) * scalar, e the experts' outputs y [N, k, H] weighted by
    the router's `weights` [..., k] and summed, as the model composes them."""
    e = (y * mx.expand_dims(weights.reshape(y.shape[:-1]), -1).astype(y.dtype)).sum(axis=-2)
    f = post1(m) + post2(e.reshape(m.shape))
    out = h + post(f)
    return out if scalar is None else out * scalar


def moe_residual_launch(h, m, y, weights, post1, post2, post, scalar) -> Launch:
    H = h.shape[-1]
    rows, k = y.shape[0], y.shape[1]
    threads = min(MAX_THREADS, -(-H // SIMD_WIDTH) * SIMD_WIDTH)
    return Launch(
        inputs=[
            h.reshape(rows, H),
            m.reshape(rows, H),
            y,
            weights.reshape(rows, k),
            post1.weight,
            post2.weight,
            post.weight,
            placeholder() if scalar is None else scalar.reshape(1),
            _params([post1, post2, post], h.dtype),
        ],
        grid=(threads, rows, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=((rows, H),),
        output_dtypes=(h.dtype,),
        template=[
            ("T", h.dtype),
            ("THREADS", threads),
            ("PER_THREAD", -(-H // threads)),
            ("SCALAR", scalar is not None),
        ],
    )


def _moe_kernel(kernels: Kernels, h, m, y, weights, post1, post2, post, scalar) -> mx.array:
    launch = moe_residual_launch(h, m, y, weights, post1, post2, post, scalar)
    (out,) = kernels.run(MOE_RESIDUAL, launch)
    return out.reshape(h.shape)


def _moe_check_args(h, m, y, weights, post1, post2, post, scalar) -> tuple:
    keys = mx.random.split(CHECK_KEY, 8)
    w = mx.random.uniform(0.1, 1.0, weights.shape, key=keys[3])
    return (
        mx.random.normal(h.shape, key=keys[0]).astype(h.dtype),
        (mx.random.normal(m.shape, key=keys[1]) * 4).astype(m.dtype),
        (mx.random.normal(y.shape, key=keys[2]) * 4).astype(y.dtype),
        (w / w.sum(axis=-1, keepdims=True)).astype(weights.dtype),
        random_norm(post1, keys[4]),
        random_norm(post2, keys[5]),
        random_norm(post, keys[6]),
        None
        if scalar is None
        else mx.random.uniform(0.5, 2, scalar.shape, key=keys[7]).astype(scalar.dtype),
    )


_moe_residual = KernelOp(
    "moe_residual",
    _moe_kernel,
    moe_residual_reference,
    instance=lambda h, m, y, weights, post1, post2, post, scalar: (
        h.shape[-1],
        h.dtype,
        scalar is None,
    ),
    check_args=_moe_check_args,
    accepts=lambda got, args: normwise_mismatch(got, moe_residual_reference(*args), args[0].dtype),
)


def moe_residual(
    h: mx.array,
    m: mx.array,
    y: mx.array,
    weights: mx.array,
    post1: Norm,
    post2: Norm,
    post: Norm,
    scalar: mx.array | None = None,
) -> mx.array:
    """`moe_residual_reference`: h, m [..., H] (N rows), y [N, k, H] the experts' outputs,
    weights [..., k] float32; one kernel launch."""
    dtype = h.dtype
    H = h.shape[-1]
    rows = h.size // H if H else 0
    covered = (
        rows > 0
        and dtype in FLOATS
        and m.shape == h.shape
        and m.dtype == y.dtype == dtype
        and y.ndim == 3
        and y.shape[0] == rows
        and y.shape[2] == H
        and weights.size == rows * y.shape[1]
        and weights.dtype == mx.float32
        and all(n.weight is not None and n.weight.dtype == dtype for n in (post1, post2, post))
        and (scalar is None or (scalar.size == 1 and scalar.dtype == dtype))
    )
    if not covered:
        return moe_residual_reference(h, m, y, weights, post1, post2, post, scalar)
    return _moe_residual(h, m, y, weights, post1, post2, post, scalar)
