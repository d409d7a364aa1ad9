"""torchvision's antialiased bicubic resize of uint8 images, in numpy (no torch).

transformers' torchvision-based processors (the 12B's `Gemma4UnifiedImageProcessor`, the Gemma 4
video processors) resize uint8 tensors with `torchvision.transforms.v2.functional.resize(...,
BICUBIC, antialias=True)`, which runs PyTorch's native uint8 kernel on the CPU. That kernel is
Pillow's filter (Keys cubic, a = -0.5, support scaled by the downscale factor) in different fixed
point: per axis the weights are normalised in float64, then rounded to int16 at the largest
precision that keeps the axis's largest weight below 2^15; each output is the integer sum of taps
times weights plus half a unit, shifted down and clamped to 0..255. The width is resampled first,
into uint8, then the height. Pillow's own resize (22-bit weights, the other order) differs from it
by one level at about 0.5% of pixels; this is PyTorch's arithmetic, equal to it exactly (its AVX2
kernel and its generic one compute the same integers).
"""

from __future__ import annotations

import math

import numpy as np


def keys_cubic(x: np.ndarray) -> np.ndarray:
    """PyTorch's `HelperInterpCubic::aa_filter` (Pillow's bicubic, a = -0.5), in its own order."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One axis's taps: (source index [out, taps], int16-valued weight [out, taps], precision).

    PyTorch's `_compute_indices_min_size_weights_aa` and `_compute_index_ranges_int16_weights`
    (align_corners=False, no scale factor given). Unused taps have weight 0 and a valid index."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    taps = math.ceil(support) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    centers = scale * (np.arange(out_size) + 0.5)
    # C++ int64 casts truncate toward zero; the values here are >= -support + 0.5.
    first = np.maximum(np.trunc(centers - support + 0.5).astype(np.int64), 0)
    last = np.minimum(np.trunc(centers + support + 0.5).astype(np.int64), in_size)
    count = np.clip(last - first, 0, taps)
    j = np.arange(taps)
    used = j[None, :] < count[:, None]
    weights = np.where(
        used, keys_cubic((j + first[:, None] - centers[:, None] + 0.5) * invscale), 0
    )
    total = np.zeros(out_size)
    for k in range(taps):  # summed in tap order, as the C++ loop does
        total += weights[:, k]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0, 1, total)[:, None], 0)
    largest = weights.max()
    precision = 0
    while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5))
    index = np.minimum(first[:, None] + j, in_size - 1)
    return index, fixed.astype(np.int64), precision


def resample_axis(pixels: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """uint8 `pixels` resampled along `axis` to `out_size` samples (one pass of the kernel)."""
    index, weights, precision = axis_weights(pixels.shape[axis], out_size)
    moved = np.moveaxis(pixels, axis, 0)
    # int32 holds every sum: precision <= 22 and the |weights| sum to < 2 (times 2^precision).
    source = np.ascontiguousarray(moved).reshape(moved.shape[0], -1).astype(np.int32)
    total = np.full((out_size, source.shape[1]), 1 << precision >> 1, dtype=np.int32)
    tap = np.empty_like(total)
    for k in range(index.shape[1]):
        np.take(source, index[:, k], axis=0, out=tap)
        tap *= weights[:, k, None].astype(np.int32)
        total += tap
    out = np.clip(total >> precision, 0, 255).astype(np.uint8).reshape(out_size, *moved.shape[1:])
    return np.moveaxis(out, 0, axis)


def resize_bicubic_uint8(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, C] -> [height, width, C] as torchvision's antialiased bicubic resize on the
    CPU computes it (width first, then height; an unchanged side is not resampled)."""
    if pixels.shape[1] != width:
        pixels = resample_axis(pixels, width, axis=1)
    if pixels.shape[0] != height:
        pixels = resample_axis(pixels, height, axis=0)
    return pixels
