"""Pieces the Gemma 4 vision and audio towers share.

- `MultimodalEmbedder` (transformers' `Gemma4MultimodalEmbedder`): a weightless RMSNorm and a
  linear map from a tower's output into the text model's embedding space.
- `ClippableLinear` (transformers' `Gemma4ClippableLinear`): a bias-free `nn.Linear` (weights
  under `.linear`) that, when the tower's config sets `use_clipped_linears`, clamps its input and
  output to four scalars stored in the checkpoint (`input_min`, `input_max`, `output_min`,
  `output_max`).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from gemma_mlx.models.base import RMSNorm

CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")


class ClippableLinear(nn.Module):
    def __init__(self, in_dims: int, out_dims: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(in_dims, out_dims, bias=False)
        if clipped:
            self.input_min = mx.array(-math.inf)
            self.input_max = mx.array(math.inf)
            self.output_min = mx.array(-math.inf)
            self.output_max = mx.array(math.inf)

    def __call__(self, x: mx.array) -> mx.array:
        if "input_min" not in self:
            return self.linear(x)
        x = mx.clip(x, self.input_min.astype(x.dtype), self.input_max.astype(x.dtype))
        y = self.linear(x)
        return mx.clip(y, self.output_min.astype(y.dtype), self.output_max.astype(y.dtype))


def drop_unused_clip_bounds(weights: dict[str, mx.array], clipped: bool) -> dict[str, mx.array]:
    """Without `use_clipped_linears` the bounds a checkpoint stores are unused (transformers
    ignores them on load): drop them so that the names check does not reject the file."""
    if clipped:
        return weights
    return {k: v for k, v in weights.items() if k.rpartition(".")[2] not in CLIP_BOUNDS}


def weight_dtype(linear: nn.Module) -> mx.Dtype:
    """The dtype a (possibly quantized) linear layer computes in."""
    return linear.scales.dtype if "scales" in linear else linear.weight.dtype


class MultimodalEmbedder(nn.Module):
    def __init__(self, in_dims: int, out_dims: int, eps: float):
        super().__init__()
        self.embedding_projection = nn.Linear(in_dims, out_dims, bias=False)
        self.embedding_pre_projection_norm = RMSNorm(in_dims, eps, weight=False)

    def __call__(self, x: mx.array) -> mx.array:
        x = x.astype(weight_dtype(self.embedding_projection))
        return self.embedding_projection(self.embedding_pre_projection_norm(x))
