"""The Gemma 4 vision tower (E2B, E4B, 26B-A4B, 31B), as transformers' `Gemma4VisionModel`.

An image arrives as 16x16-pixel patches (`gemma_mlx.media.image`) with their (x, y) grid
positions. The tower embeds each patch (a linear map of its pixels scaled to [-1, 1], plus learned
x and y position embeddings), runs a bidirectional encoder whose attention rotates the first half
of each head by the x position and the second half by the y position (2-D RoPE, base 100), then
averages each k x k block of patches (k = `pooling_kernel_size`) into one soft token and scales it
by sqrt(hidden). Norms, attention scale 1.0 and the GeGLU MLP are the text decoder's.

transformers pads every image to the same number of patches and masks the padding; padding keys
never reach a real patch and padded soft tokens are dropped, so we encode the real patches only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from gemma_mlx.models.base import ConfigError, RMSNorm, geglu, read
from gemma_mlx.models.gemma4_tower_parts import (
    ClippableLinear,
    drop_unused_clip_bounds,
    weight_dtype,
)


@dataclass
class VisionArgs:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    patch_size: int
    pooling_kernel_size: int
    position_embedding_size: int
    rope_theta: float
    use_clipped_linears: bool = False
    standardize: bool = False

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> VisionArgs:
        """Read a `gemma4_vision` config (the `vision_config` of a Gemma 4 config.json)."""
        rope = read(config, "rope_parameters", dict, {"rope_type": "axial", "rope_theta": 100.0})
        if rope.get("rope_type", "axial") != "axial":
            raise ConfigError(
                f"config.json: vision_config 'rope_parameters' has rope_type "
                f"{rope.get('rope_type')!r}; the vision tower supports only 'axial'"
            )
        args = cls(
            hidden_size=read(config, "hidden_size", int),
            intermediate_size=read(config, "intermediate_size", int),
            num_hidden_layers=read(config, "num_hidden_layers", int),
            num_attention_heads=read(config, "num_attention_heads", int),
            num_key_value_heads=read(config, "num_key_value_heads", int),
            head_dim=read(config, "head_dim", int),
            rms_norm_eps=read(config, "rms_norm_eps", float),
            patch_size=read(config, "patch_size", int),
            pooling_kernel_size=read(config, "pooling_kernel_size", int),
            position_embedding_size=read(config, "position_embedding_size", int),
            rope_theta=read(rope, "rope_theta", float),
            use_clipped_linears=read(config, "use_clipped_linears", bool, False),
            standardize=read(config, "standardize", bool, False),
        )
        if args.head_dim % 4:
            raise ConfigError(
                f"config.json: vision_config 'head_dim' = {args.head_dim} must be a multiple of 4 "
                "(2-D RoPE rotates pairs in each half)"
            )
        if args.num_attention_heads % args.num_key_value_heads:
            raise ConfigError(
                "config.json: vision_config 'num_key_value_heads' must divide 'num_attention_heads'"
            )
        return args


def rotate_2d(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """2-D RoPE on [heads, n, head_dim]: rotate-half RoPE on each half of the head, the first
    half by the x angles, the second by the y angles (`cos`/`sin`: [n, head_dim])."""
    half = x.shape[-1] // 2
    parts = []
    for i in range(2):
        part = x[..., i * half : (i + 1) * half]
        a, b = part[..., : half // 2], part[..., half // 2 :]
        rotated = mx.concatenate([-b, a], axis=-1)
        c, s = cos[:, i * half : (i + 1) * half], sin[:, i * half : (i + 1) * half]
        parts.append(part * c + rotated * s)
    return mx.concatenate(parts, axis=-1)


def rope_angles(positions: mx.array, head_dim: int, theta: float) -> tuple[mx.array, mx.array]:
    """cos and sin [n, head_dim] for patches at `positions` [n, 2] (x, y), laid out x-x-y-y."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (mx.arange(0, spatial, 2, dtype=mx.float32) / spatial))
    angles = positions.astype(mx.float32)[..., None] * inv_freq  # [n, 2, head_dim / 4]
    x, y = angles[:, 0], angles[:, 1]
    layout = mx.concatenate([x, x, y, y], axis=-1)
    return mx.cos(layout), mx.sin(layout)


class VisionAttention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        d, hd, clip = args.hidden_size, args.head_dim, args.use_clipped_linears
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.num_attention_heads,
            args.num_key_value_heads,
            hd,
        )
        self.q_proj = ClippableLinear(d, self.n_heads * hd, clip)
        self.k_proj = ClippableLinear(d, self.n_kv_heads * hd, clip)
        self.v_proj = ClippableLinear(d, self.n_kv_heads * hd, clip)
        self.o_proj = ClippableLinear(self.n_heads * hd, d, clip)
        self.q_norm = RMSNorm(hd, args.rms_norm_eps)
        self.k_norm = RMSNorm(hd, args.rms_norm_eps)
        self.v_norm = RMSNorm(hd, args.rms_norm_eps, weight=False)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        n = x.shape[0]

        def heads(y: mx.array, count: int) -> mx.array:
            return y.reshape(n, count, self.head_dim).transpose(1, 0, 2)

        q = heads(self.q_norm(self.q_proj(x).reshape(n, -1, self.head_dim)), self.n_heads)
        k = heads(self.k_norm(self.k_proj(x).reshape(n, -1, self.head_dim)), self.n_kv_heads)
        v = heads(self.v_norm(self.v_proj(x).reshape(n, -1, self.head_dim)), self.n_kv_heads)
        q = rotate_2d(q, cos.astype(q.dtype), sin.astype(q.dtype))
        k = rotate_2d(k, cos.astype(k.dtype), sin.astype(k.dtype))
        out = mx.fast.scaled_dot_product_attention(q[None], k[None], v[None], scale=1.0)
        return self.o_proj(out[0].transpose(1, 0, 2).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        d, h, clip = args.hidden_size, args.intermediate_size, args.use_clipped_linears
        self.gate_proj = ClippableLinear(d, h, clip)
        self.up_proj = ClippableLinear(d, h, clip)
        self.down_proj = ClippableLinear(h, d, clip)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        d, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = VisionAttention(args)
        self.mlp = VisionMLP(args)
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.post_feedforward_layernorm = RMSNorm(d, eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.layers = [VisionEncoderLayer(args) for _ in range(args.num_hidden_layers)]


class PatchEmbedder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.input_proj = nn.Linear(3 * args.patch_size**2, args.hidden_size, bias=False)
        self.position_embedding_table = mx.ones((2, args.position_embedding_size, args.hidden_size))

    def __call__(self, pixels: mx.array, positions: mx.array) -> mx.array:
        """Patches [n, 3 * patch^2] with values in [0, 1] -> [n, hidden]."""
        h = self.input_proj((2 * (pixels - 0.5)).astype(weight_dtype(self.input_proj)))
        table = self.position_embedding_table
        return h + table[0][positions[:, 0]] + table[1][positions[:, 1]]


class VisionModel(nn.Module):
    """`model(patches [n, 3 * patch^2], positions [n, 2]) -> soft tokens [n / k^2, hidden]` of one
    image (float32: the sqrt(hidden) scaling can leave the float16 range before the embedder)."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embedder = PatchEmbedder(args)
        self.encoder = VisionEncoder(args)
        if args.standardize:
            self.std_bias = mx.zeros((args.hidden_size,))
            self.std_scale = mx.ones((args.hidden_size,))

    def __call__(self, patches: mx.array, positions: mx.array) -> mx.array:
        args = self.args
        k = args.pooling_kernel_size
        if patches.shape[0] % (k * k):
            raise ValueError(
                f"an image of {patches.shape[0]} patches cannot be pooled in {k}x{k} blocks"
            )
        h = self.patch_embedder(patches, positions)
        cos, sin = rope_angles(positions, args.head_dim, args.rope_theta)
        for layer in self.encoder.layers:
            h = layer(h, cos, sin)
        pooled = pool(h, positions, k).astype(mx.float32) * (args.hidden_size**0.5)
        if args.standardize:
            pooled = (pooled - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return pooled

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Tower names relative to the tower (`patch_embedder.…`, `encoder.layers.…`)."""
        return drop_unused_clip_bounds(weights, self.args.use_clipped_linears)


def pool(h: mx.array, positions: mx.array, k: int) -> mx.array:
    """Mean of each k x k block of patches [n / k^2, H], in row-major block order (summed in
    float32, returned in `h`'s dtype like transformers)."""
    blocks = positions // k
    blocks_per_row = (positions[:, 0].max() + 1) // k
    index = blocks[:, 0] + blocks_per_row * blocks[:, 1]
    out = mx.zeros((h.shape[0] // (k * k), h.shape[1]), dtype=mx.float32)
    return (out.at[index].add(h.astype(mx.float32)) / (k * k)).astype(h.dtype)
