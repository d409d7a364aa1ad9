"""The Gemma 4 audio tower (E2B, E4B), as transformers' `Gemma4AudioModel`.

A clip arrives as log-mel frames (`gemma_mlx.media.audio`: 128 bins every 10 ms). Two stride-2
3x3 convolutions (each followed by a bias-free LayerNorm over channels and ReLU) cut time and
frequency by 4; a linear map takes the flattened (frequency, channel) features to the hidden size.
Conformer layers follow: a half-weighted feed-forward block, chunked local self-attention with
relative positions (chunks of 12 frames attending to the 12 frames before each query, logits
soft-capped at 50, Transformer-XL relative keys), a light causal depthwise convolution and a second
feed-forward block. A biased linear maps to `output_proj_dims`; the multimodal embedder
(`gemma4_multimodal`) takes it from there.

transformers pads a batch and masks the padding; padding frames only ever sit after the real ones,
where neither the causal convolution nor the masked attention lets them reach a real frame, so we
encode the real frames of one clip only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from gemma_mlx.models.base import ConfigError, RMSNorm, read
from gemma_mlx.models.gemma4_tower_parts import ClippableLinear, drop_unused_clip_bounds


@dataclass
class AudioArgs:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    subsampling_conv_channels: list[int]
    conv_kernel_size: int
    residual_weight: float
    attention_chunk_size: int
    attention_context_left: int
    attention_context_right: int
    attention_logit_cap: float
    attention_invalid_logits_value: float
    rms_norm_eps: float
    gradient_clipping: float
    output_proj_dims: int
    use_clipped_linears: bool

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> AudioArgs:
        """Read a `gemma4_audio` config (the `audio_config` of a Gemma 4 config.json)."""
        activation = read(config, "hidden_act", str)
        if activation not in ("silu", "swish"):
            raise ConfigError(
                f"config.json: audio_config 'hidden_act' = {activation!r} is not supported "
                "(the Gemma 4 audio tower uses 'silu')"
            )
        channels = read(config, "subsampling_conv_channels", list)
        if len(channels) != 2 or not all(isinstance(c, int) and c > 0 for c in channels):
            raise ConfigError(
                "config.json: audio_config 'subsampling_conv_channels' must be two positive ints"
            )
        args = cls(
            hidden_size=read(config, "hidden_size", int),
            num_hidden_layers=read(config, "num_hidden_layers", int),
            num_attention_heads=read(config, "num_attention_heads", int),
            subsampling_conv_channels=list(channels),
            conv_kernel_size=read(config, "conv_kernel_size", int),
            residual_weight=read(config, "residual_weight", float),
            attention_chunk_size=read(config, "attention_chunk_size", int),
            attention_context_left=read(config, "attention_context_left", int),
            attention_context_right=read(config, "attention_context_right", int),
            attention_logit_cap=read(config, "attention_logit_cap", float),
            attention_invalid_logits_value=read(config, "attention_invalid_logits_value", float),
            rms_norm_eps=read(config, "rms_norm_eps", float),
            gradient_clipping=read(config, "gradient_clipping", float),
            output_proj_dims=read(config, "output_proj_dims", int),
            use_clipped_linears=read(config, "use_clipped_linears", bool),
        )
        if args.hidden_size % args.num_attention_heads:
            raise ConfigError(
                "config.json: audio_config 'num_attention_heads' must divide 'hidden_size'"
            )
        if args.attention_context_left < 1 or args.attention_chunk_size < 1:
            raise ConfigError(
                "config.json: audio_config 'attention_chunk_size' and 'attention_context_left' "
                "must be at least 1"
            )
        return args

    @property
    def mel_bins(self) -> int:
        """Log-mel bins per frame the subsampling expects (transformers derives the projection's
        input width from the first conv's channel count, which so equals the bin count)."""
        return self.subsampling_conv_channels[0]

    @property
    def context_size(self) -> int:
        return (
            self.attention_chunk_size
            + self.attention_context_left
            - 1
            + self.attention_context_right
        )


def output_length(frames: int) -> int:
    """Soft tokens of `frames` mel frames: two stride-2 convolutions (kernel 3, padding 1)."""
    for _ in range(2):
        frames = (frames + 2 - 3) // 2 + 1
    return max(frames, 0)


class SubsampleLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_channels, eps=eps, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        """[B, T, F, C] (time, frequency, channels) -> [B, T/2, F/2, C']."""
        return nn.relu(self.norm(self.conv(x.astype(self.conv.weight.dtype))))


class SubsampleConvProjection(nn.Module):
    def __init__(self, args: AudioArgs):
        super().__init__()
        c0, c1 = args.subsampling_conv_channels
        self.layer0 = SubsampleLayer(1, c0, args.rms_norm_eps)
        self.layer1 = SubsampleLayer(c0, c1, args.rms_norm_eps)
        self.input_proj_linear = nn.Linear((c0 // 4) * c1, args.hidden_size, bias=False)

    def __call__(self, features: mx.array) -> mx.array:
        """Mel frames [B, T, bins] -> [B, T/4, hidden]."""
        h = self.layer1(self.layer0(features[..., None]))
        B, T, F, C = h.shape
        return self.input_proj_linear(h.reshape(B, T, F * C))


def relative_positions(args: AudioArgs, dtype: mx.Dtype) -> mx.array:
    """Sinusoidal embeddings [context/2 + 1, hidden] of distances context/2 .. 0 ([sin, cos])."""
    half = args.hidden_size // 2
    increment = math.log(10_000.0) / max(half - 1, 1)
    inv_timescales = mx.exp(mx.arange(half, dtype=mx.float32) * -increment)
    distances = mx.arange(args.context_size // 2, -1, -1, dtype=mx.float32)[:, None]
    scaled = distances * inv_timescales[None]
    return mx.concatenate([mx.sin(scaled), mx.cos(scaled)], axis=-1).astype(dtype)


def chunk_mask(args: AudioArgs, length: int) -> mx.array:
    """Which keys each query sees, [blocks, chunk, context]: real frames at distance
    0 <= q - k < context_left - 1 behind, or 0 < k - q < context_right ahead."""
    C, past = args.attention_chunk_size, args.attention_context_left - 1
    blocks = -(-length // C)
    q = (mx.arange(blocks)[:, None, None] * C) + mx.arange(C)[None, :, None]
    k = (mx.arange(blocks)[:, None, None] * C) + mx.arange(args.context_size)[None, None, :] - past
    dist = q - k
    behind = (dist >= 0) & (dist < past)
    ahead = (dist < 0) & (-dist < args.attention_context_right)
    return (behind | ahead) & (k >= 0) & (k < length)


class AudioAttention(nn.Module):
    def __init__(self, args: AudioArgs):
        super().__init__()
        self.args = args
        d, clip = args.hidden_size, args.use_clipped_linears
        self.n_heads = args.num_attention_heads
        self.head_dim = d // self.n_heads
        self.q_scale = (self.head_dim**-0.5) / math.log(2)
        self.k_scale = math.log(1 + math.e) / math.log(2)
        self.q_proj = ClippableLinear(d, d, clip)
        self.k_proj = ClippableLinear(d, d, clip)
        self.v_proj = ClippableLinear(d, d, clip)
        self.post = ClippableLinear(d, d, clip)
        self.relative_k_proj = nn.Linear(d, d, bias=False)
        self.per_dim_scale = mx.zeros((self.head_dim,))

    def __call__(self, x: mx.array, positions: mx.array, mask: mx.array) -> mx.array:
        """x [B, T, hidden]; `positions` from `relative_positions`; `mask` from `chunk_mask`."""
        args = self.args
        B, T, _ = x.shape
        C, ctx = args.attention_chunk_size, args.context_size
        nh, hd = self.n_heads, self.head_dim
        blocks = -(-T // C)

        def project(layer: ClippableLinear) -> mx.array:
            return layer(x).astype(mx.float32).reshape(B, T, nh, hd)

        q = project(self.q_proj) * (
            self.q_scale * nn.softplus(self.per_dim_scale.astype(mx.float32))
        )
        k = project(self.k_proj) * self.k_scale
        v = project(self.v_proj)
        # Queries in chunks [B, nh, blocks, C, hd]; keys and values in each chunk's context window.
        q = mx.pad(q, [(0, 0), (0, blocks * C - T), (0, 0), (0, 0)])
        q = q.reshape(B, blocks, C, nh, hd).transpose(0, 3, 1, 2, 4)
        windows = mx.arange(blocks)[:, None] * C + mx.arange(ctx)[None, :]
        pad = [
            (0, 0),
            (ctx - C - args.attention_context_right, args.attention_context_right + C - 1),
        ]
        pad += [(0, 0), (0, 0)]
        k = mx.pad(k, pad)[:, windows].transpose(0, 3, 1, 4, 2)  # [B, nh, blocks, hd, ctx]
        v = mx.pad(v, pad)[:, windows].transpose(0, 3, 1, 2, 4)  # [B, nh, blocks, ctx, hd]

        content = q @ k
        rel = self.relative_k_proj(positions).astype(mx.float32).reshape(-1, nh, hd)
        relative = q.reshape(B, nh, blocks * C, hd) @ rel.transpose(1, 2, 0)
        relative = _relative_shift(relative.reshape(B, nh, blocks, C, -1), ctx)

        cap = args.attention_logit_cap
        logits = mx.tanh((content + relative) / cap) * cap
        logits = mx.where(mask, logits, args.attention_invalid_logits_value)
        out = mx.softmax(logits, axis=-1) @ v  # [B, nh, blocks, C, hd]
        out = out.transpose(0, 2, 3, 1, 4).reshape(B, blocks * C, nh * hd)[:, :T]
        return self.post(out.astype(x.dtype))


def _relative_shift(x: mx.array, ctx: int) -> mx.array:
    """Transformer-XL shift: [.., C, P] scores by distance -> [.., C, ctx] scores by key slot."""
    *lead, C, P = x.shape
    x = mx.pad(x, [(0, 0)] * (len(lead) + 1) + [(0, ctx + 1 - P)])
    x = x.reshape(*lead, C * (ctx + 1))[..., : C * ctx]
    return x.reshape(*lead, C, ctx)


class FeedForward(nn.Module):
    def __init__(self, args: AudioArgs):
        super().__init__()
        d, clip = args.hidden_size, args.use_clipped_linears
        self.ffw_layer_1 = ClippableLinear(d, 4 * d, clip)
        self.ffw_layer_2 = ClippableLinear(4 * d, d, clip)
        self.pre_layer_norm = RMSNorm(d, args.rms_norm_eps)
        self.post_layer_norm = RMSNorm(d, args.rms_norm_eps)
        self.clip = args.gradient_clipping
        self.scale = args.residual_weight

    def __call__(self, x: mx.array) -> mx.array:
        h = self.pre_layer_norm(_clip(x, self.clip))
        h = self.ffw_layer_2(nn.silu(self.ffw_layer_1(h)))
        return x + self.post_layer_norm(_clip(h, self.clip)) * self.scale


class LightConv1d(nn.Module):
    def __init__(self, args: AudioArgs):
        super().__init__()
        d, clip = args.hidden_size, args.use_clipped_linears
        self.linear_start = ClippableLinear(d, 2 * d, clip)
        self.linear_end = ClippableLinear(d, d, clip)
        self.depthwise_conv1d = nn.Conv1d(d, d, args.conv_kernel_size, groups=d, bias=False)
        self.pre_layer_norm = RMSNorm(d, args.rms_norm_eps)
        self.conv_norm = RMSNorm(d, args.rms_norm_eps)
        self.clip = args.gradient_clipping
        self.left_pad = args.conv_kernel_size - 1

    def __call__(self, x: mx.array) -> mx.array:
        a, gate = mx.split(self.linear_start(self.pre_layer_norm(x)), 2, axis=-1)
        h = a * mx.sigmoid(gate)
        h = self.depthwise_conv1d(mx.pad(h, [(0, 0), (self.left_pad, 0), (0, 0)]))
        h = nn.silu(self.conv_norm(_clip(h, self.clip)))
        return x + self.linear_end(h)


class ConformerLayer(nn.Module):
    def __init__(self, args: AudioArgs):
        super().__init__()
        d = args.hidden_size
        self.feed_forward1 = FeedForward(args)
        self.feed_forward2 = FeedForward(args)
        self.self_attn = AudioAttention(args)
        self.lconv1d = LightConv1d(args)
        self.norm_pre_attn = RMSNorm(d, args.rms_norm_eps)
        self.norm_post_attn = RMSNorm(d, args.rms_norm_eps)
        self.norm_out = RMSNorm(d, args.rms_norm_eps)
        self.clip = args.gradient_clipping

    def __call__(self, x: mx.array, positions: mx.array, mask: mx.array) -> mx.array:
        x = self.feed_forward1(x)
        a = self.self_attn(self.norm_pre_attn(_clip(x, self.clip)), positions, mask)
        x = x + self.norm_post_attn(_clip(a, self.clip))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(_clip(x, self.clip))


def _clip(x: mx.array, bound: float) -> mx.array:
    """transformers' gradient clipping, bounded by the dtype's range (float16: 65504)."""
    bound = min(bound, _dtype_max(x.dtype))
    return mx.clip(x, -bound, bound)


def _dtype_max(dtype: mx.Dtype) -> float:
    return float(mx.finfo(dtype).max) if mx.issubdtype(dtype, mx.floating) else math.inf


class AudioModel(nn.Module):
    """`model(mel [frames, bins]) -> [output_length(frames), output_proj_dims]` of one clip."""

    def __init__(self, args: AudioArgs):
        super().__init__()
        self.args = args
        self.subsample_conv_projection = SubsampleConvProjection(args)
        self.layers = [ConformerLayer(args) for _ in range(args.num_hidden_layers)]
        self.output_proj = nn.Linear(args.hidden_size, args.output_proj_dims, bias=True)

    def __call__(self, mel: mx.array) -> mx.array:
        h = self.subsample_conv_projection(mel[None])
        positions = relative_positions(self.args, h.dtype)
        mask = chunk_mask(self.args, h.shape[1])
        for layer in self.layers:
            h = layer(h, positions, mask)
        return self.output_proj(h)[0]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Tower names relative to the tower; PyTorch convolution layouts -> MLX's (idempotent)."""
        out = {}
        c0 = self.args.subsampling_conv_channels[0]
        for name, value in drop_unused_clip_bounds(weights, self.args.use_clipped_linears).items():
            if name.endswith("conv.weight") and value.ndim == 4:
                in_channels = 1 if ".layer0." in f".{name}" else c0
                if value.shape[-1] != in_channels:  # [out, in, kh, kw] -> [out, kh, kw, in]
                    value = value.transpose(0, 2, 3, 1)
            elif (
                name.endswith("depthwise_conv1d.weight")
                and value.ndim == 3
                and value.shape[-1] != 1
            ):
                value = value.transpose(0, 2, 1)  # [out, 1, k] -> [out, k, 1]
            out[name] = value
        return out
