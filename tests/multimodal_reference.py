"""Tiny random Gemma 4 multimodal checkpoints written by transformers (torch), the reference.

The text parts are `hf_reference`'s tiny decoders; the towers are shrunk to a few layers and
16 x 16-pixel images of 4-pixel patches, with every parameter and buffer that starts at a neutral
value (position tables of ones, infinite clip bounds, zero standardization) moved off it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from hf_reference import VOCAB, _gemma4_text, _perturb
from transformers import (
    Gemma4AudioConfig,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
)
from transformers.models.gemma4_unified.configuration_gemma4_unified import (
    Gemma4UnifiedAudioConfig,
    Gemma4UnifiedConfig,
    Gemma4UnifiedTextConfig,
    Gemma4UnifiedVisionConfig,
)
from transformers.models.gemma4_unified.modeling_gemma4_unified import (
    Gemma4UnifiedForConditionalGeneration,
)

# Placeholder and marker ids inside the tiny vocabulary.
TOKENS = dict(
    boi_token_id=VOCAB - 8,
    eoi_token_id=VOCAB - 7,
    image_token_id=VOCAB - 6,
    video_token_id=VOCAB - 5,
    boa_token_id=VOCAB - 4,
    eoa_token_index=VOCAB - 3,
    audio_token_id=VOCAB - 2,
)
PATCH = 4  # pixels per patch side; 3 x 3 patches pool into one soft token
MEL_BINS = 128  # the audio projection's width assumes as many bins as first-conv channels


def vision(**overrides) -> Gemma4VisionConfig:
    base = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        patch_size=PATCH,
        pooling_kernel_size=3,
        position_embedding_size=64,
        initializer_range=0.1,
    )
    base.update(overrides)
    return Gemma4VisionConfig(**base)


def audio(**overrides) -> Gemma4AudioConfig:
    base = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        subsampling_conv_channels=[MEL_BINS, 4],
        output_proj_dims=24,
        initializer_range=0.1,
    )
    base.update(overrides)
    return Gemma4AudioConfig(**base)


def _gemma4(text: dict, vision_config=None, audio_config=None) -> Gemma4Config:
    return Gemma4Config(
        text_config=Gemma4TextConfig(**text).to_dict(),
        vision_config=None if vision_config is None else vision_config.to_dict(),
        audio_config=None if audio_config is None else audio_config.to_dict(),
        # transformers ties the head by the top-level key, not the text config's
        tie_word_embeddings=text["tie_word_embeddings"],
        **TOKENS,
    )


def e2b_like() -> Gemma4Config:
    """PLE, KV sharing, double-wide MLP; clipped tower linears, standardized soft tokens, audio."""
    text = _gemma4_text(
        num_key_value_heads=1,
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=3,
        use_double_wide_mlp=True,
    )
    return _gemma4(text, vision(use_clipped_linears=True, standardize=True), audio())


def e4b_like() -> Gemma4Config:
    """PLE and KV sharing, untied head; plain tower linears; audio without clipping."""
    text = _gemma4_text(
        hidden_size_per_layer_input=8, num_kv_shared_layers=3, tie_word_embeddings=False
    )
    return _gemma4(text, vision(), audio(use_clipped_linears=False))


def moe_26b_like() -> Gemma4Config:
    """MoE, k_eq_v; image tokens bidirectional on sliding layers; no audio."""
    text = _gemma4_text(
        enable_moe_block=True,
        num_experts=16,
        top_k_experts=8,
        moe_intermediate_size=24,
        attention_k_eq_v=True,
        num_global_key_value_heads=1,
        use_bidirectional_attention="vision",
    )
    return _gemma4(text, vision(standardize=True))


def dense_31b_like() -> Gemma4Config:
    """Dense, k_eq_v with 2 global KV heads; image tokens bidirectional; no audio."""
    text = _gemma4_text(
        attention_k_eq_v=True,
        num_global_key_value_heads=2,
        num_key_value_heads=4,
        use_bidirectional_attention="vision",
    )
    return _gemma4(text, vision(num_key_value_heads=4))


def unified_12b_like() -> Gemma4UnifiedConfig:
    """The 12B: encoder-free vision (12-pixel merged patches) and raw-waveform audio."""
    text = {
        k: v
        for k, v in _gemma4_text(
            num_key_value_heads=4, attention_k_eq_v=True, num_global_key_value_heads=1
        ).items()
        if k not in ("hidden_size_per_layer_input", "vocab_size_per_layer_input")
    }
    return Gemma4UnifiedConfig(
        text_config=Gemma4UnifiedTextConfig(**text).to_dict(),
        vision_config=Gemma4UnifiedVisionConfig(
            patch_size=PATCH, pooling_kernel_size=3, mm_embed_dim=40, output_proj_dims=40,
            mm_posemb_size=32, initializer_range=0.1,
        ).to_dict(),
        audio_config=Gemma4UnifiedAudioConfig(audio_embed_dim=20).to_dict(),
        **TOKENS,
    )  # fmt: skip


VARIANTS = {
    "e2b": e2b_like,
    "e4b": e4b_like,
    "12b": unified_12b_like,
    "26b-a4b": moe_26b_like,
    "31b": dense_31b_like,
}


def _randomize_neutral_buffers(model: torch.nn.Module, seed: int) -> None:
    """Position tables start at ones or zeros, clip bounds at +-inf, standardization at 0/1."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("position_embedding_table", "pos_embedding")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            leaf = name.rpartition(".")[2]
            if leaf in ("input_min", "output_min"):
                b.fill_(-1.0 - torch.rand((), generator=g).item())
            elif leaf in ("input_max", "output_max"):
                b.fill_(1.0 + torch.rand((), generator=g).item())
            elif leaf == "std_bias":
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
            elif leaf == "std_scale":
                b.copy_(1.0 + 0.3 * torch.rand(b.shape, generator=g))


def save_reference(config, directory: Path, seed: int = 0) -> torch.nn.Module:
    """Random float32 torch model for `config`, saved to `directory`; returned in eval mode."""
    torch.manual_seed(seed)
    cls = (
        Gemma4UnifiedForConditionalGeneration
        if isinstance(config, Gemma4UnifiedConfig)
        else Gemma4ForConditionalGeneration
    )
    model = cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
    _perturb(model, seed)
    _randomize_neutral_buffers(model, seed)
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def random_image(rng: np.random.Generator, height: int, width: int, channels: int = 3):
    """A PIL image of uniform noise (values 0..255)."""
    from PIL import Image

    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def token_types(tokens: list[int]) -> list[int]:
    """transformers' `mm_token_type_ids`: 1 image, 2 video, 3 audio soft tokens, else 0."""
    kinds = {
        TOKENS["image_token_id"]: 1,
        TOKENS["video_token_id"]: 2,
        TOKENS["audio_token_id"]: 3,
    }
    return [kinds.get(t, 0) for t in tokens]


def load_ours(directory: Path, dtype: str = "float32"):
    """Our multimodal model from a transformers directory, through the loader's checks."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from gemma_mlx.loading import (
        check_names_and_shapes,
        checkpoint_dtype,
        read_config,
        read_weights,
        weight_files,
    )
    from gemma_mlx.models.gemma4_multimodal import Model, MultimodalArgs

    config = read_config(directory)
    args = MultimodalArgs.from_dict(config)
    args.embed_scale_dtype = checkpoint_dtype(config)
    model = Model(args)
    weights, origin = read_weights(weight_files(directory))
    weights = model.sanitize(weights)
    check_names_and_shapes(model, weights, origin, directory)
    cast = getattr(mx, dtype)
    floats = {
        k: v.astype(cast) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()
    }
    model.load_weights(list(floats.items()), strict=True)
    mx.eval([v for _, v in tree_flatten(model.parameters())])
    model.eval()
    return model
