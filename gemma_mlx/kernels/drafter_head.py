"""The centroid-masked drafter head, greedy, in two kernels (`metal/drafter_head.metal`,
`metal/drafter_head_pick.metal`).

E2B/E4B assistants score 2048 token clusters, keep the best 32 and compute the logits of only
their 32 * 128 tokens. For a greedy draft the kernels go from the centroid scores to the token
without the vocabulary-wide row: the first spreads the candidates over threadgroups of SLICE
each (a whole head reads 1.2 MB at 8 bits, 2 MB in bfloat16: too much for one threadgroup to
stream), each threadgroup finding the slice's best; the second picks the best of the slices
(Metal has no barrier across threadgroups). The composed-MLX reference below (also the kernels'
test oracle) is the assistant's own head (`gemma4_assistant.MaskedEmbedder`) followed by an
argmax, with the order made deterministic: equal centroid scores keep the lower centroid id,
equal logits give the lower token id (what an argmax over the full vocabulary row gives, as in
transformers), a NaN logit never wins, and the logits are float32 whatever the table's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from .backend import CHECK_KEY, KernelOp
from .spec import Kernels, KernelSpec, Launch, placeholder

SIMD_WIDTH = 32
# Threads per threadgroup, at most: Metal's device limit is 1024, but a pipeline allows fewer as
# its register use grows (`maxTotalThreadsPerThreadgroup`, which `mx.fast.metal_kernel` cannot
# query); 256 is the size Metal libraries treat as always allowed. Were it refused, MLX raises at
# evaluation and the self-check falls back to the reference.
MAX_THREADS = 256
# drafter_head.metal marks taken centroids in one 64-bit mask per thread, and ranks each
# SIMD-group's top_k best in threadgroup memory (8 bytes each, 16 KB at most).
MAX_CENTROIDS = MAX_THREADS * 64
MAX_TOP_K = 256
SLICE = 128  # candidates per threadgroup: 37 KB of an 8-bit E2B head's rows, 66 KB in bfloat16
ROWS_PER_SIMDGROUP = 4  # fewer candidates than this per SIMD-group: use fewer threads
KERNEL_BITS = (2, 4, 8)  # affine widths whose codes never straddle a uint32
LAST_ID = 2**31 - 1  # above every token id

HEAD = KernelSpec(
    "drafter_head",
    ("scores", "z", "ordering", "weight", "scales", "biases"),
    ("slice_logits", "slice_tokens"),
    "drafter_head.metal",
)
PICK = KernelSpec(
    "drafter_head_pick", ("slice_logits", "slice_tokens"), ("tokens",), "drafter_head_pick.metal"
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
    logits = mx.where(mx.isnan(logits), -mx.inf, logits)
    best = logits.max(axis=-1, keepdims=True)
    tied = mx.where(logits == best, ids, LAST_ID)
    return tied.min(axis=-1).astype(mx.int32)


def threads_for(num_centroids: int, candidates: int) -> int:
    """Threads per threadgroup: one SIMD-group per ROWS_PER_SIMDGROUP candidates of a slice (256
    for E2B's 4096 candidates), and enough to hold the centroids 64 per thread."""
    simdgroups = max(
        -(-min(candidates, SLICE) // ROWS_PER_SIMDGROUP),
        -(-num_centroids // (64 * SIMD_WIDTH)),
    )
    return SIMD_WIDTH * min(max(simdgroups, 1), MAX_THREADS // SIMD_WIDTH)


def head_launch(
    scores: mx.array, z: mx.array, ordering: mx.array, table: HeadTable, top_k: int
) -> Launch:
    """Threadgroup (s, n): slice s of row n's candidates."""
    N, C = scores.shape
    candidates = top_k * (ordering.size // C)
    threads = threads_for(C, candidates)
    slices = -(-candidates // SLICE)
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
        grid=(threads * slices, N, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=((N, slices), (N, slices)),
        output_dtypes=(mx.float32, mx.uint32),
        template=(
            ("K", top_k),
            ("TG", threads),
            ("PER_THREAD", -(-C // threads)),
            ("SLICE", SLICE),
            ("QUANTIZED", quantized),
            ("BITS", table.bits if quantized else 0),
            ("GROUP_SIZE", table.group_size if quantized else 1),
        ),
    )


def pick_launch(slice_logits: mx.array, slice_tokens: mx.array) -> Launch:
    """One SIMD-group per row."""
    N = slice_logits.shape[0]
    return Launch(
        inputs=(slice_logits, slice_tokens),
        grid=(SIMD_WIDTH, N, 1),
        threadgroup=(SIMD_WIDTH, 1, 1),
        output_shapes=((N,),),
        output_dtypes=(mx.int32,),
    )


def _head_kernel(kernels: Kernels, *args) -> mx.array:
    slice_logits, slice_tokens = kernels.run(HEAD, head_launch(*args))
    return kernels.run(PICK, pick_launch(slice_logits, slice_tokens))[0]


def _head_check_args(scores, z, ordering, table: HeadTable, top_k) -> tuple:
    """Random scores, states and ordering over the caller's own table (any table must give the
    reference's token; a random one of E2B's 262,144 rows would cost more than the check)."""
    keys = mx.random.split(CHECK_KEY, 3)
    rows = table.weight.shape[0]
    return (
        mx.random.normal(scores.shape, key=keys[0]).astype(scores.dtype),
        mx.random.normal(z.shape, key=keys[1]).astype(z.dtype),
        (mx.random.permutation(ordering.size, key=keys[2]) % rows).astype(ordering.dtype),
        table,
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
    if not table.kernel_ready or C > MAX_CENTROIDS or top_k > MAX_TOP_K or scores.size == 0:
        return greedy_token_reference(*args).reshape(lead)
    return _head(*args).reshape(lead)
