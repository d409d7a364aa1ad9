"""llama.cpp `mmproj` GGUF files of the tiny Gemma 4 towers, written the way llama.cpp's converter
writes them (its `MmprojModel` metadata and `Gemma4VisionAudioModel.modify_tensors`): names through
gguf-py's `MODEL_ARCH.MMPROJ` table after llama.cpp's own renames, scalars as [1], the patch
embedder as [n, 3, p, p], the depthwise convolution as [C, K], softplus(per_dim_scale), and 2-D
weights in float16 except those llama.cpp forces to float32 (position table, audio convolutions).

`write_unified_mmproj` writes the 12B's as llama.cpp's `Gemma4UnifiedVisionAudioModel` does:
projector types `gemma4uv`/`gemma4ua`, zero blocks/heads/feed-forward, the patch projection's
columns and the first patch norm permuted from HWC to CHW order, the position table permuted
(1, 0, 2), `pos_norm` as the third patch norm, and every tensor of 2+ dimensions in float16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFType, GGUFWriter, get_tensor_name_map
from gguf_reference import finish

SUFFIXES = (".weight", ".bias", ".input_max", ".input_min", ".output_max", ".output_min")
TOWERS = ("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.")


def _is_audio(name: str) -> bool:
    return "audio_tower" in name or "embed_audio" in name


def llama_cpp_tensor(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """llama.cpp's rename and layout change of one transformers tower tensor (before the table)."""
    if value.ndim == 0:
        value = value[None]
    if _is_audio(name):
        name = name.replace("model.audio_tower.", "conformer.").replace(".linear.", ".")
        if name.endswith("per_dim_scale"):
            name += ".weight"
            value = np.logaddexp(0.0, value).astype(value.dtype)  # softplus
        if "lconv1d.depthwise_conv1d" in name and name.endswith(".weight"):
            value = value.reshape(value.shape[0], value.shape[2])
        return name, value
    name = name.replace("model.vision_tower.encoder.", "vision_model.model.")
    name = name.replace(".linear.weight", ".weight")
    if name.endswith(("layer_scalar", "position_embedding_table")):
        name += ".weight"
    if name.endswith("patch_embedder.input_proj.weight"):
        n, width = value.shape
        p = int((width // 3) ** 0.5)
        value = value.reshape(n, p, p, 3).transpose(0, 3, 1, 2)
    return name, np.ascontiguousarray(value)


def _stored_type(hf_name: str, value: np.ndarray, half: bool) -> GGMLQuantizationType:
    audio_conv = ".conv" in hf_name or ("_conv" in hf_name and ".weight" in hf_name)
    forced = "position_embedding_table" in hf_name or (_is_audio(hf_name) and audio_conv)
    if half and value.ndim == 2 and not forced:
        return GGMLQuantizationType.F16
    return GGMLQuantizationType.F32


def write_mmproj(model: torch.nn.Module, path: Path, half: bool = True) -> dict[str, np.ndarray]:
    """Write the towers of the transformers `model` as llama.cpp's mmproj; returns the values
    the file holds in transformers' layout, by transformers name (float16-rounded where stored
    so), for loading back into `model` as the reference."""
    config = model.config
    vision, audio = config.vision_config, config.audio_config
    writer = GGUFWriter(path, "clip")
    writer.add_type(GGUFType.MMPROJ)
    text_hidden = config.get_text_config().hidden_size
    if vision is not None:
        writer.add_clip_has_vision_encoder(True)
        writer.add_clip_vision_projector_type("gemma4v")
        writer.add_vision_projection_dim(text_hidden)
        writer.add_vision_image_size(224)
        writer.add_vision_patch_size(vision.patch_size)
        writer.add_vision_embedding_length(vision.hidden_size)
        writer.add_vision_feed_forward_length(vision.intermediate_size)
        writer.add_vision_block_count(vision.num_hidden_layers)
        writer.add_vision_head_count(vision.num_attention_heads)
        writer.add_vision_image_mean([0.0, 0.0, 0.0])
        writer.add_vision_image_std([1.0, 1.0, 1.0])
        writer.add_vision_attention_layernorm_eps(vision.rms_norm_eps)
    if audio is not None:
        writer.add_clip_has_audio_encoder(True)
        writer.add_clip_audio_projector_type("gemma4a")
        writer.add_audio_projection_dim(text_hidden)
        writer.add_audio_embedding_length(audio.hidden_size)
        writer.add_audio_feed_forward_length(audio.hidden_size * 4)
        writer.add_audio_block_count(audio.num_hidden_layers)
        writer.add_audio_head_count(audio.num_attention_heads)
        writer.add_audio_num_mel_bins(128)
        writer.add_audio_attention_layernorm_eps(audio.rms_norm_eps)
    table = get_tensor_name_map(MODEL_ARCH.MMPROJ, 128)
    stored = {}
    for hf_name, tensor in model.state_dict().items():
        if not hf_name.startswith(TOWERS):
            continue
        value = tensor.detach().float().numpy()
        name, data = llama_cpp_tensor(hf_name, value)
        gguf_name = table.get_name(name, try_suffixes=SUFFIXES)
        assert gguf_name is not None, name
        qtype = _stored_type(hf_name, data, half)
        held = _add_tensor(writer, gguf_name, data, qtype)
        stored[hf_name] = held.reshape(value.shape) if qtype == GGMLQuantizationType.F16 else value
    finish(writer)
    return stored


def _add_tensor(
    writer: GGUFWriter, name: str, data: np.ndarray, qtype: GGMLQuantizationType
) -> np.ndarray:
    """Write `data` (llama.cpp's layout) as `qtype`; returns what the file holds, as float32."""
    if qtype == GGMLQuantizationType.F16:
        data = data.astype(np.float16)
    writer.add_tensor(name, data, raw_dtype=qtype)
    return data.astype(np.float32)


# The 12B's tensors, transformers' (in-memory) name -> llama.cpp's (`clip-impl.h`: TN_PATCH_NORM,
# TN_PATCH_EMBD/BIAS, TN_POS_EMBD, TN_MM_INP_PROJ, TN_A_MM_INP_PROJ). gguf-py 0.19's table
# predates them, so they are spelled out here.
UNIFIED_GGUF_NAMES = {
    "model.embed_vision.patch_ln1.": "v.patch_norm.1.",
    "model.embed_vision.patch_dense.": "v.patch_embd.",
    "model.embed_vision.patch_ln2.": "v.patch_norm.2.",
    "model.embed_vision.pos_norm.": "v.patch_norm.3.",
    "model.embed_vision.pos_embedding": "v.position_embd.weight",
    "model.embed_vision.multimodal_embedder.embedding_projection.": "mm.input_projection.",
    "model.embed_audio.embedding_projection.": "mm.a.input_projection.",
}


def _hwc_columns_in_chw_order(p: int) -> np.ndarray:
    """llama.cpp's `perm`: for CHW position i, the HWC column it takes (written its way)."""
    i = np.arange(p * p * 3)
    ch, row, col = i // (p * p), (i % (p * p)) // p, i % p
    return row * p * 3 + col * 3 + ch


def write_unified_mmproj(model: torch.nn.Module, path: Path) -> dict[str, np.ndarray]:
    """Write the 12B's embedders (transformers' `Gemma4UnifiedForConditionalGeneration`) as
    llama.cpp's mmproj; returns the stored values in transformers' layout, by transformers name."""
    config = model.config
    vision, audio = config.vision_config, config.audio_config
    text_hidden = config.get_text_config().hidden_size
    writer = GGUFWriter(path, "clip")
    writer.add_type(GGUFType.MMPROJ)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_vision_projector_type("gemma4uv")
    writer.add_vision_projection_dim(text_hidden)
    writer.add_vision_image_size(224)
    writer.add_vision_patch_size(vision.patch_size)  # the un-merged size (16 in the 12B)
    writer.add_vision_embedding_length(vision.mm_embed_dim)
    writer.add_vision_feed_forward_length(0)
    writer.add_vision_block_count(0)
    writer.add_vision_head_count(0)
    writer.add_vision_image_mean([0.0, 0.0, 0.0])
    writer.add_vision_image_std([1.0, 1.0, 1.0])
    writer.add_vision_attention_layernorm_eps(getattr(vision, "layer_norm_eps", 1e-6))
    writer.add_clip_has_audio_encoder(True)
    writer.add_clip_audio_projector_type("gemma4ua")
    writer.add_audio_projection_dim(text_hidden)
    writer.add_audio_embedding_length(audio.audio_embed_dim)
    writer.add_audio_feed_forward_length(0)
    writer.add_audio_block_count(0)
    writer.add_audio_head_count(0)
    writer.add_audio_num_mel_bins(getattr(audio, "input_feat_size", 128))
    writer.add_audio_attention_layernorm_eps(getattr(audio, "layer_norm_eps", 1e-6))
    perm = _hwc_columns_in_chw_order(vision.patch_size * vision.pooling_kernel_size)
    stored = {}
    for hf_name, tensor in model.state_dict().items():
        prefix = next((p for p in UNIFIED_GGUF_NAMES if hf_name.startswith(p)), None)
        if prefix is None:
            continue
        value = tensor.detach().float().numpy()
        name = UNIFIED_GGUF_NAMES[prefix] + hf_name[len(prefix) :]
        if "patch_ln1" in hf_name:
            data = value[perm]
        elif "patch_dense.weight" in hf_name:
            data = value[:, perm]
        elif hf_name.endswith("pos_embedding"):
            data = value.transpose(1, 0, 2)
        else:
            data = value
        qtype = GGMLQuantizationType.F16 if data.ndim >= 2 else GGMLQuantizationType.F32
        held = _add_tensor(writer, name, np.ascontiguousarray(data), qtype)
        if "patch_ln1" in hf_name:
            held = held[np.argsort(perm)]
        elif "patch_dense.weight" in hf_name:
            held = held[:, np.argsort(perm)]
        elif hf_name.endswith("pos_embedding"):
            held = held.transpose(1, 0, 2)
        stored[hf_name] = held
    finish(writer)
    return stored


def load_back(model: torch.nn.Module, stored: dict[str, np.ndarray]) -> None:
    """Put the values an mmproj holds into the transformers model, in place."""
    state = {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in stored.items()}
    model.load_state_dict(state, strict=False)
