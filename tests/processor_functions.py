"""transformers' torchvision-based Gemma 4 processors (the 12B's image processor, the video
processors), run without torchvision.

Their modules import torchvision, which the test extras do not install: PyPI's Linux torchvision
links CUDA and does not load beside the CPU-only torch, and once installed it breaks the import
of transformers' Gemma 4 classes. So the processors' own functions are compiled from their
modules' source, and their one torchvision call, `resize(uint8, BICUBIC, antialias=True)`, is
made as torchvision makes it on the CPU: the uint8 tensor goes to
`torch.nn.functional.interpolate` as it is (`resize_image`, `_do_native_uint8_resize_on_cpu`).
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import torch
import transformers


def processor_functions(module: str, *names: str) -> dict:
    """The named top-level functions of transformers' `models/<module>.py`, compiled."""
    path = Path(transformers.__file__).parent / "models" / f"{module}.py"
    nodes = [n for n in ast.parse(path.read_text()).body if getattr(n, "name", None) in names]
    assert {n.name for n in nodes} == set(names), f"{module} lacks some of {names}"
    namespace = {"torch": torch, "math": math}
    exec(compile(ast.Module(nodes, []), str(path), "exec"), namespace)
    return namespace


def torchvision_resize(rgb: np.ndarray, budget: int, module: str) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, h, w] in [0, 1]: the processor's aspect-ratio-preserving
    resize for `budget` soft tokens (16-pixel patches, 3 x 3 pooling), then its rescale."""
    size_of = processor_functions(module, "get_aspect_ratio_preserving_size")
    pixels = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None]
    size = size_of["get_aspect_ratio_preserving_size"](*pixels.shape[-2:], 16, budget * 9, 3)
    if tuple(size) != tuple(pixels.shape[-2:]):
        pixels = torch.nn.functional.interpolate(pixels, list(size), mode="bicubic", antialias=True)
    return pixels[0].float() * (1 / 255)


def patch_positions(height: int, width: int, count: int) -> torch.Tensor:
    """The processors' (x, y) grid of 16-pixel patches, row-major."""
    grid = torch.meshgrid(torch.arange(width // 16), torch.arange(height // 16), indexing="xy")
    return torch.stack(grid, dim=-1).reshape(count, 2)
