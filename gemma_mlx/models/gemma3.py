"""Gemma 3 text decoder (the built-in default model is the Gemma 3 270M).

Gemma 3 is the Gemma 4 decoder minus v norm, layer scalar, PLE, KV sharing and MoE, with norms that
scale by (1 + w), attention scaled by `query_pre_attn_scalar ** -0.5` and standard RoPE on both layer
types (linear scaling optional on full layers). So this file only reads the config.
"""

from __future__ import annotations

from typing import Any

from gemma_mlx.models import gemma4
from gemma_mlx.models.base import ConfigError, read, read_layer_types
from gemma_mlx.models.gemma4 import FULL, SLIDING, Model

__all__ = ["Model", "ModelArgs"]


def _read_rope(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """RoPE per layer type from transformers 5 `rope_parameters` or the 4.x keys."""
    if "rope_parameters" in config and config["rope_parameters"] is not None:
        rope = read(config, "rope_parameters", dict)
        if SLIDING in rope and FULL in rope:
            return rope
    full = {"rope_type": "default", "rope_theta": read(config, "rope_theta", float)}
    scaling = config.get("rope_scaling")
    if scaling:
        full |= {"rope_type": scaling.get("rope_type", scaling.get("type")), **scaling}
    sliding = {"rope_type": "default", "rope_theta": read(config, "rope_local_base_freq", float)}
    return {SLIDING: sliding, FULL: full}


class ModelArgs(gemma4.ModelArgs):
    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        config = config.get("text_config") or config
        for key in ("attn_logit_softcapping", "use_bidirectional_attention"):
            if config.get(key):
                raise ConfigError(f"config.json: '{key}' = {config[key]!r} is not supported")
        num_layers = read(config, "num_hidden_layers", int)
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
            layer_types=read_layer_types(config, num_layers),
            rope_parameters=_read_rope(config),
            max_position_embeddings=read(config, "max_position_embeddings", int),
            tie_word_embeddings=read(config, "tie_word_embeddings", bool, True),
            final_logit_softcapping=read(config, "final_logit_softcapping", float, None),
            embed_scale_dtype=read(config, "embed_scale_dtype", str, None),
            norm_offset=1.0,
            query_scale=read(config, "query_pre_attn_scalar", (int, float)) ** -0.5,
            use_v_norm=False,
            use_layer_scalar=False,
        )
        args.validate()
        return args
