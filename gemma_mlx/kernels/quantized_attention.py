"""Attention over a quantized KV cache with MLX's quantized matmuls.

A quantized cache (`gemma_mlx.cache.QuantizedKVCache`) holds each key and value row as MLX's
affine groups (`mx.quantize` along the head dimension: packed uint32, one scale and bias per
group), optionally after a prefix of positions kept in the model's dtype. Attention reads the
packed rows where they lie: the scores are one `mx.quantized_matmul` of the queries against the
packed keys (transposed), the output one of the softmax weights against the packed values, so no
dequantized copy of the cache is made per step. A dense prefix adds one ordinary product to each
side, and the softmax runs over the prefix and the quantized positions together, in float32.

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


def quantize_rows(x: mx.array, group_size: int, bits: int) -> tuple[mx.array, mx.array, mx.array]:
    """Rows [..., D] as MLX affine groups along D: (packed, scales, biases), each row on its own,
    so a position quantizes to the same bits whichever chunk it arrives in."""
    packed, scales, biases = mx.quantize(x, group_size=group_size, bits=bits)
    return packed, scales, biases


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
    k: QuantizedKV,
    v: QuantizedKV,
    scale: float,
    mask: str | mx.array | None = None,
) -> mx.array:
    """softmax(scale q k^T + mask) v for q [B, heads, T, D] over quantized k, v, rounded to q's
    dtype.

    Queries, scores and weights are float32 (the products promote the half-precision scales):
    in bfloat16 the products' rounding left 10x MLX's own attention error over 700 positions.
    """
    B, n_heads, T, D = q.shape
    n_kv = k.scales.shape[1]
    queries = (q.astype(mx.float32) * scale).reshape(B, n_kv, n_heads // n_kv, T, D)
    scores = mx.quantized_matmul(
        queries,
        *(_grouped(a) for a in (k.packed, k.scales, k.biases)),
        transpose=True,
        group_size=k.group_size,
        bits=k.bits,
    )
    prefix = 0
    if k.dense is not None:
        prefix = k.dense.shape[2]
        dense_scores = queries @ _grouped(k.dense).swapaxes(-1, -2)
        scores = mx.concatenate([dense_scores, scores], axis=-1)
    if mask is not None:
        if isinstance(mask, str):
            mask = _causal(T, scores.shape[-1])
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = mx.softmax(scores, axis=-1, precise=True)
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
    q: mx.array, k: QuantizedKV, v: QuantizedKV, scale: float, mask: str | mx.array | None = None
) -> mx.array:
    """The reference: k and v dequantized, MLX's fused attention in float32, rounded to q's dtype."""
    wide = [a.astype(mx.float32) for a in (q, k.dequantized(), v.dequantized())]
    out = mx.fast.scaled_dot_product_attention(*wide, scale=scale, mask=mask)
    return out.astype(q.dtype)
