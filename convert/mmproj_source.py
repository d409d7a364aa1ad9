"""llama.cpp's `mmproj` GGUF (the Gemma 4 vision and audio towers) onto our tower modules.

llama.cpp's converter (`Gemma4VisionAudioModel` in its conversion scripts) renames transformers'
tower tensors through gguf-py's table (`MODEL_ARCH.MMPROJ`) after a few renames of its own
(`model.audio_tower.` -> `conformer.`, `model.vision_tower.encoder.` -> `vision_model.model.`, the
clippable linears' `.linear` dropped) and changes four layouts: scalar clip bounds become `[1]`,
the patch embedder's `[n, p*p*3]` becomes `[n, 3, p, p]`, the depthwise convolution's `[C, 1, K]`
becomes `[C, K]`, and the audio attention's `per_dim_scale` is stored through softplus. We derive
the name table the same way from our own parameter names and undo the layouts. The tower configs
come from the `clip.*` metadata, the tensor shapes, and the values llama.cpp hard-codes (those of
transformers' `Gemma4VisionConfig` / `Gemma4AudioConfig`, which the released models use).

The 12B's encoder-free embedders (projector types `gemma4uv` / `gemma4ua`, llama.cpp's
`Gemma4UnifiedVisionAudioModel`) have names gguf-py's table does not hold, so `UNIFIED_NAMES`
lists them as llama.cpp's `clip-impl.h` spells them; the converter reorders the patch
projection's columns and the first patch LayerNorm from pixel-major (HWC) to channel-major (CHW)
order, stores the position table as [2, positions, dim] and the final LayerNorm as
`v.patch_norm.3`. The patch merge factor is not in the metadata (llama.cpp hard-codes 3); it
follows from the patch projection's width and `clip.vision.patch_size`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from gemma_mlx.convert.blocks import EXACT_LAYOUTS, FLOAT_TYPES
from gemma_mlx.convert.tensors import (
    Converted,
    ErrorMeter,
    TensorRecord,
    gguf_tensor,
    make_record,
)
from gguf import MODEL_ARCH, GGUFReader, ReaderTensor, get_tensor_name_map

from gemma_mlx.errors import ConfigError, GemmaMLXError, WeightsError

VISION_PROJECTOR, AUDIO_PROJECTOR = "gemma4v", "gemma4a"
UNIFIED_VISION_PROJECTOR, UNIFIED_AUDIO_PROJECTOR = "gemma4uv", "gemma4ua"  # the 12B
UNIFIED_MODEL_TYPE = "gemma4_unified"
# llama.cpp's name -> ours for the 12B's embedders (our `UnifiedVisionEmbedder` sits at
# `embed_vision`; llama.cpp writes transformers' `pos_norm` as the third patch norm).
UNIFIED_NAMES = {
    "v.patch_norm.1.weight": "embed_vision.patch_ln1.weight",
    "v.patch_norm.1.bias": "embed_vision.patch_ln1.bias",
    "v.patch_embd.weight": "embed_vision.patch_dense.weight",
    "v.patch_embd.bias": "embed_vision.patch_dense.bias",
    "v.patch_norm.2.weight": "embed_vision.patch_ln2.weight",
    "v.patch_norm.2.bias": "embed_vision.patch_ln2.bias",
    "v.position_embd.weight": "embed_vision.pos_embedding",
    "v.patch_norm.3.weight": "embed_vision.pos_norm.weight",
    "v.patch_norm.3.bias": "embed_vision.pos_norm.bias",
    "mm.input_projection.weight": "embed_vision.multimodal_embedder.embedding_projection.weight",
    "mm.a.input_projection.weight": "embed_audio.embedding_projection.weight",
}
# The 12B's tensors llama.cpp stores with the patch axis in CHW order.
UNIFIED_CHANNEL_MAJOR = (
    "embed_vision.patch_dense.weight",
    "embed_vision.patch_ln1.weight",
    "embed_vision.patch_ln1.bias",
)
CLIP_SUFFIXES = (".weight", ".bias", ".input_max", ".input_min", ".output_max", ".output_min")
# Not in the metadata: llama.cpp hard-codes them (transformers' defaults, the released values).
VISION_FIXED = {
    "model_type": "gemma4_vision",
    "hidden_activation": "gelu_pytorch_tanh",
    "rope_parameters": {"rope_type": "axial", "rope_theta": 100.0},
    "pooling_kernel_size": 3,
}
AUDIO_FIXED = {
    "model_type": "gemma4_audio",
    "hidden_act": "silu",
    "residual_weight": 0.5,
    "attention_chunk_size": 12,
    "attention_context_left": 13,
    "attention_context_right": 0,
    "attention_logit_cap": 50.0,
    "attention_invalid_logits_value": -1e9,
    "gradient_clipping": 1e10,
}
# The processor's placeholder and marker tokens, by config key (Gemma 4's tokenizer spelling).
VISION_TOKENS = {
    "image_token_id": "<|image|>",
    "video_token_id": "<|video|>",
    "boi_token_id": "<|image>",
    "eoi_token_id": "<image|>",
}
AUDIO_TOKENS = {
    "audio_token_id": "<|audio|>",
    "boa_token_id": "<|audio>",
    "eoa_token_id": "<audio|>",
}
MAX_TOWER_BLOCKS = 128  # llama.cpp's table size for files with two encoders


def field(reader: GGUFReader, path: Path, key: str, default: Any = ...) -> Any:
    """A metadata value as plain Python; a missing key without `default` is a ConfigError."""
    found = reader.get_field(key)
    if found is None:
        if default is ...:
            raise ConfigError(f"{path}: metadata key '{key}' is missing")
        return default
    value = found.contents()
    return value.tolist() if isinstance(value, np.ndarray) else value


def torch_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """A GGUF tensor's shape in transformers' (row-major) order."""
    return tuple(int(n) for n in reversed(tensor.shape))


class MmprojSource:
    """One mmproj file: which towers it holds, their configs, and its tensors by our names."""

    def __init__(self, path: Path, reader: GGUFReader):
        self.path = Path(path)
        self.reader = reader
        arch = self.field("general.architecture")
        if arch != "clip":
            raise ConfigError(
                f"{self.path}: general.architecture = {arch!r}: not an mmproj file (llama.cpp "
                "writes the towers as 'clip'); pass the model GGUF as SRC and this as --mmproj"
            )
        self.by_name = {t.name: t for t in reader.tensors}
        vision = self._projector("vision", VISION_PROJECTOR, UNIFIED_VISION_PROJECTOR)
        audio = self._projector("audio", AUDIO_PROJECTOR, UNIFIED_AUDIO_PROJECTOR)
        self.vision, self.audio = vision is not None, audio is not None
        if not (self.vision or self.audio):
            raise ConfigError(f"{self.path}: holds neither a vision nor an audio encoder")
        kinds = {
            p in (UNIFIED_VISION_PROJECTOR, UNIFIED_AUDIO_PROJECTOR)
            for p in (vision, audio)
            if p is not None
        }
        if len(kinds) > 1:
            raise ConfigError(
                f"{self.path}: vision projector {vision!r} and audio projector {audio!r} are of "
                "two different models (the 12B's are 'gemma4uv' and 'gemma4ua')"
            )
        self.unified = kinds == {True}

    def field(self, key: str, default: Any = ...) -> Any:
        return field(self.reader, self.path, key, default)

    def _projector(self, kind: str, projector: str, unified: str) -> str | None:
        """The `kind` encoder's projector type (Gemma 4's or the 12B's), None if absent."""
        if not self.field(f"clip.has_{kind}_encoder", False):
            return None
        found = self.field(f"clip.{kind}.projector_type", None) or self.field(
            "clip.projector_type", None
        )
        if found not in (projector, unified):
            raise ConfigError(
                f"{self.path}: {kind} projector type {found!r} is not Gemma 4's ({projector!r}, "
                f"or {unified!r} for the 12B): this mmproj belongs to another model"
            )
        return found

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.by_name:
            raise WeightsError(f"{self.path}: tensor '{name}' is missing")
        return torch_shape(self.by_name[name])

    # configs ---------------------------------------------------------------------------------

    def vision_config(self) -> dict[str, Any]:
        head_dim = self.shape("v.blk.0.attn_q_norm.weight")[0]
        return VISION_FIXED | {
            "hidden_size": int(self.field("clip.vision.embedding_length")),
            "intermediate_size": int(self.field("clip.vision.feed_forward_length")),
            "num_hidden_layers": int(self.field("clip.vision.block_count")),
            "num_attention_heads": int(self.field("clip.vision.attention.head_count")),
            "num_key_value_heads": self.shape("v.blk.0.attn_k.weight")[0] // head_dim,
            "head_dim": head_dim,
            "rms_norm_eps": float(self.field("clip.vision.attention.layer_norm_epsilon")),
            "patch_size": int(self.field("clip.vision.patch_size")),
            "position_embedding_size": self.shape("v.position_embd.weight")[1],
            "use_clipped_linears": "v.blk.0.attn_q.input_min" in self.by_name,
            "standardize": "v.std_bias" in self.by_name,
        }

    def unified_vision_config(self) -> dict[str, Any]:
        """The 12B's `gemma4_unified_vision` config; the merge factor from the patch width."""
        patch_size = int(self.field("clip.vision.patch_size"))
        width = self.shape("v.patch_embd.weight")[1]
        merged = math.isqrt(width // 3)
        if 3 * merged**2 != width or patch_size <= 0 or merged % patch_size:
            raise WeightsError(
                f"{self.path}: 'v.patch_embd.weight' takes {width} values per patch, not 3 x "
                f"(k x clip.vision.patch_size {patch_size})^2 for a whole k"
            )
        return {
            "model_type": "gemma4_unified_vision",
            "patch_size": patch_size,
            "pooling_kernel_size": merged // patch_size,
            "mm_embed_dim": int(self.field("clip.vision.embedding_length")),
            "mm_posemb_size": self.shape("v.position_embd.weight")[1],
            "rms_norm_eps": float(self.field("clip.vision.attention.layer_norm_epsilon")),
            "output_proj_dims": self.shape("mm.input_projection.weight")[1],
        }

    def unified_audio_config(self) -> dict[str, Any]:
        """The 12B's `gemma4_unified_audio` config: raw frames of `audio_embed_dim` samples."""
        return {
            "model_type": "gemma4_unified_audio",
            "audio_embed_dim": int(self.field("clip.audio.embedding_length")),
            "rms_norm_eps": float(self.field("clip.audio.attention.layer_norm_epsilon")),
        }

    def audio_config(self) -> dict[str, Any]:
        return AUDIO_FIXED | {
            "hidden_size": int(self.field("clip.audio.embedding_length")),
            "num_hidden_layers": int(self.field("clip.audio.block_count")),
            "num_attention_heads": int(self.field("clip.audio.attention.head_count")),
            "rms_norm_eps": float(self.field("clip.audio.attention.layer_norm_epsilon")),
            "subsampling_conv_channels": [
                self.shape("a.conv1d.0.weight")[0],
                self.shape("a.conv1d.1.weight")[0],
            ],
            "conv_kernel_size": self.shape("a.blk.0.conv_dw.weight")[-1],
            "output_proj_dims": self.shape("a.pre_encode.out.weight")[0],
            "use_clipped_linears": "a.blk.0.attn_q.input_min" in self.by_name,
        }

    def multimodal_config(
        self, text: dict[str, Any], vocabulary: dict[str, int], model_path: Path
    ) -> dict[str, Any]:
        """The config.json of the model GGUF's text config (`text`) with these towers."""
        projection = "mm.input_projection.weight" if self.vision else "mm.a.input_projection.weight"
        projected = self.shape(projection)[0]
        if projected != text["hidden_size"]:
            raise ConfigError(
                f"{self.path}: projects into {projected} dimensions but {model_path} has hidden "
                f"size {text['hidden_size']}: this mmproj belongs to another model"
            )
        model_type = UNIFIED_MODEL_TYPE if self.unified else "gemma4"
        config: dict[str, Any] = {
            "model_type": model_type,
            "architectures": [
                "Gemma4UnifiedForConditionalGeneration"
                if self.unified
                else "Gemma4ForConditionalGeneration"
            ],
            "text_config": text,
            "tie_word_embeddings": text["tie_word_embeddings"],
        }
        wanted = {}
        if self.vision:
            vision = self.unified_vision_config() if self.unified else self.vision_config()
            config["vision_config"] = vision
            wanted |= VISION_TOKENS
        if self.audio:
            audio = self.unified_audio_config() if self.unified else self.audio_config()
            config["audio_config"] = audio
            wanted |= AUDIO_TOKENS
        for key, spelling in wanted.items():
            if spelling not in vocabulary:
                raise ConfigError(
                    f"{model_path}: its vocabulary has no {spelling} token, which the towers of "
                    f"{self.path} need: this mmproj belongs to another model"
                )
            config[key] = vocabulary[spelling]
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype"):
            if key in text:
                config[key] = text[key]
        return config

    # tensors ---------------------------------------------------------------------------------

    def tensors(self, our_names: Iterable[str]) -> list[tuple[str, ReaderTensor]]:
        """(our name, GGUF tensor) of every tower tensor; `our_names`: the tower parameters of the
        model the config describes. A tensor of the file that is none of them is an error."""
        by_gguf = {}
        if self.unified:
            wanted = set(our_names)
            by_gguf = {name: ours for name, ours in UNIFIED_NAMES.items() if ours in wanted}
        else:
            table = get_tensor_name_map(MODEL_ARCH.MMPROJ, MAX_TOWER_BLOCKS)
            for ours in our_names:
                name = table.get_name(llama_cpp_name(ours), try_suffixes=CLIP_SUFFIXES)
                if name is not None:
                    by_gguf[name] = ours
        unknown = sorted(set(self.by_name) - set(by_gguf))
        if unknown:
            raise WeightsError(
                f"{self.path}: tensor '{unknown[0]}' is not part of the Gemma 4 towers its "
                "metadata describes"
            )
        return [(by_gguf[name], tensor) for name, tensor in self.by_name.items()]


def llama_cpp_name(ours: str) -> str:
    """The name llama.cpp's converter looks up in gguf-py's table for our tower parameter."""
    name = "model." + ours
    if ours.startswith(("audio_tower.", "embed_audio.")):
        name = name.replace("model.audio_tower.", "conformer.").replace(".linear.", ".")
        return name + ".weight" if name.endswith("per_dim_scale") else name
    name = name.replace("model.vision_tower.encoder.", "vision_model.model.")
    name = name.replace(".linear.weight", ".weight")
    return name + ".weight" if name.endswith(("layer_scalar", "position_embedding_table")) else name


def _patch_embedding(value: np.ndarray) -> np.ndarray:
    """[n, 3, p, p] (llama.cpp) -> [n, p * p * 3] (transformers: patch pixels row-major, RGB)."""
    return value.transpose(0, 2, 3, 1).reshape(value.shape[0], -1)


def _channel_major_to_pixel_major(value: np.ndarray) -> np.ndarray:
    """The 12B's patch axis (last) from llama.cpp's CHW order (what its im2col gives) back to
    transformers' HWC order: [..., 3 * p * p] -> [..., p * p * 3]."""
    rows = value.reshape(-1, value.shape[-1])
    side = math.isqrt(rows.shape[1] // 3)
    return _patch_embedding(rows.reshape(rows.shape[0], 3, side, side)).reshape(value.shape)


def _inverse_softplus(value: np.ndarray) -> np.ndarray:
    """llama.cpp stores softplus(per_dim_scale); the model applies softplus itself."""
    y = value.astype(np.float64)
    return (y + np.log(-np.expm1(-y))).astype(np.float32)


def layout_change(ours: str, shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray] | None:
    """The function from llama.cpp's layout to ours (shape: our parameter's), None if the same."""
    if shape == ():
        return lambda v: v.reshape(())
    if ours.endswith("patch_embedder.input_proj.weight"):
        return _patch_embedding
    if ours in UNIFIED_CHANNEL_MAJOR:
        return _channel_major_to_pixel_major
    if ours == "embed_vision.pos_embedding":  # [2, positions, dim] -> [positions, 2, dim]
        return lambda v: v.transpose(1, 0, 2)
    if ours.endswith("conv.weight") and len(shape) == 4:  # [out, in, kh, kw] -> [out, kh, kw, in]
        return lambda v: v.transpose(0, 2, 3, 1)
    if ours.endswith("depthwise_conv1d.weight"):  # [C, K] -> [C, K, 1]
        return lambda v: v[..., None]
    if ours.endswith("per_dim_scale"):
        return _inverse_softplus
    return None


def tower_tensor(
    source: MmprojSource, ours: str, tensor: ReaderTensor, shape: tuple[int, ...]
) -> tuple[Converted, TensorRecord]:
    """One tower tensor in our layout: float types as stored, MLX-exact block types kept as their
    grid, anything else (and anything whose layout changes) dequantized to float32."""
    change = layout_change(ours, shape)
    qtype = tensor.tensor_type
    keep_grid = change is None and qtype in EXACT_LAYOUTS
    try:
        converted, record = gguf_tensor(
            ours,
            qtype,
            tensor.data,
            torch_shape(tensor)[-1],
            dequantize_all=qtype not in FLOAT_TYPES and not keep_grid,
        )
    except GemmaMLXError as e:
        raise WeightsError(f"{source.path}: {e}") from e
    if change is None:
        return converted, record
    value = change(np.asarray(converted.value))
    if value.shape != shape:
        raise WeightsError(
            f"{source.path}: tensor '{tensor.name}' has shape {torch_shape(tensor)}, which does "
            f"not give '{ours}' its shape {shape}"
        )
    meter = ErrorMeter()
    target = record.target
    if ours.endswith("per_dim_scale"):  # what the model computes back, against what was stored
        meter.add(np.logaddexp(0.0, value), np.asarray(converted.value))
        target = "float32 (softplus inverted)"
    value = value.copy(order="C")  # (np.ascontiguousarray would turn a scalar into [1])
    return Converted(value), make_record(ours, record.source, target, shape, value.nbytes, meter)
