"""The centroid-masked drafter head, greedy, in one kernel (`metal/drafter_head.metal`).

E2B/E4B assistants score 2048 token clusters, keep the best 32 and compute the logits of only
their 32 * 128 tokens. For a greedy draft the kernel goes from the centroid scores to the token
in one launch; the composed-MLX reference below (also the kernel's test oracle) is the
assistant's own head (`gemma4_assistant.MaskedEmbedder`) followed by an argmax, with the order
made deterministic: equal centroid scores keep the lower centroid id, equal logits give the
lower token id (what an argmax over the full vocabulary row gives, as in transformers), and the
logits are float32 whatever the table's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from .backend import CHECK_KEY, KernelOp
from .spec import Kernels, KernelSpec, Launch, placeholder

SIMD_WIDTH = 32
MAX_THREADS = 1024
# drafter_head.metal marks taken centroids in one 64-bit mask per thread.
MAX_CENTROIDS = MAX_THREADS * 64
ROWS_PER_SIMDGROUP = 4  # fewer candidates than this per SIMD-group: use fewer threads
KERNEL_BITS = (2, 4, 8)  # affine widths whose codes never straddle a uint32
LAST_ID = 2**31 - 1  # above every token id

HEAD = KernelSpec(
    "drafter_head",
    ("scores", "z", "ordering", "weight", "scales", "biases"),
    ("tokens",),
    "drafter_head.metal",
)


class HeadTable(NamedTuple):
    """The head's weight rows: float [rows, D], or quantized in MLX's layout (weight [rows,
    D * bits / 32] uint32, scales and biases [rows, D / group_size])."""

    weight: mx.array
    scales: mx.array | None = None
    biases: mx.array | None = None
    group_size: int = 0
    bits: int = 0
    mode: str = "affine"

    @classmethod
    def of(cls, module: nn.Module) -> HeadTable:
        """The table of an `nn.Embedding`, `nn.Linear` or their quantized forms."""
        if "scales" not in module:
            return cls(module.weight)
        return cls(
            module.weight,
            module.scales,
            module.get("biases"),
            module.group_size,
            module.bits,
            module.mode,
        )

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    @property
    def width(self) -> int:
        """D, the length of a row."""
        return self.weight.shape[-1] * 32 // self.bits if self.quantized else self.weight.shape[-1]

    def rows(self, ids: mx.array) -> mx.array:
        """Rows `ids` in float32 (dequantized with float32 scales and biases)."""
        if not self.quantized:
            return self.weight[ids].astype(mx.float32)
        biases = None if self.biases is None else self.biases[ids].astype(mx.float32)
        return mx.dequantize(
            self.weight[ids],
            self.scales[ids].astype(mx.float32),
            biases,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )

    @property
    def kernel_ready(self) -> bool:
        """Whether the kernel reads this layout: a float table, or affine 2/4/8-bit."""
        if not self.quantized:
            return mx.issubdtype(self.weight.dtype, mx.floating)
        return self.mode == "affine" and self.bits in KERNEL_BITS and self.biases is not None


def greedy_token_reference(
    scores: mx.array, z: mx.array, ordering: mx.array, table: HeadTable, top_k: int
) -> mx.array:
    """Token ids [N] int32 for centroid scores [N, C] and drafter states z [N, D]."""
    N, C = scores.shape
    top = mx.argsort(-scores, axis=-1)[:, :top_k]  # a stable sort keeps lower ids first on ties
    ids = ordering.reshape(C, -1)[top].reshape(N, -1)
    logits = (table.rows(ids) @ z.astype(mx.float32)[:, :, None]).squeeze(-1)
    best = logits.max(axis=-1, keepdims=True)
    tied = mx.where(logits == best, ids, LAST_ID)
    return tied.min(axis=-1).astype(mx.int32)


def threads_for(num_centroids: int, candidates: int) -> int:
    """One SIMD-group per ROWS_PER_SIMDGROUP candidates (1024 threads for 4096 candidates), and
    enough threads to hold the centroids 64 per thread."""
    simdgroups = max(-(-candidates // ROWS_PER_SIMDGROUP), -(-num_centroids // (64 * SIMD_WIDTH)))
    return SIMD_WIDTH * min(max(simdgroups, 1), MAX_THREADS // SIMD_WIDTH)


def head_launch(
    scores: mx.array, z: mx.array, ordering: mx.array, table: HeadTable, top_k: int
) -> Launch:
    """One threadgroup per row."""
    N, C = scores.shape
    threads = threads_for(C, top_k * (ordering.size // C))
    quantized = table.quantized
    return Launch(
        inputs=(
            scores,
            z,
            ordering,
            table.weight,
            table.scales if quantized else placeholder(),
            table.biases if quantized else placeholder(),
        ),
        grid=(threads, N, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=((N,),),
        output_dtypes=(mx.int32,),
        template=(
            ("K", top_k),
            ("TG", threads),
            ("PER_THREAD", -(-C // threads)),
            ("QUANTIZED", quantized),
            ("BITS", table.bits if quantized else 0),
            ("GROUP_SIZE", table.group_size if quantized else 1),
        ),
    )


def _head_kernel(kernels: Kernels, *args) -> mx.array:
    return kernels.run(HEAD, head_launch(*args))[0]


def random_table(like: HeadTable, key: mx.array) -> HeadTable:
    """A random table of `like`'s shapes, dtypes and quantization."""
    a, b, c = mx.random.split(key, 3)
    if not like.quantized:
        return like._replace(
            weight=mx.random.normal(like.weight.shape, key=a).astype(like.weight.dtype)
        )
    return like._replace(
        weight=mx.random.randint(0, 256, (*like.weight.shape, 4), mx.uint8, key=a)
        .view(mx.uint32)
        .squeeze(-1),
        scales=mx.random.uniform(0.01, 0.1, like.scales.shape, key=b).astype(like.scales.dtype),
        biases=mx.random.uniform(-0.5, 0.5, like.biases.shape, key=c).astype(like.biases.dtype),
    )


def _head_check_args(scores, z, ordering, table, top_k) -> tuple:
    keys = mx.random.split(CHECK_KEY, 4)
    return (
        mx.random.normal(scores.shape, key=keys[0]).astype(scores.dtype),
        mx.random.normal(z.shape, key=keys[1]).astype(z.dtype),
        mx.random.permutation(ordering.size, key=keys[2]).astype(ordering.dtype),
        random_table(table, keys[3]),
        top_k,
    )


def _instance(scores, z, ordering, table: HeadTable, top_k) -> tuple:
    quantization = (table.scales.dtype, table.group_size, table.bits) if table.quantized else None
    return (
        scores.shape,
        scores.dtype,
        z.dtype,
        ordering.shape,
        table.weight.dtype,
        quantization,
        top_k,
    )


_head = KernelOp(
    "drafter_head.greedy",
    _head_kernel,
    greedy_token_reference,
    instance=_instance,
    check_args=_head_check_args,
)


def greedy_token(
    scores: mx.array, z: mx.array, ordering: mx.array, table: HeadTable, top_k: int
) -> mx.array:
    """The greedy draft token [...] int32 of a centroid-masked head: centroid scores [..., C],
    normed drafter states z [..., D], `ordering` [C * cluster] the token ids cluster by cluster,
    `table` the head's rows, `top_k` the clusters kept."""
    C, D = scores.shape[-1], z.shape[-1]
    if scores.shape[:-1] != z.shape[:-1] or ordering.ndim != 1 or ordering.size % C:
        raise ValueError(
            f"drafter head: expected scores [..., C], z [..., D] and ordering [C * cluster], got "
            f"{scores.shape}, {z.shape} and {ordering.shape}"
        )
    if not 0 < top_k <= C:
        raise ValueError(f"drafter head: top_k = {top_k} must be in 1..{C} (the centroids)")
    if table.width != D:
        raise ValueError(f"drafter head: table rows have {table.width} values, z has {D}")
    lead = scores.shape[:-1]
    args = (scores.reshape(-1, C), z.reshape(-1, D), ordering, table, top_k)
    if not table.kernel_ready or C > MAX_CENTROIDS or scores.size == 0:
        return greedy_token_reference(*args).reshape(lead)
    return _head(*args).reshape(lead)
