"""Gemma 4 text decoder (E2B, E4B, 12B "unified", 26B-A4B MoE, 31B), text-only.

Forward pass as in transformers' `Gemma4TextModel` (see docs/architecture.md):
attention scale 1.0 with q/k RMSNorm (weighted) and v RMSNorm (weightless); 256-dim sliding layers
and 512-dim full layers with "proportional" RoPE; `attention_k_eq_v` full layers (v = raw k);
per-layer embeddings (PLE) and KV sharing on E2B/E4B; double-wide MLP in shared layers (E2B);
a MoE block beside the dense MLP (26B-A4B); `layer_scalar`; final logit softcap.

Gemma 3 is the same decoder with (1 + w) norms, a query scale, no v norm and no layer scalar:
`gemma3.py` reuses these classes through the `norm_offset`, `query_scale`, `use_v_norm` and
`use_layer_scalar` fields of `ModelArgs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from gemma_mlx.cache import (
    DEFAULT_MAX_TRIM,
    KVCache,
    RotatingKVCache,
    attention_mask,
    window_start,
)
from gemma_mlx.kernels.attention import attention
from gemma_mlx.kernels.heads import attention_heads
from gemma_mlx.kernels.moe import dispatch, dispatch_pays, route
from gemma_mlx.kernels.operands import Matrix, Norm, Rotary
from gemma_mlx.kernels.projection import project, project_geglu
from gemma_mlx.kernels.residual import moe_residual, residual
from gemma_mlx.models.base import (
    ConfigError,
    RMSNorm,
    RoPE,
    geglu,
    make_rope,
    read,
    read_layer_types,
    softcap,
)
from gemma_mlx.models.switch import SwitchLinear
from gemma_mlx.ragged import RaggedBatch, Segment

SLIDING, FULL = "sliding_attention", "full_attention"

# Default RoPE of every released Gemma 4 (transformers' Gemma4TextConfig.__post_init__).
DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}

# Weights of the multimodal towers; a text-only load skips them.
MULTIMODAL_PREFIXES = (
    "vision_tower.",
    "embed_vision.",
    "audio_tower.",
    "embed_audio.",
    "vision_embedder.",
    "multi_modal_projector.",
)


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    sliding_window: int
    layer_types: list[str]
    rope_parameters: dict[str, dict[str, Any]]
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    global_head_dim: int | None = None  # head dim of full layers (None: same as head_dim)
    num_global_key_value_heads: int | None = None  # KV heads of k_eq_v full layers
    attention_k_eq_v: bool = False
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 0
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    enable_moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    final_logit_softcapping: float | None = None
    embed_scale_dtype: str | None = None  # dtype sqrt(H) is rounded to; None = the weights' dtype
    # Knobs that make this decoder Gemma 3 (set by gemma3.ModelArgs).
    norm_offset: float = 0.0
    query_scale: float = 1.0
    use_v_norm: bool = True
    use_layer_scalar: bool = True

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        """Read a Gemma 4 text config (flat, or nested under `text_config`) strictly."""
        config = config.get("text_config") or config
        if config.get("use_bidirectional_attention") == "all":
            raise ConfigError(
                "config.json: 'use_bidirectional_attention' = 'all' (an encoder) is not supported"
            )
        num_layers = read(config, "num_hidden_layers", int)
        layer_types = read_layer_types(config, num_layers)
        if layer_types[-1] != FULL:
            raise ConfigError(
                "config.json: the last entry of 'layer_types' must be 'full_attention'"
            )
        global_head_dim, global_kv = _read_full_layer_overrides(config, layer_types)
        moe = read(config, "enable_moe_block", bool, False)
        args = cls(
            model_type=read(config, "model_type", str),
            hidden_size=read(config, "hidden_size", int),
            num_hidden_layers=num_layers,
            intermediate_size=read(config, "intermediate_size", int),
            num_attention_heads=read(config, "num_attention_heads", int),
            num_key_value_heads=read(config, "num_key_value_heads", int),
            head_dim=read(config, "head_dim", int),
            vocab_size=read(config, "vocab_size", int),
            rms_norm_eps=read(config, "rms_norm_eps", float),
            sliding_window=read(config, "sliding_window", int),
            layer_types=layer_types,
            rope_parameters=read(config, "rope_parameters", dict, DEFAULT_ROPE),
            max_position_embeddings=read(config, "max_position_embeddings", int),
            tie_word_embeddings=read(config, "tie_word_embeddings", bool, True),
            global_head_dim=global_head_dim,
            num_global_key_value_heads=global_kv,
            attention_k_eq_v=read(config, "attention_k_eq_v", bool, False),
            hidden_size_per_layer_input=read(config, "hidden_size_per_layer_input", int, 0),
            vocab_size_per_layer_input=read(config, "vocab_size_per_layer_input", int, 0),
            num_kv_shared_layers=read(config, "num_kv_shared_layers", int, 0),
            use_double_wide_mlp=read(config, "use_double_wide_mlp", bool, False),
            enable_moe_block=moe,
            num_experts=read(config, "num_experts", int) if moe else 0,
            top_k_experts=read(config, "top_k_experts", int) if moe else 0,
            moe_intermediate_size=read(config, "moe_intermediate_size", int) if moe else 0,
            final_logit_softcapping=read(config, "final_logit_softcapping", float, None),
            embed_scale_dtype=read(config, "embed_scale_dtype", str, None),
        )
        args.validate()
        return args

    def validate(self) -> None:
        if self.hidden_size_per_layer_input and not self.vocab_size_per_layer_input:
            raise ConfigError(
                "config.json: 'hidden_size_per_layer_input' is set but "
                "'vocab_size_per_layer_input' is missing"
            )
        if not 0 <= self.num_kv_shared_layers < self.num_hidden_layers:
            raise ConfigError(
                f"config.json: 'num_kv_shared_layers' = {self.num_kv_shared_layers} must be "
                f"below 'num_hidden_layers' = {self.num_hidden_layers}"
            )
        producers = set(self.layer_types[: self.first_kv_shared_layer])
        if self.num_kv_shared_layers and producers != set(self.layer_types):
            raise ConfigError(
                "config.json: with 'num_kv_shared_layers', every layer type must appear "
                "among the non-shared layers"
            )
        if self.enable_moe_block and not 0 < self.top_k_experts <= self.num_experts:
            raise ConfigError(
                f"config.json: 'top_k_experts' = {self.top_k_experts} must be in "
                f"1..'num_experts' = {self.num_experts}"
            )
        for layer_type in set(self.layer_types):
            if layer_type not in self.rope_parameters:
                raise ConfigError(f"config.json: 'rope_parameters' has no entry for {layer_type!r}")
        for layer in range(self.num_hidden_layers):
            if self.num_attention_heads % self.n_kv_heads(layer):
                raise ConfigError(
                    f"config.json: layer {layer} has {self.n_kv_heads(layer)} KV heads, which does not "
                    f"divide 'num_attention_heads' = {self.num_attention_heads}"
                )

    # Per-layer structure, derived once from the config.
    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def layer_head_dim(self, layer: int) -> int:
        if self.is_sliding(layer) or self.global_head_dim is None:
            return self.head_dim
        return self.global_head_dim

    def k_eq_v(self, layer: int) -> bool:
        return self.attention_k_eq_v and not self.is_sliding(layer)

    def n_kv_heads(self, layer: int) -> int:
        if self.k_eq_v(layer) and self.num_global_key_value_heads is not None:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    def kv_producer(self, layer: int) -> int:
        """The layer whose keys/values `layer` attends: itself, or the last non-shared one of its type."""
        first_shared = self.first_kv_shared_layer
        if layer < first_shared:
            return layer
        return max(i for i in range(first_shared) if self.layer_types[i] == self.layer_types[layer])

    def mlp_width(self, layer: int) -> int:
        shared = layer >= self.first_kv_shared_layer
        return self.intermediate_size * (2 if self.use_double_wide_mlp and shared else 1)


def _read_full_layer_overrides(
    config: dict[str, Any], layer_types: list[str]
) -> tuple[int | None, int | None]:
    """Head dim and KV heads of full layers, from either serialization of the config.

    Google's configs write `global_head_dim` / `num_global_key_value_heads`; transformers >= 5.2x
    writes `per_layer_config` ({"05": {"head_dim": 512, "num_key_value_heads": 2}, ...}) instead.
    """
    if config.get("per_layer_config"):
        overrides = read(config, "per_layer_config", dict)
        full_layers = {i for i, t in enumerate(layer_types) if t == FULL}
        parsed = {}
        for key, value in overrides.items():
            try:
                layer = int(key)
            except ValueError as e:
                raise ConfigError(
                    f"config.json: 'per_layer_config' key {key!r} is not a layer"
                ) from e
            if layer not in full_layers:
                raise ConfigError(
                    f"config.json: 'per_layer_config' overrides layer {layer}, "
                    "which is not a full-attention layer"
                )
            parsed[layer] = (value.get("head_dim"), value.get("num_key_value_heads"))
        if set(parsed) != full_layers or len(set(parsed.values())) != 1:
            raise ConfigError(
                "config.json: 'per_layer_config' must give every full-attention layer "
                "the same overrides"
            )
        return next(iter(parsed.values()))
    if any(t == FULL for t in layer_types):
        return (
            read(config, "global_head_dim", int),
            read(config, "num_global_key_value_heads", int, None),
        )
    return None, None


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.n_kv_heads(layer)
        self.head_dim = args.layer_head_dim(layer)
        self.scale = args.query_scale
        self.owns_kv = layer < args.first_kv_shared_layer
        self.k_eq_v = args.k_eq_v(layer)
        dim, eps = args.hidden_size, args.rms_norm_eps

        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps, args.norm_offset)
        if self.owns_kv:
            self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
            if not self.k_eq_v:
                self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
            self.k_norm = RMSNorm(self.head_dim, eps, args.norm_offset)
            self.v_norm = RMSNorm(self.head_dim, eps, weight=False) if args.use_v_norm else None
        self.layer_type = args.layer_types[layer]
        self.rope: RoPE = make_rope(
            args.rope_parameters[self.layer_type],
            self.head_dim,
            f"rope_parameters[{self.layer_type!r}]",
        )

    def __call__(
        self,
        x: mx.array,
        position: int,
        mask: str | mx.array | None,
        cache: KVCache | RotatingKVCache | None = None,
        shared_kv: tuple[mx.array, mx.array] | None = None,
        input_norm: RMSNorm | None = None,
    ) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        """Attention of `x`, RMS-normed by `input_norm` first when given. Each step is a fused
        operation of `gemma_mlx.kernels` (one kernel per step for a decoded token on Metal, the
        composed MLX ops otherwise)."""
        B, T, _ = x.shape
        norm = None if input_norm is None else Norm.of(input_norm)
        if shared_kv is not None:
            (q,) = project(x, [Matrix.of(self.q_proj)], norm)
            q = self._heads(q, None, None, position)[0]
            k, v = shared_kv
        else:
            layers = [self.q_proj, self.k_proj] + ([] if self.k_eq_v else [self.v_proj])
            q, k, *v = project(x, [Matrix.of(layer) for layer in layers], norm)
            q, k, v = self._heads(q, k, v[0] if v else None, position)
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1)), (k, v)

    def _heads(
        self, q: mx.array, k: mx.array | None, v: mx.array | None, position: int
    ) -> tuple[mx.array, mx.array | None, mx.array | None]:
        """Projections [B, T, heads * head_dim] -> heads [B, heads, T, head_dim]: queries and
        keys normed and rotated, values normed (taken from the keys when v is None)."""
        k_norm = None if k is None else Norm.of(self.k_norm)
        v_norm = None if k is None or self.v_norm is None else Norm.of(self.v_norm)
        rotary = Rotary.of(self.rope)
        return attention_heads(q, k, v, Norm.of(self.q_norm), k_norm, v_norm, rotary, position)

    def batched(
        self,
        x: mx.array,
        batch: RaggedBatch,
        layer: int,
        shared: list[tuple[mx.array, mx.array]] | None,
    ) -> tuple[mx.array, list[tuple[mx.array, mx.array]]]:
        """Attention of a ragged batch (`gemma_mlx.ragged`): projections and RoPE over every row
        at once (each row at its own position), then each sequence's rows against its own cache
        (`layer` of its caches) or its entry of `shared`: the call it makes alone, stacked with
        the calls of the same shapes, or one call for all the pooled sequences
        (`RaggedBatch.write`, `RaggedBatch.attention`)."""
        # Rows as a batch of one-position sequences, [N, heads, 1, head_dim], so that one RoPE
        # call puts each row at its own position; a sequence's rows are a view of it.
        q = self.rope(self._queries(x)[0][:, :, None], batch.positions)
        if shared is None:
            k, v = self._keys_values(x)
            k = self.rope(k[0][:, :, None], batch.positions)
            kvs = batch.write(layer, k, v[0][:, :, None])
        else:
            kvs = shared

        def attend(q: mx.array, k: mx.array, v: mx.array, mask: str | mx.array | None):
            return attention(q, k, v, self.scale, mask)

        out = batch.attention(q, kvs, self.layer_type, attend, reused=shared is not None)
        return self.o_proj(out[None]), kvs

    def _queries(self, x: mx.array) -> mx.array:
        """Normed queries [B, T, heads, head_dim], before RoPE."""
        B, T, _ = x.shape
        return self.q_norm(self.q_proj(x).reshape(B, T, self.n_heads, self.head_dim))

    def _keys_values(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Normed keys and values [B, T, kv heads, head_dim], before RoPE."""
        B, T, _ = x.shape
        k = self.k_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim)
        v = k if self.k_eq_v else self.v_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim)
        if self.v_norm is not None:
            v = self.v_norm(v)
        return self.k_norm(k), v


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = Matrix.of(self.gate_proj), Matrix.of(self.up_proj)
        return self.down_proj(project_geglu(x, gate, up))


class Router(nn.Module):
    """Top-k expert choice: softmax over the k largest logits (= renormalized top-k softmax)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.eps = args.rms_norm_eps
        self.top_k = args.top_k_experts
        self.root_size = args.hidden_size**-0.5
        self.proj = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.scale = mx.ones((args.hidden_size,))
        self.per_expert_scale = mx.ones((args.num_experts,))

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        norm = Norm(self.scale, self.eps, scale=self.root_size)
        (logits,) = project(x, [Matrix.of(self.proj)], norm, out_dtype=mx.float32)
        return route(logits, self.per_expert_scale, self.top_k)


class SwitchGLU(nn.Module):
    """Per-expert GeGLU MLPs stored as [E, out, in] stacks (mlx-lm's layout and names)."""

    def __init__(self, dim: int, hidden: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(dim, hidden, num_experts)
        self.up_proj = SwitchLinear(dim, hidden, num_experts)
        self.down_proj = SwitchLinear(hidden, dim, num_experts)

    def __call__(self, x: mx.array, ids: mx.array, weights: mx.array) -> mx.array:
        """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) for x [N, H], ids/weights [N, k]."""
        y = self.outputs(x, ids)
        return (y * mx.expand_dims(weights, -1).astype(y.dtype)).sum(axis=-2)

    def outputs(self, x: mx.array, ids: mx.array) -> mx.array:
        """Expert outputs [N, k, H] for x [N, H], ids [N, k], before their weighting."""
        N, k = ids.shape
        if dispatch_pays(N * k, self.gate_proj.num_experts):
            return self.grouped(x, ids)
        return self.per_pair(x, ids)

    def per_pair(self, x: mx.array, ids: mx.array) -> mx.array:
        """Expert outputs [N, k, H], each (token, expert) pair multiplied where it stands."""
        rows = mx.expand_dims(x, (-2, -3))  # [N, 1, 1, H] against ids [N, k]
        h = geglu(self.gate_proj(rows, ids), self.up_proj(rows, ids))
        return self.down_proj(h, ids).squeeze(-2)

    def grouped(self, x: mx.array, ids: mx.array) -> mx.array:
        """Expert outputs [N, k, H], the pairs multiplied grouped by expert (MLX's sorted kernel
        reads each expert once for its run of rows), then put back in order."""
        N, k = ids.shape
        pairs = dispatch(ids, self.gate_proj.num_experts)
        rows = mx.expand_dims(x[pairs.sorted_tokens], -2)  # [N*k, 1, H], grouped by expert
        sorted_ids = pairs.sorted_ids
        h = geglu(
            self.gate_proj(rows, sorted_ids, sorted_indices=True),
            self.up_proj(rows, sorted_ids, sorted_indices=True),
        )
        y = self.down_proj(h, sorted_ids, sorted_indices=True).squeeze(-2)
        return y[pairs.inverse_order].reshape(N, k, -1)


class Experts(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.switch_glu = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.num_experts)

    def __call__(self, x: mx.array, ids: mx.array, weights: mx.array) -> mx.array:
        k = ids.shape[-1]
        y = self.switch_glu(x.reshape(-1, x.shape[-1]), ids.reshape(-1, k), weights.reshape(-1, k))
        return y.reshape(x.shape)

    def outputs(self, x: mx.array, ids: mx.array) -> mx.array:
        """The routed experts' outputs [N, k, H] for x [..., H] (N rows), ids [..., k]."""
        k = ids.shape[-1]
        return self.switch_glu.outputs(x.reshape(-1, x.shape[-1]), ids.reshape(-1, k))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        dim, eps, offset = args.hidden_size, args.rms_norm_eps, args.norm_offset
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(dim, args.mlp_width(layer))
        self.input_layernorm = RMSNorm(dim, eps, offset)
        self.post_attention_layernorm = RMSNorm(dim, eps, offset)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps, offset)
        self.post_feedforward_layernorm = RMSNorm(dim, eps, offset)
        self.moe = args.enable_moe_block
        if self.moe:
            self.router = Router(args)
            self.experts = Experts(args)
            self.pre_feedforward_layernorm_2 = RMSNorm(dim, eps)
            self.post_feedforward_layernorm_1 = RMSNorm(dim, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(dim, eps)
        self.ple_dim = args.hidden_size_per_layer_input
        if self.ple_dim:
            self.per_layer_input_gate = nn.Linear(dim, self.ple_dim, bias=False)
            self.per_layer_projection = nn.Linear(self.ple_dim, dim, bias=False)
            self.post_per_layer_input_norm = RMSNorm(dim, eps)
        if args.use_layer_scalar:
            self.layer_scalar = mx.ones((1,))

    def __call__(
        self,
        x: mx.array,
        position: int,
        mask: str | mx.array | None,
        cache: KVCache | RotatingKVCache | None,
        shared_kv: tuple[mx.array, mx.array] | None,
        per_layer_input: mx.array | None,
    ) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        a, kv = self.self_attn(x, position, mask, cache, shared_kv, self.input_layernorm)
        return self.feed_forward(x, a, per_layer_input), kv

    def batched(
        self,
        x: mx.array,
        batch: RaggedBatch,
        layer: int,
        shared: list[tuple[mx.array, mx.array]] | None,
        per_layer_input: mx.array | None,
    ) -> tuple[mx.array, list[tuple[mx.array, mx.array]]]:
        """The layer over a ragged batch (`Attention.batched`); everything after attention is
        per row, so it runs on all rows at once."""
        a, kvs = self.self_attn.batched(self.input_layernorm(x), batch, layer, shared)
        return self.feed_forward(x, a, per_layer_input), kvs

    def feed_forward(self, x: mx.array, a: mx.array, per_layer_input: mx.array | None) -> mx.array:
        """Everything after attention output `a`: residuals, MLP (and MoE), PLE, layer scalar;
        each residual step (sum, scalar, the next norms) one fused `residual`."""
        inputs = [self.pre_feedforward_layernorm]
        if self.moe:
            inputs.append(self.pre_feedforward_layernorm_2)
        post = Norm.of(self.post_attention_layernorm)
        h, normed = residual(x, a, post, None, [Norm.of(n) for n in inputs])
        f = self.mlp(normed[0])
        scalar = self.get("layer_scalar")
        end_scalar = None if self.ple_dim else scalar  # the scalar ends the layer
        post = Norm.of(self.post_feedforward_layernorm)
        if self.moe:
            weights, ids = self.router(h)
            y = self.experts.outputs(normed[1], ids)
            post1 = Norm.of(self.post_feedforward_layernorm_1)
            post2 = Norm.of(self.post_feedforward_layernorm_2)
            out = moe_residual(h, f, y, weights, post1, post2, post, end_scalar)
        else:
            out = residual(h, f, post, end_scalar)[0]
        if not self.ple_dim:
            return out
        g = project_geglu(out, Matrix.of(self.per_layer_input_gate), per_layer_input)
        post = Norm.of(self.post_per_layer_input_norm)
        return residual(out, self.per_layer_projection(g), post, scalar)[0]


def _scaled(value: float, dtype: str | None, like: mx.array) -> mx.array:
    """An embedding scale rounded like transformers: to the checkpoint's dtype (or `dtype`)."""
    rounded = mx.array(value, getattr(mx, dtype) if dtype else like.dtype)
    return rounded.astype(like.dtype)


class TextModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.norm_offset)
        P = args.hidden_size_per_layer_input
        if P:
            L = args.num_hidden_layers
            self.embed_tokens_per_layer = nn.Embedding(args.vocab_size_per_layer_input, L * P)
            self.per_layer_model_projection = nn.Linear(args.hidden_size, L * P, bias=False)
            self.per_layer_projection_norm = RMSNorm(P, args.rms_norm_eps)

    def embed(self, inputs: mx.array) -> mx.array:
        h = self.embed_tokens(inputs)
        return h * _scaled(self.args.hidden_size**0.5, self.args.embed_scale_dtype, h)

    def per_layer_inputs(self, inputs: mx.array, h: mx.array) -> mx.array:
        """PLE: (token-identity row + projection of the embedding) / sqrt(2), [B, T, L, P]."""
        B, T = inputs.shape
        L, P = self.args.num_hidden_layers, self.args.hidden_size_per_layer_input
        tok = self.embed_tokens_per_layer(inputs)
        tok = (tok * _scaled(P**0.5, None, tok)).reshape(B, T, L, P)
        proj = self.per_layer_model_projection(h) * (self.args.hidden_size**-0.5)
        proj = self.per_layer_projection_norm(proj.reshape(B, T, L, P))
        return (proj + tok.astype(proj.dtype)) * (2.0**-0.5)

    def __call__(
        self,
        inputs: mx.array,
        cache: list | None = None,
        keep: int | None = None,
        embeddings: mx.array | None = None,
        attention_masks: Callable[[str, int, int, int], str | mx.array | None] | None = None,
    ) -> mx.array:
        """Final-normed hidden states of the last `keep` positions (all when None).

        A multimodal prompt (`gemma4_multimodal`) passes `embeddings` [B, T, H] in place of the
        token embeddings (`inputs` still feed the per-layer inputs) and
        `attention_masks(layer_type, query_start, query_end, key_start)` in place of causal masks.
        """
        args = self.args
        T = inputs.shape[1]
        h = self.embed(inputs) if embeddings is None else embeddings
        ple = self.per_layer_inputs(inputs, h) if args.hidden_size_per_layer_input else None
        start = cache[0].offset if cache else 0
        key_starts = {t: window_start(start, self._window(t, cache)) for t in (SLIDING, FULL)}
        query_start = start

        def masks() -> dict[str, str | mx.array | None]:
            if attention_masks is not None:
                return {
                    t: attention_masks(t, query_start, start + T, key_starts[t])
                    for t in (SLIDING, FULL)
                }
            return {
                t: attention_mask(query_start, start + T, key_starts[t], self._window(t, cache))
                for t in (SLIDING, FULL)
            }

        layer_masks = masks()
        shared: dict[str, tuple[mx.array, mx.array]] = {}
        first_shared = args.first_kv_shared_layer
        for i, layer in enumerate(self.layers):
            if i == first_shared and keep is not None and keep < T:
                # Shared layers write no cache: only the kept positions need them.
                if keep == 0:
                    return h[:, T:]
                h = h[:, T - keep :]
                ple = ple[:, T - keep :] if ple is not None else None
                query_start = start + T - keep
                layer_masks = masks()
            layer_type = args.layer_types[i]
            owns_kv = i < first_shared
            h, kv = layer(
                h,
                query_start,
                layer_masks[layer_type],
                cache[i] if (cache and owns_kv) else None,
                None if owns_kv else shared[layer_type],
                ple[:, :, i] if ple is not None else None,
            )
            if owns_kv:  # the last owner of each type is what the shared layers read
                shared[layer_type] = kv
        if keep is not None:
            h = h[:, h.shape[1] - keep :]
        return self.norm(h)

    def batched(self, inputs: mx.array, segments: list[Segment]) -> mx.array:
        """Final-normed hidden states [1, kept rows, H] of a ragged batch: `inputs` [N] holds
        every segment's new tokens in segment order; each segment's last `keep` rows come out,
        in the same order (see `gemma_mlx.ragged`)."""
        args = self.args
        batch = RaggedBatch.of(segments, {t: self._window(t) for t in (SLIDING, FULL)})
        if inputs.shape != (batch.n_rows,):
            raise ValueError(f"inputs {inputs.shape} are not the segments' {batch.n_rows} tokens")
        h = self.embed(inputs[None])
        ple = self.per_layer_inputs(inputs[None], h) if args.hidden_size_per_layer_input else None
        cropped = all(s.keep == s.length for s in segments)
        shared: dict[str, list[tuple[mx.array, mx.array]]] = {}
        first_shared = args.first_kv_shared_layer
        for i, layer in enumerate(self.layers):
            if i == first_shared and not cropped:
                # Shared layers write no cache: only the kept rows need them.
                h, ple, batch, cropped = *self._kept(h, ple, batch), True
                if batch.n_rows == 0:
                    return h
            layer_type = args.layer_types[i]
            owns_kv = i < first_shared
            h, kvs = layer.batched(
                h,
                batch,
                i,
                None if owns_kv else shared[layer_type],
                ple[:, :, i] if ple is not None else None,
            )
            if owns_kv:  # the last owner of each type is what the shared layers read
                shared[layer_type] = kvs
        if not cropped:
            h = self._kept(h, None, batch)[0]
        return self.norm(h)

    @staticmethod
    def _kept(
        h: mx.array, ple: mx.array | None, batch: RaggedBatch
    ) -> tuple[mx.array, mx.array | None, RaggedBatch]:
        rows = batch.kept_rows()
        return h[:, rows], None if ple is None else ple[:, rows], batch.kept()

    def _window(self, layer_type: str, cache: list | None = None) -> int | None:
        """Positions a query of `layer_type` sees: the sliding window, or for full layers all of
        them, unless their cache is a rotating one (`make_cache(max_kv_size=N)`)."""
        if layer_type == SLIDING:
            return self.args.sliding_window
        owners = self.args.layer_types[: len(cache or ())]
        return getattr(cache[owners.index(FULL)], "window", None) if FULL in owners else None


class Model(nn.Module):
    """Causal LM: `model(tokens [B, T], cache) -> logits [B, T, vocab]`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = TextModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self,
        inputs: mx.array,
        cache: list | None = None,
        logits_to_keep: int | None = None,
        return_hidden: bool = False,
    ) -> mx.array | tuple[mx.array, mx.array]:
        """Logits of the last `logits_to_keep` positions (all when None).

        `logits_to_keep=1` at prefill lets KV-shared layers (E2B/E4B) skip every other prompt
        position; `0` only fills the caches. `return_hidden` adds the final-normed hidden states.
        """
        h = self.model(inputs, cache, logits_to_keep)
        logits = self.head(h)
        return (logits, h) if return_hidden else logits

    def batched(
        self, inputs: mx.array, segments: list[Segment], return_hidden: bool = False
    ) -> mx.array | tuple[mx.array, mx.array]:
        """Logits [kept rows, vocab] of several sequences in one pass (`gemma_mlx.ragged`):
        `inputs` [N] holds each segment's new tokens in segment order, each written into that
        segment's caches; rows come out for each segment's last `keep` tokens, in order.
        `return_hidden` adds their final-normed hidden states [kept rows, H]."""
        h = self.model.batched(inputs, segments)
        logits = self.head(h)[0] if h.shape[1] else mx.zeros((0, self.args.vocab_size), h.dtype)
        return (logits, h[0]) if return_hidden else logits

    def head(self, h: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(h)
        else:
            logits = self.lm_head(h)
        return softcap(logits, self.args.final_logit_softcapping)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def make_cache(
        self, max_trim: int = DEFAULT_MAX_TRIM, max_kv_size: int | None = None
    ) -> list[KVCache | RotatingKVCache]:
        """One cache per layer that owns KV; sliding caches keep `max_trim` extra positions.
        `max_kv_size`: full layers too keep only their last N positions (mlx-lm's option; they
        then attend to those alone)."""
        return [
            RotatingKVCache(self.args.sliding_window, max_trim)
            if self.args.is_sliding(i)
            else KVCache()
            if max_kv_size is None
            else RotatingKVCache(max_kv_size, max_trim)
            for i in range(self.args.first_kv_shared_layer)
        ]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """HF checkpoint names -> ours; drops towers, rotary buffers and shared layers' K/V."""
        out = {}
        first_shared = self.args.first_kv_shared_layer
        for name, value in weights.items():
            name = _strip_text_prefix(name)
            if name is None or "rotary_emb" in name:
                continue
            if name.startswith("model.layers."):
                layer = int(name.split(".")[2])
                if layer >= first_shared and any(
                    f".self_attn.{p}." in name for p in ("k_proj", "v_proj", "k_norm", "v_norm")
                ):
                    continue
            if name.endswith(".experts.gate_up_proj"):
                base = name.removesuffix("gate_up_proj")
                gate, up = mx.split(value, 2, axis=-2)
                out[base + "switch_glu.gate_proj.weight"] = gate
                out[base + "switch_glu.up_proj.weight"] = up
                continue
            if name.endswith(".experts.down_proj"):
                out[name.removesuffix("down_proj") + "switch_glu.down_proj.weight"] = value
                continue
            out[name] = value
        if self.args.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out


def _strip_text_prefix(name: str) -> str | None:
    """Map multimodal (`model.language_model.`) and text-only (`model.`) names onto `model.`."""
    for prefix in ("model.language_model.", "language_model.model.", "language_model."):
        if name.startswith(prefix):
            return "model." + name[len(prefix) :]
    if name.startswith("model."):
        rest = name[len("model.") :]
        return None if rest.startswith(MULTIMODAL_PREFIXES) else name
    if name.startswith(MULTIMODAL_PREFIXES):
        return None
    return name
