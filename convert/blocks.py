"""GGUF quantized block layouts, described as data, unpacked onto MLX's affine form.

Every layout here stores groups of 32 weights as `w = scale * q + bias` with an unsigned integer `q`,
which is exactly MLX's affine quantization with group size 32. `unpack` turns raw blocks
`[n_blocks, type_size]` into `q [n_blocks, block_size]` (uint8, weights in their natural order) and
`scale`, `bias` `[n_blocks, block_size // 32]`. The scale dtype is float16 where the format stores
the scale itself, float32 where the scale is a product (d * sub-scale) that float16 cannot hold.
Layouts: ggml-quants.c and gguf-py `quants.py`; the unit tests check them against gguf-py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

GROUP = 32
Unpacked = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class BlockLayout:
    block_size: int  # weights per block
    type_size: int  # bytes per block
    bits: int
    unpack: Callable[[np.ndarray], Unpacked]


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 stored at byte `start` of every block, as a column."""
    return blocks[:, start : start + 2].copy().view(np.float16)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 weights: the low nibbles are weights 0..15, the high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits_32(qh: np.ndarray) -> np.ndarray:
    """Bit j of the little-endian 32-bit word `qh` is the fifth bit of weight j."""
    bits = np.unpackbits(qh, axis=-1, bitorder="little")
    return bits << 4


def _q4_0(b: np.ndarray) -> Unpacked:
    d = _f16(b, 0)
    return _nibbles_32(b[:, 2:18]), d, d * np.float16(-8)


def _q4_1(b: np.ndarray) -> Unpacked:
    return _nibbles_32(b[:, 4:20]), _f16(b, 0), _f16(b, 2)


def _q5_0(b: np.ndarray) -> Unpacked:
    d = _f16(b, 0)
    return _nibbles_32(b[:, 6:22]) | _high_bits_32(b[:, 2:6]), d, d * np.float16(-16)


def _q5_1(b: np.ndarray) -> Unpacked:
    return _nibbles_32(b[:, 8:24]) | _high_bits_32(b[:, 4:8]), _f16(b, 0), _f16(b, 2)


def _q8_0(b: np.ndarray) -> Unpacked:
    d = _f16(b, 0)
    q = (b[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return q, d, d * np.float16(-128)


def _k_sub_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit (scale, min) pairs packed in 12 bytes of a Q4_K / Q5_K block."""
    s = s.astype(np.uint8)
    low_sc, low_m = s[:, 0:4] & 63, s[:, 4:8] & 63
    high_sc = (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)
    high_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return np.concatenate([low_sc, high_sc], -1), np.concatenate([low_m, high_m], -1)


def _k_affine(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scale = d * sc and bias = -dmin * m, both exact in float32 (11-bit x 6-bit products)."""
    sc, m = _k_sub_scales(b[:, 4:16])
    d, dmin = _f16(b, 0).astype(np.float32), _f16(b, 2).astype(np.float32)
    return d * sc.astype(np.float32), -(dmin * m.astype(np.float32))


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> 256 weights: chunk c's low nibbles are weights 64c..64c+31, high 64c+32.."""
    chunks = qs.reshape(-1, 4, 32)
    return np.stack([chunks & 0x0F, chunks >> 4], axis=2).reshape(-1, 256)


def _q4_k(b: np.ndarray) -> Unpacked:
    scale, bias = _k_affine(b)
    return _k_nibbles(b[:, 16:144]), scale, bias


def _q5_k(b: np.ndarray) -> Unpacked:
    scale, bias = _k_affine(b)
    qh = b[:, 16:48]
    # Weight 32j + i takes bit j of qh[i].
    high = np.stack([(qh >> j) & 1 for j in range(8)], axis=1).reshape(-1, 256)
    return _k_nibbles(b[:, 48:176]) | (high << 4), scale, bias


# GGUF types that map exactly onto MLX affine group-32 arrays.
EXACT_LAYOUTS: dict[T, BlockLayout] = {
    T.Q4_0: BlockLayout(32, 18, 4, _q4_0),
    T.Q4_1: BlockLayout(32, 20, 4, _q4_1),
    T.Q5_0: BlockLayout(32, 22, 5, _q5_0),
    T.Q5_1: BlockLayout(32, 24, 5, _q5_1),
    T.Q8_0: BlockLayout(32, 34, 8, _q8_0),
    T.Q4_K: BlockLayout(256, 144, 4, _q4_k),
    T.Q5_K: BlockLayout(256, 176, 5, _q5_k),
}
# Kept byte for byte as a 2-D weight (no MLX affine form holds their 16-weight sub-blocks): the
# GGUF blocks are what `gemma_mlx.models.q6k` runs.
KEPT_TYPES = frozenset({T.Q6_K})
# Bits used for types that must be requantized, unless the user chooses (`--requant-bits`).
DEFAULT_REQUANT_BITS = 8
# Stored as plain floats: passed through unchanged.
FLOAT_TYPES = {T.F32: "float32", T.F16: "float16", T.BF16: "bfloat16"}


def unpack_rows(layout: BlockLayout, raw: np.ndarray, columns: int) -> Unpacked:
    """Raw quantized rows `[..., bytes]` -> q `[..., columns]`, scale and bias `[..., columns/32]`."""
    lead = raw.shape[:-1]
    blocks = np.ascontiguousarray(raw).reshape(-1, layout.type_size)
    q, scale, bias = layout.unpack(blocks)
    groups = columns // GROUP
    return (
        q.reshape(*lead, columns),
        scale.reshape(*lead, groups),
        bias.reshape(*lead, groups),
    )
