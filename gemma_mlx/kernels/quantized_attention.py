"""Attention over a quantized KV cache with MLX's quantized matmuls.

A quantized cache (`gemma_mlx.cache.QuantizedKVCache`) holds values row by row as MLX's affine
groups (`mx.quantize` along the head dimension: packed uint32, one scale and bias per group) and
keys channel by channel: transposed, each channel quantized along blocks of positions
(`QuantizedKeys`), because keys have outlier channels that would widen every group along the
head dimension they fall in. Both can follow a prefix of positions kept in the model's dtype, and
keys of a block not yet complete stay as computed.

Attention reads the packed arrays where they lie: the scores are one `mx.quantized_matmul` of the
queries against the packed keys, the output one of the softmax weights against the packed
values, so a step makes no dequantized copy of the cache. Dense parts add ordinary products, and
the softmax runs over every position together, in float32. Queries of one chunk that arrived
before and after a block was completed see it differently (`QuantizedKeys.seen`): those
positions get both products and each query keeps its own, so a chunk computes what its queries
would one at a time.

The reference the tests hold this to is `dequantized_attention`: the cache dequantized, then MLX's
fused attention in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class QuantizedKV:
    """Cached keys or values [B, kv heads, positions, D]: the first `dense.shape[2]` positions as
    computed (None: no such prefix), the rest `mx.quantize`d (packed, scales, biases)."""

    dense: mx.array | None
    packed: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int
    bits: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        B, heads, quantized, _ = self.scales.shape
        prefix = 0 if self.dense is None else self.dense.shape[2]
        return B, heads, prefix + quantized, self.scales.shape[-1] * self.group_size

    @property
    def dtype(self) -> mx.Dtype:
        return self.scales.dtype

    def positions_from(self, first: int) -> QuantizedKV:
        """The positions [first, end) (a view, as slicing an array would give)."""
        prefix = 0 if self.dense is None else self.dense.shape[2]
        dense = None if self.dense is None or first >= prefix else self.dense[:, :, first:]
        q = max(0, first - prefix)
        packed, scales, biases = (a[:, :, q:] for a in (self.packed, self.scales, self.biases))
        return QuantizedKV(dense, packed, scales, biases, self.group_size, self.bits)

    def dequantized(self) -> mx.array:
        """Every position as a dense array (for references and tests, not the attention path)."""
        rest = mx.dequantize(
            self.packed, self.scales, self.biases, group_size=self.group_size, bits=self.bits
        )
        return rest if self.dense is None else mx.concatenate([self.dense, rest], axis=2)


@dataclass(frozen=True)
class QuantizedKeys:
    """Cached keys [B, kv heads, positions, D]: the first `dense.shape[2]` positions as computed
    (None: no such prefix); after them, whole blocks of positions quantized channel by channel
    (`blocks`: packed, scales, biases of the keys transposed to [B, kv heads, D, columns], groups
    of `group_size` positions along the last axis; None: none yet), and positions from
    `tail_start` on (counted after the prefix) as computed (`tail`, None: none), overlapping the
    last blocks when a rollback may still need them.

    `seen` says what the queries of one chunk see: for each, in order, how many positions it
    sees quantized. A query sees the blocks completed when it arrived quantized and the later
    keys as computed, so a chunk attends as its queries would have one at a time. Empty: every
    query sees every block."""

    dense: mx.array | None
    blocks: tuple[mx.array, mx.array, mx.array] | None
    tail: mx.array | None
    tail_start: int
    seen: tuple[int, ...]
    group_size: int
    bits: int

    @property
    def prefix(self) -> int:
        return 0 if self.dense is None else self.dense.shape[2]

    @property
    def blocked(self) -> int:
        return 0 if self.blocks is None else self.blocks[1].shape[-1] * self.group_size

    @property
    def shape(self) -> tuple[int, int, int, int]:
        if self.tail is not None:
            B, heads, n, D = self.tail.shape
            return B, heads, self.prefix + self.tail_start + n, D
        B, heads, D, _ = self.blocks[1].shape
        return B, heads, self.prefix + self.blocked, D

    @property
    def dtype(self) -> mx.Dtype:
        """The dtype the keys were computed in (the scales are kept in it)."""
        return self.tail.dtype if self.tail is not None else self.blocks[1].dtype

    def positions_from(self, first: int) -> QuantizedKeys:
        """The positions [first, end); blocks are read whole, so `first` must be 0 (quantized
        caches are full-attention layers, read from their start)."""
        if first:
            raise ValueError(f"quantized keys are read from position 0, not {first}")
        return self

    def dequantized(self) -> mx.array:
        """The keys a query after all of them attends (every block quantized), as a dense array
        (for references and tests, not the attention path)."""
        parts = [] if self.dense is None else [self.dense]
        if self.blocks is not None:
            keys = mx.dequantize(*self.blocks, group_size=self.group_size, bits=self.bits)
            parts.append(keys.swapaxes(-1, -2).astype(self.dtype))
        if self.tail is not None and self.blocked < self.tail_start + self.tail.shape[2]:
            parts.append(self.tail[:, :, self.blocked - self.tail_start :])
        return mx.concatenate(parts, axis=2)

    def scores(self, queries: mx.array) -> mx.array:
        """queries [B, kv heads, group, T, D] (float32, scaled; the chunk `seen` describes)
        times the keys each of them attends: [B, kv heads, group, T, positions]. Positions some
        queries see quantized and others as computed get both products, and each query keeps
        its own."""
        T = queries.shape[-2]
        per_query = self.seen or (self.blocked,) * T
        if len(per_query) != T:
            raise ValueError(f"{T} queries over keys stored for {len(per_query)}")
        seen = min(per_query)  # quantized for every query below this position
        parts = []
        if self.dense is not None:
            parts.append(queries @ _grouped(self.dense).swapaxes(-1, -2))
        if self.blocked:
            quantized = mx.quantized_matmul(
                queries,
                *(_grouped(a) for a in self.blocks),
                transpose=False,
                group_size=self.group_size,
                bits=self.bits,
            )
            parts.append(quantized[..., :seen] if seen < self.blocked else quantized)
        if self.tail is not None and seen < self.tail_start + self.tail.shape[2]:
            computed = queries @ _grouped(self.tail[:, :, seen - self.tail_start :]).swapaxes(
                -1, -2
            )
            if seen < self.blocked:  # keys that completed a block within the chunk
                keys = mx.arange(seen, self.blocked)
                both = self.blocked - seen
                parts.append(
                    mx.where(
                        keys[None] < mx.array(per_query)[:, None],
                        quantized[..., seen:],
                        computed[..., :both],
                    )
                )
                computed = computed[..., both:]
            parts.append(computed)
        return mx.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]


def quantize_rows(x: mx.array, group_size: int, bits: int) -> tuple[mx.array, mx.array, mx.array]:
    """Rows [..., D] as MLX affine groups along D: (packed, scales, biases), each row on its own,
    so a position quantizes to the same bits whichever chunk it arrives in."""
    packed, scales, biases = mx.quantize(x, group_size=group_size, bits=bits)
    return packed, scales, biases


def quantize_channels(keys: mx.array, group_size: int, bits: int) -> tuple[mx.array, ...]:
    """Keys [B, heads, n, D] (n a multiple of `group_size`) transposed and quantized along
    positions: each channel of each block of `group_size` positions gets its own scale and bias."""
    return tuple(
        mx.quantize(mx.contiguous(keys.swapaxes(-1, -2)), group_size=group_size, bits=bits)
    )


def _causal(n_queries: int, n_keys: int) -> mx.array:
    """MLX's "causal" mask, aligned at the lower right: query i sees keys up to n_keys - n_queries + i."""
    q = mx.arange(n_keys - n_queries, n_keys)[:, None]
    return q >= mx.arange(n_keys)[None]


def _grouped(a: mx.array) -> mx.array:
    """[B, kv heads, positions, X] -> [B, kv heads, 1, positions, X]: one KV head broadcast over
    its group of query heads."""
    return mx.expand_dims(a, 2)


def quantized_attention(
    q: mx.array,
    k: QuantizedKeys,
    v: QuantizedKV,
    scale: float,
    mask: str | mx.array | None = None,
) -> mx.array:
    """softmax(scale q k^T + mask) v for q [B, heads, T, D] over quantized k, v (each query
    seeing the keys as `k.seen` says), rounded to q's dtype.

    Queries, scores and weights are float32 (the products promote the half-precision scales):
    in bfloat16 the products' rounding left 10x MLX's own attention error over 700 positions.
    """
    B, n_heads, T, D = q.shape
    n_kv = v.scales.shape[1]
    queries = (q.astype(mx.float32) * scale).reshape(B, n_kv, n_heads // n_kv, T, D)
    scores = k.scores(queries)
    if mask is not None:
        if isinstance(mask, str):
            mask = _causal(T, scores.shape[-1])
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = mx.softmax(scores, axis=-1, precise=True)
    prefix = 0 if v.dense is None else v.dense.shape[2]
    out = mx.quantized_matmul(
        weights[..., prefix:],
        *(_grouped(a) for a in (v.packed, v.scales, v.biases)),
        transpose=False,
        group_size=v.group_size,
        bits=v.bits,
    )
    if v.dense is not None:
        out = out + weights[..., :prefix] @ _grouped(v.dense)
    return out.reshape(B, n_heads, T, D).astype(q.dtype)


def dequantized_attention(
    q: mx.array, k: QuantizedKeys, v: QuantizedKV, scale: float, mask: str | mx.array | None = None
) -> mx.array:
    """The reference: k and v dequantized (as a query after them sees them), MLX's fused attention
    in float32, rounded to q's dtype."""
    wide = [a.astype(mx.float32) for a in (q, k.dequantized(), v.dequantized())]
    out = mx.fast.scaled_dot_product_attention(*wide, scale=scale, mask=mask)
    return out.astype(q.dtype)
