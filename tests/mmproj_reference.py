"""llama.cpp `mmproj` GGUF files of the tiny Gemma 4 towers, written the way llama.cpp's converter
writes them (its `MmprojModel` metadata and `Gemma4VisionAudioModel.modify_tensors`): names through
gguf-py's `MODEL_ARCH.MMPROJ` table after llama.cpp's own renames, scalars as [1], the patch
embedder as [n, 3, p, p], the depthwise convolution as [C, K], softplus(per_dim_scale), and 2-D
weights in float16 except those llama.cpp forces to float32 (position table, audio convolutions)."""

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
        if qtype == GGMLQuantizationType.F16:
            data = data.astype(np.float16)
            value = data.astype(np.float32).reshape(value.shape)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        stored[hf_name] = value
    finish(writer)
    return stored


def load_back(model: torch.nn.Module, stored: dict[str, np.ndarray]) -> None:
    """Put the values an mmproj holds into the transformers model, in place."""
    state = {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in stored.items()}
    model.load_state_dict(state, strict=False)
