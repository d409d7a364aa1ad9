"""The 12B's encoder-free vision embedder, as transformers' `Gemma4UnifiedVisionEmbedder`.

No vision tower: each 48x48-pixel patch (`gemma_mlx.media.image`, values in [0, 1]) goes through
LayerNorm -> Linear -> LayerNorm, gets factorized (x, y) position embeddings, one more LayerNorm,
and the multimodal embedder (weightless RMSNorm -> Linear) into the text model's space: one soft
token per patch. The 12B's audio is as direct: 640 raw samples (40 ms at 16 kHz) per soft token
through a multimodal embedder of its own (`gemma4_multimodal`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from gemma_mlx.models.base import ConfigError, read
from gemma_mlx.models.gemma4_tower_parts import MultimodalEmbedder, weight_dtype

# torch.nn.LayerNorm's default epsilon: transformers builds these three without passing one.
LAYER_NORM_EPS = 1e-5


@dataclass
class UnifiedVisionArgs:
    patch_size: int
    pooling_kernel_size: int
    mm_embed_dim: int
    mm_posemb_size: int
    rms_norm_eps: float
    output_proj_dims: int

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> UnifiedVisionArgs:
        """Read a `gemma4_unified_vision` config (the 12B's `vision_config`)."""
        args = cls(
            patch_size=read(config, "patch_size", int),
            pooling_kernel_size=read(config, "pooling_kernel_size", int),
            mm_embed_dim=read(config, "mm_embed_dim", int),
            mm_posemb_size=read(config, "mm_posemb_size", int),
            rms_norm_eps=read(config, "rms_norm_eps", float),
            output_proj_dims=read(config, "output_proj_dims", int),
        )
        if args.output_proj_dims != args.mm_embed_dim:
            raise ConfigError(
                f"config.json: vision_config 'output_proj_dims' = {args.output_proj_dims} must "
                f"equal 'mm_embed_dim' = {args.mm_embed_dim} (the embedder maps one to the other)"
            )
        return args

    @property
    def model_patch_size(self) -> int:
        """Pixels per side of the merged patches the embedder takes (16 x 3 = 48)."""
        return self.patch_size * self.pooling_kernel_size


class UnifiedVisionEmbedder(nn.Module):
    """`embedder(patches [n, 3 * 48^2], positions [n, 2]) -> [n, text hidden]`."""

    def __init__(self, args: UnifiedVisionArgs, text_hidden_size: int):
        super().__init__()
        patch_dim = 3 * args.model_patch_size**2
        dim = args.mm_embed_dim
        self.patch_ln1 = nn.LayerNorm(patch_dim, eps=LAYER_NORM_EPS)
        self.patch_dense = nn.Linear(patch_dim, dim)
        self.patch_ln2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.pos_embedding = mx.zeros((args.mm_posemb_size, 2, dim))
        self.pos_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.multimodal_embedder = MultimodalEmbedder(
            args.output_proj_dims, text_hidden_size, args.rms_norm_eps
        )

    def __call__(self, patches: mx.array, positions: mx.array) -> mx.array:
        h = self.patch_ln1(patches.astype(weight_dtype(self.patch_dense)))
        h = self.patch_ln2(self.patch_dense(h))
        h = h + self.pos_embedding[positions[:, 0], 0] + self.pos_embedding[positions[:, 1], 1]
        return self.multimodal_embedder(self.pos_norm(h))

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Names relative to the embedder. Checkpoints store the final projection as
        `embed_vision.embedding_projection` (beside the rest under `vision_embedder.`); here it
        sits in the embedder's `multimodal_embedder`."""
        out = {}
        for name, value in weights.items():
            if name.startswith("embedding_projection."):
                name = "multimodal_embedder." + name
            out[name] = value
        return out
