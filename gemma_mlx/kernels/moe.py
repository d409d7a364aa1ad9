"""MoE routing and dispatch: one kernel each on Metal (`metal/route.metal`, `metal/dispatch.metal`).

`route` turns router logits into the top-k experts and their weights; `dispatch` groups the
(token, expert) pairs by expert so that `gather_qmm(..., sorted_indices=True)` can read each
selected expert's weights once per step. Grouping pays only where MLX then switches kernels
(`dispatch_pays`). Elsewhere both are the composed-MLX references below, which are also the
kernels' test oracle.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx

from .backend import CHECK_KEY, KernelOp
from .spec import Kernels, KernelSpec, Launch

SIMD_WIDTH = 32
# route.metal keeps PER_LANE logits per lane and marks the taken ones in a 64-bit mask.
MAX_ROUTE_EXPERTS = SIMD_WIDTH * 64
DISPATCH_THREADS = 256
# MLX's Metal `gather_qmm` runs its sorted kernel (`gather_qmm_rhs`, a run of rows per expert
# against weights read once) only for single-row products with B >= 16 pairs and B / E >= 4
# (mlx/backend/metal/quantized.cpp, GatherQMM::eval_gpu); below that it multiplies pair by pair
# (`gather_qmv`), sorted or not, and the CPU backend never uses the order.
SORTED_KERNEL_MIN_PAIRS = 16
SORTED_KERNEL_MIN_PAIRS_PER_EXPERT = 4

ROUTE = KernelSpec("moe_route", ("logits", "scale"), ("weights", "ids"), "route.metal")
DISPATCH = KernelSpec(
    "moe_dispatch",
    ("ids",),
    ("order", "inverse_order", "expert_offsets", "sorted_ids", "sorted_tokens"),
    "dispatch.metal",
)


# --- route ----------------------------------------------------------------------------------


def route_reference(
    logits: mx.array, per_expert_scale: mx.array, k: int
) -> tuple[mx.array, mx.array]:
    """(weights [T, k] float32, expert ids [T, k] uint32) for logits [T, E]: the k largest logits
    in descending order (equal logits: the lower expert id first), their softmax times the expert's
    scale."""
    ids = mx.argsort(-logits, axis=-1)[..., :k]  # a stable sort keeps lower ids first on ties
    top = mx.take_along_axis(logits, ids, axis=-1).astype(mx.float32)
    weights = mx.softmax(top, axis=-1) * per_expert_scale[ids].astype(mx.float32)
    return weights, ids.astype(mx.uint32)


def route_launch(logits: mx.array, per_expert_scale: mx.array, k: int) -> Launch:
    """One SIMD-group per token."""
    T, E = logits.shape
    return Launch(
        inputs=(logits, per_expert_scale),
        grid=(SIMD_WIDTH, T, 1),
        threadgroup=(SIMD_WIDTH, 1, 1),
        output_shapes=((T, k), (T, k)),
        output_dtypes=(mx.float32, mx.uint32),
        template=(("K", k), ("PER_LANE", -(-E // SIMD_WIDTH))),
    )


def _route_kernel(kernels: Kernels, logits, per_expert_scale, k) -> tuple[mx.array, mx.array]:
    weights, ids = kernels.run(ROUTE, route_launch(logits, per_expert_scale, k))
    return weights, ids


def _route_check_args(logits, per_expert_scale, k) -> tuple:
    T, E = logits.shape
    a, b = mx.random.split(CHECK_KEY)
    return (
        mx.random.normal((T, E), key=a).astype(logits.dtype),
        mx.random.uniform(0.5, 2.0, (E,), key=b).astype(per_expert_scale.dtype),
        k,
    )


_route = KernelOp(
    "moe.route",
    _route_kernel,
    route_reference,
    instance=lambda logits, scale, k: (logits.shape, logits.dtype, scale.dtype, k),
    check_args=_route_check_args,
)


def route(logits: mx.array, per_expert_scale: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """(weights [..., k] float32, expert ids [..., k] uint32) for router logits [..., E]."""
    E = logits.shape[-1]
    if not 0 < k <= E:
        raise ValueError(f"moe route: top_k = {k} must be in 1..{E} (the number of experts)")
    if E > MAX_ROUTE_EXPERTS or logits.size == 0:
        return route_reference(logits, per_expert_scale, k)
    weights, ids = _route(logits.reshape(-1, E), per_expert_scale, k)
    lead = logits.shape[:-1]
    return weights.reshape(*lead, k), ids.reshape(*lead, k)


# --- dispatch -------------------------------------------------------------------------------


class Dispatch(NamedTuple):
    """The T*k (token, slot) pairs of `ids` [T, k], pair i = t*k + j, stably sorted by expert."""

    order: mx.array  # [N] uint32: the pair at each sorted position
    inverse_order: mx.array  # [N] uint32: the sorted position of each pair
    expert_offsets: mx.array  # [E + 1] uint32: first position of each expert; [E] = N
    sorted_ids: mx.array  # [N] uint32: the expert at each position
    sorted_tokens: mx.array  # [N] uint32: the token at each position


def dispatch_reference(ids: mx.array, num_experts: int) -> Dispatch:
    k = ids.shape[1]
    flat = ids.flatten().astype(mx.uint32)
    order = mx.argsort(flat).astype(mx.uint32)  # stable: pairs of one expert keep their order
    counts = (flat[:, None] == mx.arange(num_experts, dtype=mx.uint32)).astype(mx.uint32).sum(0)
    offsets = mx.concatenate([mx.zeros((1,), mx.uint32), mx.cumsum(counts)]).astype(mx.uint32)
    return Dispatch(
        order=order,
        inverse_order=mx.argsort(order).astype(mx.uint32),
        expert_offsets=offsets,
        sorted_ids=flat[order],
        sorted_tokens=order // k,
    )


def dispatch_launch(ids: mx.array, num_experts: int) -> Launch:
    """One threadgroup: the whole sort is a few thousand pairs at most per step."""
    N = ids.size
    return Launch(
        inputs=(ids,),
        grid=(DISPATCH_THREADS, 1, 1),
        threadgroup=(DISPATCH_THREADS, 1, 1),
        output_shapes=((N,), (N,), (num_experts + 1,), (N,), (N,)),
        output_dtypes=(mx.uint32,) * 5,
        template=(("E", num_experts), ("TG", DISPATCH_THREADS)),
    )


def _dispatch_kernel(kernels: Kernels, ids, num_experts) -> Dispatch:
    return Dispatch(*kernels.run(DISPATCH, dispatch_launch(ids, num_experts)))


def _dispatch_check_args(ids, num_experts) -> tuple:
    ids = mx.random.randint(0, num_experts, ids.shape, key=CHECK_KEY).astype(ids.dtype)
    return ids, num_experts


_dispatch = KernelOp(
    "moe.dispatch",
    _dispatch_kernel,
    dispatch_reference,
    instance=lambda ids, num_experts: (ids.dtype, num_experts),
    check_args=_dispatch_check_args,
)


def dispatch_pays(pairs: int, num_experts: int) -> bool:
    """Whether grouping `pairs` (token, expert) pairs by expert changes the kernel MLX's
    `gather_qmm` runs: 512 pairs (64 tokens) for 26B-A4B's 128 experts and top 8, so a decoded
    token or a verify window multiplies its pairs unsorted (mlx-lm sorts from 64 pairs, where MLX
    still runs the unsorted kernel for 128 experts)."""
    return (
        pairs >= SORTED_KERNEL_MIN_PAIRS
        and pairs // num_experts >= SORTED_KERNEL_MIN_PAIRS_PER_EXPERT
    )


def dispatch(ids: mx.array, num_experts: int) -> Dispatch:
    """Group the pairs of expert ids [T, k] (each < num_experts) by expert, stably."""
    if ids.ndim != 2 or ids.size == 0:
        raise ValueError(f"moe dispatch: expected expert ids [T, k], got shape {ids.shape}")
    return _dispatch(ids, num_experts)
