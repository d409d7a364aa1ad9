"""Tiny random Gemma checkpoints written by transformers (torch), the reference implementation.

Each factory returns a transformers config; `save_reference` instantiates the torch model with
random weights (norm weights, layer scalars and router scales perturbed so that no parameter sits
at a neutral value), saves it as a Hugging Face directory and returns the torch model for
comparison.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    Gemma4Config,
    Gemma4TextConfig,
)
from transformers.models.gemma4_unified.configuration_gemma4_unified import (
    Gemma4UnifiedConfig,
    Gemma4UnifiedTextConfig,
)

VOCAB = 512
WINDOW = 8
S, F = "sliding_attention", "full_attention"


def _gemma4_text(**overrides) -> dict:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        sliding_window=WINDOW,
        layer_types=[S, S, F, S, S, F],
        max_position_embeddings=1024,
        final_logit_softcapping=30.0,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=VOCAB,
        initializer_range=0.08,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    base.update(overrides)
    return base


def e2b_like() -> Gemma4TextConfig:
    """PLE, KV sharing (3 of 6 layers), double-wide MLP in the shared layers, 1 KV head."""
    return Gemma4TextConfig(
        **_gemma4_text(
            num_key_value_heads=1,
            hidden_size_per_layer_input=8,
            num_kv_shared_layers=3,
            use_double_wide_mlp=True,
        )
    )


def e4b_like() -> Gemma4TextConfig:
    """PLE and KV sharing without the double-wide MLP; untied head."""
    return Gemma4TextConfig(
        **_gemma4_text(
            hidden_size_per_layer_input=8,
            num_kv_shared_layers=3,
            tie_word_embeddings=False,
        )
    )


def unified_12b_like() -> Gemma4UnifiedConfig:
    """The 12B: model_type gemma4_unified, k_eq_v full layers with one KV head, multimodal wrapper."""
    text = Gemma4UnifiedTextConfig(
        **{
            k: v
            for k, v in _gemma4_text(
                num_key_value_heads=4, attention_k_eq_v=True, num_global_key_value_heads=1
            ).items()
            if k not in ("hidden_size_per_layer_input", "vocab_size_per_layer_input")
        }
    )
    return Gemma4UnifiedConfig(text_config=text.to_dict())


def moe_26b_like() -> Gemma4TextConfig:
    """MoE block beside the dense MLP in every layer; k_eq_v full layers."""
    return Gemma4TextConfig(
        **_gemma4_text(
            enable_moe_block=True,
            num_experts=16,
            top_k_experts=8,
            moe_intermediate_size=24,
            attention_k_eq_v=True,
            num_global_key_value_heads=1,
        )
    )


def dense_31b_like() -> Gemma4Config:
    """Dense, k_eq_v with 2 global KV heads, saved as a multimodal (model.language_model.) checkpoint."""
    text = Gemma4TextConfig(
        **_gemma4_text(attention_k_eq_v=True, num_global_key_value_heads=2, num_key_value_heads=4)
    )
    return Gemma4Config(text_config=text.to_dict(), vision_config=None, audio_config=None)


def gemma3_like() -> Gemma3TextConfig:
    """Gemma 3 text: (1 + w) norms, query_pre_attn_scalar != head_dim, linear RoPE on full layers."""
    return Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=WINDOW,
        layer_types=[S, S, F, S, S, F],
        max_position_embeddings=1024,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        initializer_range=0.08,
        pad_token_id=0,
    )


VARIANTS = {
    "e2b": e2b_like,
    "e4b": e4b_like,
    "12b": unified_12b_like,
    "26b-a4b": moe_26b_like,
    "31b": dense_31b_like,
    "gemma3": gemma3_like,
}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move parameters that start at a neutral value (norm weights, scalars) off it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1 or "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(1.0 + 0.3 * torch.rand(b.shape, generator=g))


def save_reference(config, directory: Path, seed: int = 0) -> torch.nn.Module:
    """Random float32 torch model for `config`, saved to `directory` (safetensors); returned in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    _perturb(model, seed)
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


@torch.no_grad()
def reference_logits(model: torch.nn.Module, tokens: list[int]):
    out = model(input_ids=torch.tensor([tokens]), use_cache=False)
    return out.logits[0].float().numpy()
