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

The 12B's encoder-free towers (`gemma4uv`/`gemma4ua`) are not supported yet.
"""

from __future__ import annotations

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
        self.vision = self._has_encoder("vision", VISION_PROJECTOR)
        self.audio = self._has_encoder("audio", AUDIO_PROJECTOR)
        if not (self.vision or self.audio):
            raise ConfigError(f"{self.path}: holds neither a vision nor an audio encoder")

    def field(self, key: str, default: Any = ...) -> Any:
        return field(self.reader, self.path, key, default)

    def _has_encoder(self, kind: str, projector: str) -> bool:
        if not self.field(f"clip.has_{kind}_encoder", False):
            return False
        found = self.field(f"clip.{kind}.projector_type", None) or self.field(
            "clip.projector_type", None
        )
        if found != projector:
            raise ConfigError(
                f"{self.path}: {kind} projector type {found!r} is not Gemma 4's ({projector!r}): "
                "this mmproj belongs to another model"
            )
        return True

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
        config: dict[str, Any] = {
            "model_type": "gemma4",
            "architectures": ["Gemma4ForConditionalGeneration"],
            "text_config": text,
            "tie_word_embeddings": text["tie_word_embeddings"],
        }
        wanted = {}
        if self.vision:
            config["vision_config"] = self.vision_config()
            wanted |= VISION_TOKENS
        if self.audio:
            config["audio_config"] = self.audio_config()
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
        table = get_tensor_name_map(MODEL_ARCH.MMPROJ, MAX_TOWER_BLOCKS)
        by_gguf = {}
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
