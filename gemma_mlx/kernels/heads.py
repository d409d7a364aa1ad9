"""A decode step's attention heads in one launch (`metal/head_norm_rope.metal`).

After the q, k, v projections Gemma 4 RMS-normalizes every query and key head with its weight,
rotates both (RoPE: "default" on sliding layers, "proportional" partial rotation on full ones),
and RMS-normalizes every value head without a weight (with `attention_k_eq_v` the values are the
keys before their norm). Composed, that is five MLX kernels for a layer that owns its KV (two
norms, two RoPEs, the V norm), two for a KV-shared one; the kernel does all heads at once. Gemma 3
has no V norm: its values pass through.

The reference below is the model's composed code. The kernel takes one token (B = T = 1);
longer inputs take the reference. One SIMD-group per head, up to 8 per threadgroup.
"""

from __future__ import annotations

import math

import mlx.core as mx

from .backend import CHECK_KEY, KernelOp
from .operands import Norm, Rotary, float_constants, placeholder
from .projection import FLOATS, random_norm
from .spec import Kernels, KernelSpec, Launch
from .tolerance import normwise_mismatch

SIMD_WIDTH = 32
MAX_SIMDGROUPS = 8
# A float32 angle is position * inverse frequency, each rounded once: at position p two correct
# computations of it may differ by ~p * 2^-24 radians, which moves a rotated entry by as much.
ANGLE_ULP = 2.0**-24

HEADS = KernelSpec(
    "head_norm_rope",
    ("q", "k", "v", "q_w", "k_w", "freqs", "ints", "params"),
    ("q_out", "k_out", "v_out"),
    "head_norm_rope.metal",
    ("norm.h",),
)

Heads = tuple[mx.array, mx.array | None, mx.array | None]


def heads_reference(
    q: mx.array,
    k: mx.array | None,
    v: mx.array | None,
    q_norm: Norm,
    k_norm: Norm | None,
    v_norm: Norm | None,
    rotary: Rotary,
    position: int,
) -> Heads:
    """q [B, T, heads * D] -> [B, heads, T, D] normed and rotated; k likewise; v [B, kv heads, T,
    D] normed by `v_norm` (None: as they are), taken from k before its norm when v is None.
    Without k (a KV-shared layer): (q, None, None)."""
    B, T, _ = q.shape
    D = q_norm.size
    q = rotary(q_norm(q.reshape(B, T, -1, D)).transpose(0, 2, 1, 3), position)
    if k is None:
        return q, None, None
    keys = k.reshape(B, T, -1, D)
    values = keys if v is None else v.reshape(B, T, -1, D)
    if v_norm is not None:
        values = v_norm(values)
    return q, rotary(k_norm(keys).transpose(0, 2, 1, 3), position), values.transpose(0, 2, 1, 3)


def _params(q_norm, k_norm, v_norm, rotary, dtype) -> mx.array:
    k_values = [k_norm.eps, *k_norm.constants(dtype)] if k_norm is not None else [0.0] * 3
    log2_base = math.log2(rotary.base) if rotary.base is not None else 0.0
    return float_constants(
        (
            q_norm.eps,
            *q_norm.constants(dtype),
            *k_values,
            v_norm.eps if v_norm is not None else 0.0,
            rotary.scale,
            log2_base,
        )
    )


def heads_launch(q, k, v, q_norm, k_norm, v_norm, rotary, position) -> Launch:
    D = q_norm.size
    HQ, HK = q.size // D, 0 if k is None else k.size // D
    heads = HQ + 2 * HK
    simdgroups = min(MAX_SIMDGROUPS, heads)
    keys = [placeholder()] * 2 if k is None else [k.reshape(-1), k_norm.weight]
    return Launch(
        inputs=[
            q.reshape(-1),
            keys[0],
            placeholder() if v is None else v.reshape(-1),
            q_norm.weight,
            keys[1],
            placeholder() if rotary.freqs is None else rotary.freqs,
            mx.array([position, HQ, HK], mx.int32),
            _params(q_norm, k_norm, v_norm, rotary, q.dtype),
        ],
        grid=(SIMD_WIDTH * simdgroups, -(-heads // simdgroups), 1),
        threadgroup=(SIMD_WIDTH * simdgroups, 1, 1),
        output_shapes=((HQ, D), (HK, D) if HK else (1,), (HK, D) if HK else (1,)),
        output_dtypes=(q.dtype,) * 3,
        template=[
            ("T", q.dtype),
            ("D", D),
            ("V_INPUT", v is not None),
            ("V_NORM", v_norm is not None),
            ("FREQS", rotary.freqs is not None),
        ],
    )


def _heads_kernel(kernels: Kernels, q, k, v, q_norm, k_norm, v_norm, rotary, position) -> Heads:
    launch = heads_launch(q, k, v, q_norm, k_norm, v_norm, rotary, position)
    q_out, k_out, v_out = kernels.run(HEADS, launch)
    D = q_norm.size
    if k is None:
        return q_out.reshape(1, -1, 1, D), None, None
    return tuple(a.reshape(1, -1, 1, D) for a in (q_out, k_out, v_out))


def _check_args(q, k, v, q_norm, k_norm, v_norm, rotary, position) -> tuple:
    keys = mx.random.split(CHECK_KEY, 5)

    def like(a: mx.array | None, key: mx.array) -> mx.array | None:
        return None if a is None else (mx.random.normal(a.shape, key=key) * 3).astype(a.dtype)

    return (
        like(q, keys[0]),
        like(k, keys[1]),
        like(v, keys[2]),
        random_norm(q_norm, keys[3]),
        random_norm(k_norm, keys[4]),
        v_norm,
        rotary,
        position,
    )


def tolerance_mismatch(got: Heads, want: Heads, dtype: mx.Dtype, position: int) -> str | None:
    """`normwise_mismatch` widened by the angle's float32 uncertainty at `position`."""
    got = tuple(a for a in got if a is not None)
    want = tuple(a for a in want if a is not None)
    if len(got) != len(want):
        return f"the kernel gave {len(got)} outputs, the reference {len(want)}"
    return normwise_mismatch(got, want, dtype, extra=8 * position * ANGLE_ULP)


_heads = KernelOp(
    "attention_heads",
    _heads_kernel,
    heads_reference,
    instance=lambda q, k, v, q_norm, k_norm, v_norm, rotary, position: (
        q_norm.size,
        k is None,
        v is None,
        q.dtype,
        v_norm is None,
        rotary.freqs is None,
    ),
    check_args=_check_args,
    accepts=lambda got, args: tolerance_mismatch(
        got, heads_reference(*args), args[0].dtype, args[-1]
    ),
)


def _lanes_pair(D: int) -> bool:
    """Whether the kernel holds a head of D entries: RoPE partners in one lane (D / 2 a
    multiple of 32) or in lanes l and l ^ D / 2 (D a power of two up to 32)."""
    return D % 64 == 0 or (D in (2, 4, 8, 16, 32))


def attention_heads(
    q: mx.array,
    k: mx.array | None,
    v: mx.array | None,
    q_norm: Norm,
    k_norm: Norm | None,
    v_norm: Norm | None,
    rotary: Rotary,
    position: int,
) -> Heads:
    """The attention heads of `heads_reference`; one kernel launch for one token."""
    D = q_norm.size
    dtype = q.dtype
    norms = [q_norm] if k is None else [q_norm, k_norm]
    covered = (
        isinstance(position, int)
        and q.shape[:2] == (1, 1)
        and dtype in FLOATS
        and D is not None
        and _lanes_pair(D)
        and rotary.dims == D
        and all(n.weight is not None and n.weight.dtype == dtype for n in norms)
        and all(a is None or (a.dtype == dtype and a.shape[:2] == (1, 1)) for a in (k, v))
        and (v_norm is None or v_norm.weight is None)
    )
    if not covered:
        return heads_reference(q, k, v, q_norm, k_norm, v_norm, rotary, position)
    return _heads(q, k, v, q_norm, k_norm, v_norm, rotary, position)
