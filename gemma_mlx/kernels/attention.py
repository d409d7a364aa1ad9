"""Decode attention for head sizes MLX's fused attention does not cover, in two launches.

MLX 0.32's one-token attention kernel (`sdpa_vector`) takes heads of 64, 96, 128 or 256
entries; Gemma 4's full-attention layers have 512, so MLX composes them: the query scaled,
scores as a matmul, a softmax, a second matmul (four kernels, the scores and weights rounded to
the model's dtype in between). Here (`metal/attention_chunks.metal`, `attention_combine.metal`)
launch 1 splits the cached positions into chunks of CHUNK, one threadgroup per chunk and group
of query heads that share a KV head, and computes the chunk's online softmax and weighted values
in float32; launch 2 merges the chunks per head. The keys and values are read where the cache
holds them (strided slices, no copy), each chunk once for all the query heads of its KV head.

`attention` is what the models call: it sends keys and values read from a quantized cache
(`QuantizedKeys`, `QuantizedKV`) to `quantized_attention` (MLX's quantized matmuls; the fused kernel here takes
dense caches only) and everything else to `decode_attention`.

The reference is the model's composed code (`mx.fast.scaled_dot_product_attention`), which is
also what runs for every shape the kernel does not take: more than one query position, a mask,
a head size MLX covers. The self-check compares with the reference computed in float32, since
the composed path rounds scores to the model's dtype.
"""

from __future__ import annotations

import mlx.core as mx

from .backend import CHECK_KEY, KernelOp
from .operands import float_constants
from .projection import FLOATS
from .quantized_attention import QuantizedKeys, QuantizedKV, quantized_attention
from .spec import Kernels, KernelSpec, Launch
from .tolerance import normwise_mismatch

SIMD_WIDTH = 32
CHUNK = 128  # positions per threadgroup: 256 KB of a 512-wide bfloat16 head's keys and values
MAX_SIMDGROUPS = 8
# Head sizes of MLX 0.32's fused one-token attention (mlx/backend/metal/
# scaled_dot_product_attention.cpp, sdpa_vector): those layers keep MLX's kernel.
MLX_VECTOR_HEAD_DIMS = frozenset({64, 96, 128, 256})

CHUNKS = KernelSpec(
    "attention_chunks",
    ("q", "k", "v", "params"),
    ("partial", "stats"),
    "attention_chunks.metal",
    (),
    row_contiguous=False,
)
COMBINE = KernelSpec(
    "attention_combine",
    ("partial", "stats"),
    ("out",),
    "attention_combine.metal",
    (),
)


def attention_reference(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: str | mx.array | None = None
) -> mx.array:
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def float32_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """The reference in float32, rounded to q's dtype: what the kernel approximates."""
    wide = [a.astype(mx.float32) for a in (q, k, v)]
    return attention_reference(*wide, scale).astype(q.dtype)


def simdgroups(group: int) -> int:
    """Query heads per threadgroup: the largest divisor of the GQA group up to MAX_SIMDGROUPS."""
    return max(n for n in range(1, MAX_SIMDGROUPS + 1) if group % n == 0)


def chunks_launch(q: mx.array, k: mx.array, v: mx.array, scale: float) -> Launch:
    _, HQ, _, D = q.shape
    HKV, L = k.shape[1], k.shape[2]
    chunks = -(-L // CHUNK)
    sg = simdgroups(HQ // HKV)
    return Launch(
        inputs=[q.reshape(HQ * D), k, v, float_constants((scale,))],  # q: 1-D, contiguous
        grid=(SIMD_WIDTH * sg, HQ // sg, chunks),
        threadgroup=(SIMD_WIDTH * sg, 1, 1),
        output_shapes=((HQ, chunks, D), (HQ, chunks, 2)),
        output_dtypes=(mx.float32, mx.float32),
        template=[
            ("T", q.dtype),
            ("D", D),
            ("CHUNK", CHUNK),
            ("SIMDGROUPS", sg),
        ],
    )


def combine_launch(partial: mx.array, stats: mx.array, dtype: mx.Dtype) -> Launch:
    """One SIMD-group per threadgroup and query head: the heads' chunks spread over cores."""
    HQ, _, D = partial.shape
    return Launch(
        inputs=[partial, stats],
        grid=(SIMD_WIDTH, HQ, 1),
        threadgroup=(SIMD_WIDTH, 1, 1),
        output_shapes=((HQ, D),),
        output_dtypes=(dtype,),
        template=[("T", dtype), ("D", D)],
    )


def _attention_kernel(kernels: Kernels, q, k, v, scale, mask) -> mx.array:
    partial, stats = kernels.run(CHUNKS, chunks_launch(q, k, v, scale))
    (out,) = kernels.run(COMBINE, combine_launch(partial, stats, q.dtype))
    return out.reshape(q.shape)


def _check_args(q, k, v, scale, mask) -> tuple:
    a, b, c = mx.random.split(CHECK_KEY, 3)
    return (
        mx.random.normal(q.shape, key=a).astype(q.dtype),
        mx.random.normal(k.shape, key=b).astype(k.dtype),
        mx.random.normal(v.shape, key=c).astype(v.dtype),
        1.0 / q.shape[-1] ** 0.5,  # scores of order 1: large enough to rank, small enough for
        mask,  # the float32 reference to tell a misplaced value from rounding
    )


_attention = KernelOp(
    "decode_attention",
    _attention_kernel,
    attention_reference,
    instance=lambda q, k, v, scale, mask: (
        q.shape[-1],
        simdgroups(q.shape[1] // k.shape[1]),
        q.dtype,
    ),
    check_args=_check_args,
    accepts=lambda got, args: normwise_mismatch(got, float32_attention(*args[:4]), args[0].dtype),
)


def kernel_covers(q: mx.array, k: mx.array, v: mx.array, mask) -> bool:
    """One query position of one sequence, no mask, a head size MLX's kernel does not take
    (the kernel holds D / 32 entries per lane: up to 1024)."""
    B, HQ, T, D = q.shape
    return (
        mask is None
        and B == 1
        and T == 1
        and D not in MLX_VECTOR_HEAD_DIMS
        and D <= 1024
        and q.dtype in FLOATS
        and k.dtype == v.dtype == q.dtype
        and k.ndim == v.ndim == 4
        and k.shape == v.shape
        and k.shape[0] == 1
        and k.shape[2] > 0
        and k.shape[3] == D
        and HQ % k.shape[1] == 0
    )


def decode_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: str | mx.array | None = None
) -> mx.array:
    """`mx.fast.scaled_dot_product_attention(q, k, v, scale, mask)`, q [B, heads, T, D] against
    k, v [B, kv heads, positions, D]; two kernel launches for one query of a head size MLX's
    fused attention does not take."""
    if not kernel_covers(q, k, v, mask):
        return attention_reference(q, k, v, scale, mask)
    return _attention(q, k, v, scale, mask)


def attention(
    q: mx.array,
    k: mx.array | QuantizedKeys,
    v: mx.array | QuantizedKV,
    scale: float,
    mask: str | mx.array | None = None,
) -> mx.array:
    """Attention of q [B, heads, T, D] over cached k, v, dense or quantized."""
    if isinstance(k, QuantizedKeys):
        return quantized_attention(q, k, v, scale, mask)
    return decode_attention(q, k, v, scale, mask)
