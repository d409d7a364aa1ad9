"""Images -> patches for the Gemma 4 vision tower, without torch (Pillow and numpy).

Equal to transformers' `Gemma4ImageProcessorPil`: composite any transparency onto white, resize
(bicubic, aspect ratio kept) to the largest size whose sides are multiples of
`pooling_kernel_size * patch_size` and which holds at most `max_soft_tokens * pooling_kernel_size^2`
patches, scale to [0, 1], cut into row-major patches of (y, x, channel) pixels with their (x, y)
grid positions. The 12B (`merge=True`) takes the resized image in patches `pooling_kernel_size`
times larger: transformers' `Gemma4UnifiedImageProcessor` merges each k x k block of patches into
one, which is the same array. That processor, like the video processors, resizes with torchvision
instead of Pillow (one level in 255 apart at some pixels): `resize="torchvision"`, the default
with `merge`, reproduces its integer arithmetic (`media.resize`).

Files are opened safely: the pixel count is checked from the header before anything is decoded
(decompression bombs), and unreadable, truncated or unsupported files raise `MediaError`.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gemma_mlx.errors import MediaError
from gemma_mlx.media.resize import resize_bicubic_uint8
from gemma_mlx.media.sources import resolve_source

# The budgets transformers accepts (`_SUPPORTED_SOFT_TOKENS`); the processors default to 280.
SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
DEFAULT_SOFT_TOKENS = 280
# Largest image decoded (width x height). A 100-megapixel RGB image takes 300 MB once decoded; every
# budget above resizes it to at most 2.6 megapixels anyway.
MAX_PIXELS = 100_000_000
# Whose bicubic resize to reproduce: Gemma4ImageProcessorPil's, or the torchvision processors'.
RESIZES = ("pil", "torchvision")

ImageSource = str | Path | bytes | Image.Image


@dataclass
class ImagePatches:
    """One image, ready for `Model.encode_image`."""

    patches: np.ndarray  # float32 [n, side * side * 3], values in [0, 1]
    positions: np.ndarray  # int32 [n, 2], (x, y) of each patch on the patch grid
    soft_tokens: int  # soft tokens the model makes of it


def open_image(source: ImageSource, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image file (path, bytes or a base64 data URL), upright per its EXIF orientation;
    a PIL image is returned as it is. Raises `MediaError` for unreadable, corrupt or oversized
    files."""
    if isinstance(source, Image.Image):
        return source
    source = resolve_source(source, "image")
    name = "image bytes" if isinstance(source, bytes) else str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            width, height = image.size
            if width * height > max_pixels:
                raise MediaError(
                    f"{name}: {width}x{height} pixels is above the limit of {max_pixels:,} "
                    "(a decompression bomb, or an image to downscale first)"
                )
            image.load()
            return ImageOps.exif_transpose(image)
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaError(f"{name}: too many pixels ({e})") from e
    except UnidentifiedImageError as e:
        raise MediaError(f"{name}: not an image in a format Pillow reads") from e
    except FileNotFoundError as e:
        raise MediaError(f"{name}: no such file") from e
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
        raise MediaError(f"{name}: cannot be decoded ({e})") from e


def to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3]; transparency is composited onto white (transformers' convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("RGB"))


def resized_size(
    height: int, width: int, patch_size: int, max_patches: int, pooling_kernel_size: int
) -> tuple[int, int]:
    """transformers' `get_aspect_ratio_preserving_size`: the largest (height, width) with sides
    multiples of `pooling_kernel_size * patch_size` holding at most `max_patches` patches."""
    side = pooling_kernel_size * patch_size
    factor = math.sqrt(max_patches * patch_size**2 / (height * width))
    target_h = math.floor(factor * height / side) * side
    target_w = math.floor(factor * width / side) * side
    if target_h == 0 and target_w == 0:
        raise MediaError(f"a {width}x{height} image cannot be resized to any patch grid")
    longest = (max_patches // pooling_kernel_size**2) * side
    if target_h == 0:
        target_h, target_w = side, min(math.floor(width / height) * side, longest)
    elif target_w == 0:
        target_h, target_w = min(math.floor(height / width) * side, longest), side
    return target_h, target_w


def image_patches(
    image: ImageSource,
    patch_size: int = 16,
    pooling_kernel_size: int = 3,
    max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
    merge: bool = False,
    max_pixels: int = MAX_PIXELS,
    resize: str | None = None,
) -> ImagePatches:
    """Patches of one image for a tower with `patch_size` and `pooling_kernel_size` (its
    config.json's vision_config); `merge` for the 12B's encoder-free embedder. `resize` ("pil" or
    "torchvision"; default: "torchvision" with `merge`, else "pil") picks whose resize to equal."""
    resize = resize or ("torchvision" if merge else "pil")
    if resize not in RESIZES:
        raise MediaError(f"resize must be one of {', '.join(RESIZES)}, got {resize!r}")
    if max_soft_tokens not in SOFT_TOKEN_BUDGETS:
        raise MediaError(
            f"max_soft_tokens must be one of {', '.join(map(str, SOFT_TOKEN_BUDGETS))}, "
            f"got {max_soft_tokens!r}"
        )
    pil = open_image(image, max_pixels)
    rgb = to_rgb(pil)
    height, width = rgb.shape[:2]
    k = pooling_kernel_size
    target = resized_size(height, width, patch_size, max_soft_tokens * k * k, k)
    if target != (height, width) and resize == "torchvision":
        rgb = resize_bicubic_uint8(rgb, *target)
    elif target != (height, width):
        resized = Image.fromarray(rgb).resize(target[::-1], resample=Image.Resampling.BICUBIC)
        rgb = np.asarray(resized)
    pixels = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)  # as transformers rescales
    side = patch_size * k if merge else patch_size
    patches, positions = patchify(pixels, side)
    soft_tokens = len(patches) if merge else len(patches) // (k * k)
    return ImagePatches(patches, positions, soft_tokens)


def patchify(pixels: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """[H, W, 3] -> row-major patches [n, side * side * 3] of (y, x, channel) pixels, and their
    (x, y) grid positions [n, 2]."""
    height, width, channels = pixels.shape
    rows, cols = height // side, width // side
    patches = pixels.reshape(rows, side, cols, side, channels).transpose(0, 2, 1, 3, 4)
    grid_x, grid_y = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
    positions = np.stack([grid_x, grid_y], axis=-1).reshape(-1, 2).astype(np.int32)
    return patches.reshape(rows * cols, -1), positions
