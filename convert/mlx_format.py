"""MLX's affine group quantization as arrays: packing, dequantizing, and the two quantizers.

An MLX quantized matrix is `weight` (uint32, each row a little-endian bit stream of `bits`-bit
unsigned values), `scales` and `biases` (one per group of `group_size` columns), and means
`w = scales * q + biases`. The converter builds these arrays itself so that a source grid
(GGUF blocks, compressed-tensors int4, a QAT checkpoint's Q4_0 grid) is kept exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass
class QuantizedTensor:
    weight: np.ndarray  # uint32 [..., columns * bits / 32]
    scales: np.ndarray  # [..., columns / group_size]
    biases: np.ndarray
    bits: int
    group_size: int

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scales.nbytes + self.biases.nbytes

    def split_rows(self, parts: int) -> list[QuantizedTensor]:
        """Split along the output (row) axis, e.g. a fused gate/up projection."""
        pieces = zip(
            *(np.split(a, parts, axis=-2) for a in (self.weight, self.scales, self.biases)),
            strict=True,
        )
        return [QuantizedTensor(w, s, b, self.bits, self.group_size) for w, s, b in pieces]


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values `[..., n]` (each < 2**bits) -> MLX's packed uint32 `[..., n * bits / 32]`."""
    stream = np.unpackbits(q.astype(np.uint8)[..., None], axis=-1, bitorder="little")[..., :bits]
    packed = np.packbits(stream.reshape(*q.shape[:-1], -1), axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view(np.uint32)


def unpack(weight: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `pack`: uint8 values `[..., n]`."""
    stream = np.unpackbits(weight.view(np.uint8), axis=-1, bitorder="little")
    values = stream.reshape(*weight.shape[:-1], -1, bits)
    return (values << np.arange(bits, dtype=np.uint8)).sum(-1, dtype=np.uint8)


def quantized_nbytes(numel: int, bits: int, group_size: int, scale_bytes: int) -> int:
    """The size of a quantized tensor: packed weights plus one scale and one bias per group."""
    return numel * bits // 8 + 2 * (numel // group_size) * scale_bytes


def from_groups(
    q: np.ndarray, scale: np.ndarray, bias: np.ndarray, bits: int, group_size: int
) -> QuantizedTensor:
    return QuantizedTensor(pack(q, bits), scale, bias, bits, group_size)


def dequantize(t: QuantizedTensor) -> np.ndarray:
    """float32 weights, computed the way MLX does (scale * q + bias per group)."""
    w = mx.dequantize(
        mx.array(t.weight),
        mx.array(t.scales.astype(np.float32)),
        mx.array(t.biases.astype(np.float32)),
        group_size=t.group_size,
        bits=t.bits,
    )
    return np.asarray(w)


def quantize_q4_0(w: np.ndarray, group_size: int = 32) -> QuantizedTensor:
    """The Q4_0 recipe QAT checkpoints are trained for: symmetric, d = (signed absmax) / -8.

    q = round(w / d) + 8, clamped to [0, 15]; stored as scales = d, biases = -8 d (float16, as in
    Q4_0). `mx.quantize` would fit min/max per group instead and move every weight off the grid.
    """
    groups = w.astype(np.float32).reshape(*w.shape[:-1], -1, group_size)
    index = np.abs(groups).argmax(-1)[..., None]
    d = (np.take_along_axis(groups, index, -1) / -8.0).astype(np.float16)
    d32 = d.astype(np.float32)
    inv = np.divide(1.0, d32, out=np.zeros_like(d32), where=d32 != 0)
    q = np.clip(np.rint(groups * inv) + 8, 0, 15).astype(np.uint8).reshape(w.shape)
    return from_groups(q, d[..., 0], (d * np.float16(-8))[..., 0], 4, group_size)


def quantize_affine(w: np.ndarray, bits: int, group_size: int) -> QuantizedTensor:
    """MLX's own min/max affine quantization (for weights that have no grid to keep)."""
    q, s, b = mx.quantize(mx.array(w.astype(np.float32)), group_size=group_size, bits=bits)
    return QuantizedTensor(
        np.asarray(q),
        np.asarray(s).astype(np.float16),
        np.asarray(b).astype(np.float16),
        bits,
        group_size,
    )


def compact(values: np.ndarray) -> np.ndarray:
    """float16 when every value survives the round trip (MLX's fast path), float32 otherwise."""
    half = values.astype(np.float16)
    return (
        half
        if np.array_equal(half.astype(np.float32), values.astype(np.float32))
        else values.astype(np.float32)
    )
