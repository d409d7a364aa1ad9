"""Load a model directory (Hugging Face format, or converted by gemma_mlx.convert) into MLX.

Weights are memory-mapped and materialized one tensor at a time after their final cast, so loading
never holds two copies of the model. On the CPU backend the model computes in float32 and, when it
fits, quantized matrices are expanded to dense float32 (MLX's CPU quantized kernels are several times
slower than a dense float32 product through OpenBLAS, see NOTES.md); elsewhere it keeps the
checkpoint's half precision and its quantization. A Gemma 4 checkpoint's vision and audio towers
are loaded with it when it has them (`media`, see `build_and_check`).
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from gemma_mlx import machine_memory
from gemma_mlx.errors import (
    ConfigError,
    GemmaMLXError,
    MediaError,
    ModelTooLargeError,
    OptionError,
    WeightsError,
)
from gemma_mlx.fingerprint import fingerprint, tensor_sample
from gemma_mlx.models import get_model_classes, q6k
from gemma_mlx.models.gemma4_multimodal import OWN_PREFIXES, has_towers, holds_towers

# On the CPU backend, expand quantized weights to float32 only while the result stays this small.
DEQUANTIZE_FRACTION = 0.5
# Config sizes a model is built from, and their least valid value (0: "feature off"). Checked
# before the model is built, so that a damaged config.json is named instead of failing in math.
CONFIG_SIZES = dict.fromkeys(
    ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
     "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads",
     "vocab_size", "sliding_window", "sliding_window_pattern", "max_position_embeddings",
     "num_experts", "top_k_experts", "moe_intermediate_size", "backbone_hidden_size",
     "num_centroids", "centroid_intermediate_top_k",
     # the vision and audio towers' (vision_config, audio_config)
     "patch_size", "pooling_kernel_size", "position_embedding_size", "output_proj_dims",
     "conv_kernel_size", "attention_chunk_size", "audio_embed_dim", "mm_embed_dim",
     "mm_posemb_size"),
    1,
) | dict.fromkeys(
    ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "num_kv_shared_layers"), 0
)  # fmt: skip
CONFIG_SIZE_LIMIT = 2**31  # MLX indexes with 32-bit integers
# Config numbers that must be finite and positive when present.
CONFIG_POSITIVE_NUMBERS = (
    "rms_norm_eps", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar",
    "final_logit_softcapping",
)  # fmt: skip
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def read_json_object(path: Path, error: type[GemmaMLXError]) -> dict[str, Any]:
    """The JSON object in `path`; anything else (bad JSON or UTF-8, a list) raises `error`."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json in the model directory")
    config = read_json_object(path, ConfigError)
    check_config_values(config, path)
    return config


def check_config_values(config: dict[str, Any], path: Path) -> None:
    """Sizes are integers in range and the listed numbers positive, at the top level and in
    `text_config`, `vision_config` and `audio_config` (model classes check types and presence,
    not ranges)."""
    parts = [config.get(key) for key in ("text_config", "vision_config", "audio_config")]
    for part in (config, *(p for p in parts if isinstance(p, dict))):
        for key, least in CONFIG_SIZES.items():
            value = part.get(key)
            if isinstance(value, int) and not least <= value < CONFIG_SIZE_LIMIT:
                raise ConfigError(
                    f"{path}: '{key}' = {value} must be in {least}..{CONFIG_SIZE_LIMIT - 1}"
                )
        for key in CONFIG_POSITIVE_NUMBERS:
            value = part.get(key)
            if isinstance(value, (int, float)) and not 0 < value < float("inf"):
                raise ConfigError(f"{path}: '{key}' = {value} must be a positive number")
        for key in ("torch_dtype", "dtype", "embed_scale_dtype"):
            value = part.get(key)
            if isinstance(value, str) and value not in FLOAT_DTYPES:
                raise ConfigError(
                    f"{path}: '{key}' = {value!r} is not one of {', '.join(FLOAT_DTYPES)}"
                )


@contextlib.contextmanager
def reported_as(error: type[GemmaMLXError], where: str) -> Iterator[None]:
    """Turn a failure inside the block that only bad input can cause (a config or weights the
    model code cannot use) into `error` naming `where`; the package's own errors pass through."""
    try:
        yield
    except GemmaMLXError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError) as e:
        raise error(f"{where} ({type(e).__name__}: {e})") from e


@contextlib.contextmanager
def naming(model_dir: Path) -> Iterator[None]:
    """Put the directory in front of errors that name only a file in it ("config.json: ..."), so
    that a user can tell the model from its drafter."""
    try:
        yield
    except (ConfigError, WeightsError) as e:
        if str(model_dir) in str(e):
            raise
        raise type(e)(f"{model_dir}: {e}") from e


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, from its index when it has one."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, WeightsError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(n, str) and n and Path(n).name == n for n in weight_map.values()
        ):
            raise WeightsError(
                f"{index}: no valid 'weight_map' (tensor name -> file name in this directory)"
            )
        names = sorted(set(weight_map.values()))
        files = [model_dir / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightsError(
                f"{index}: lists weight files that are missing: {', '.join(missing)}"
            )
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{model_dir}: no *.safetensors weight files")
    return files


def check_safetensors(path: Path) -> None:
    """Raise if `path` is not a complete safetensors file (MLX reads data lazily, too late to say)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated (no safetensors header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise WeightsError(f"{path}: truncated (header runs past the end of the file)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise WeightsError(f"{path}: corrupt safetensors header entry for tensor '{name}'")
        if offsets[1] > data_size:
            raise WeightsError(f"{path}: truncated inside tensor '{name}'")


def read_weights(files: Iterable[Path]) -> tuple[dict[str, mx.array], dict[str, Path]]:
    """Lazily loaded arrays, and the file each one came from (for error messages)."""
    weights: dict[str, mx.array] = {}
    origin: dict[str, Path] = {}
    for path in files:
        check_safetensors(path)
        try:
            arrays = mx.load(str(path))
        except (RuntimeError, ValueError) as e:
            raise WeightsError(f"{path}: cannot be read as safetensors ({e})") from e
        weights.update(arrays)
        origin.update(dict.fromkeys(arrays, path))
    return weights, origin


def compute_dtype(config: dict[str, Any], requested: mx.Dtype | str | None) -> mx.Dtype:
    """float32 on the CPU backend; the checkpoint's own dtype on GPUs; `requested` wins."""
    if requested is not None:
        dtype = getattr(mx, requested, None) if isinstance(requested, str) else requested
        if dtype not in [getattr(mx, name) for name in FLOAT_DTYPES]:
            raise OptionError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, got {requested!r}")
        return dtype
    if mx.default_device() == mx.cpu:
        return mx.float32
    return getattr(mx, checkpoint_dtype(config))


def checkpoint_dtype(config: dict[str, Any]) -> str:
    text = config.get("text_config") or {}
    for source in (config, text):
        for key in ("torch_dtype", "dtype"):
            if isinstance(source.get(key), str):
                return source[key]
    return "bfloat16"


def apply_quantization(model: nn.Module, config: dict[str, Any], weights: dict[str, mx.array]):
    """Turn the modules a converted checkpoint stores quantized into quantized modules."""
    quantization = config.get("quantization")
    if quantization is None:
        if "quantization_config" in config:
            method = (config["quantization_config"] or {}).get("quant_method", "?")
            raise ConfigError(
                f"config.json: '{method}' quantized checkpoints are loaded through the converter: "
                "run `gemma-mlx-convert SRC -o OUT` first"
            )
        return

    q6k_paths = q6k.use_q6k_layers(model, quantization)  # GGUF Q6_K blocks, kept exactly

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if path in q6k_paths:
            return False
        if path in quantization:
            return quantization[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def check_names_and_shapes(
    model: nn.Module, weights: dict[str, mx.array], origin: dict[str, Path], model_dir: Path
) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise WeightsError(f"{model_dir}: missing tensor(s) {', '.join(missing[:3])}{more}")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        name = unexpected[0]
        raise WeightsError(
            f"{origin.get(name, model_dir)}: tensor '{name}' is not part of this "
            f"{model.model_type} model (config.json and the weights disagree)"
        )
    for name, value in weights.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise WeightsError(
                f"{origin.get(name, model_dir)}: tensor '{name}' has shape {tuple(value.shape)}, "
                f"config.json implies {tuple(expected[name].shape)}"
            )


def physical_memory() -> int:
    if mx.metal.is_available():
        return int(mx.metal.device_info()["memory_size"])
    return machine_memory.physical_memory()


def _final_nbytes(value: mx.array, dtype: mx.Dtype) -> int:
    if mx.issubdtype(value.dtype, mx.floating):
        return value.size * dtype.size
    return value.nbytes


def dequantize_modules(model: nn.Module, dtype: mx.Dtype) -> None:
    """Replace quantized linears and embeddings by dense ones (exact: the grid values themselves).

    Per-layer-embedding tables stay quantized: they are only looked up, one row per token.
    """

    def dense(module: nn.Module) -> mx.array:
        return mx.dequantize(
            module.weight,
            module.scales.astype(mx.float32),
            None if module.biases is None else module.biases.astype(mx.float32),
            group_size=module.group_size,
            bits=module.bits,
            mode=module.mode,
        ).astype(dtype)

    replacements = []
    for path, module in model.named_modules():
        if path.endswith("embed_tokens_per_layer"):
            continue
        if isinstance(module, q6k.Q6K_LAYERS):
            replacements.append((path, module.dense(dtype)))
            continue
        if isinstance(module, nn.QuantizedLinear):
            out_dims, in_dims = module.weight.shape[0], module.scales.shape[1] * module.group_size
            layer = nn.Linear(in_dims, out_dims, bias="bias" in module)
        elif isinstance(module, nn.QuantizedEmbedding):
            layer = nn.Embedding(module.num_embeddings, module.dims)
        else:
            continue
        layer.weight = dense(module)
        if "bias" in module:
            layer.bias = module.bias.astype(dtype)
        replacements.append((path, layer))
    model.update_modules(tree_unflatten(replacements))


def _quantized_dense_bytes(model: nn.Module, dtype: mx.Dtype) -> int:
    total = 0
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and not path.endswith(
            "embed_tokens_per_layer"
        ):
            rows, packed = module.weight.shape
            total += rows * packed * (32 // module.bits) * dtype.size
        elif not path.endswith("embed_tokens_per_layer"):
            total += q6k.dense_nbytes(module, dtype)
    return total


def build_and_check(
    model_dir: Path, media: bool | None = None
) -> tuple[nn.Module, dict[str, Any], dict[str, mx.array]]:
    """The model of `model_dir` (parameters not yet loaded) and its memory-mapped weights, after
    checking that every tensor is present with the shape config.json implies. Reads no weight data,
    so the converter uses it to verify an output directory before moving it into place.

    `media`: a Gemma 4 checkpoint's vision and audio towers are built too: None (auto) when
    config.json describes them and the weights hold them, True always (an error for a checkpoint
    without them), False never (a text model: the tower weights are skipped).
    """
    if not model_dir.is_dir():
        raise WeightsError(f"{model_dir}: model directory not found")
    config_file = model_dir / "config.json"
    with naming(model_dir):
        config = read_config(model_dir)
        weights = None
        towers = media is not False and has_towers(config)
        if media and not towers:
            raise MediaError(
                f"{model_dir}: this checkpoint has no vision or audio tower (its config.json has "
                "no vision_config or audio_config): it cannot take images or audio"
            )
        if towers:
            weights, origin = read_weights(weight_files(model_dir))
            towers = holds_towers(weights)
            if media and not towers:
                raise MediaError(
                    f"{model_dir}: config.json describes vision/audio towers but the weights "
                    "hold none (a text-only export?): it cannot take images or audio"
                )
        with reported_as(ConfigError, f"{config_file}: does not describe a model"):
            model_class, args_class = get_model_classes(config, media=towers)
            args = args_class.from_dict(config)
            if args.embed_scale_dtype is None:
                args.embed_scale_dtype = checkpoint_dtype(config)
            model = model_class(args)

        if weights is None:
            weights, origin = read_weights(weight_files(model_dir))
        with reported_as(WeightsError, f"{model_dir}: the weights do not fit the model"):
            weights = model.sanitize(weights)
        with reported_as(ConfigError, f"{config_file}: bad 'quantization'"):
            apply_quantization(model, config, weights)
        check_names_and_shapes(model, weights, origin, model_dir)
    return model, config, weights


def load_model(
    path: str | Path,
    dtype: mx.Dtype | str | None = None,
    dequantize: bool | None = None,
    media: bool | None = None,
) -> nn.Module:
    """Build the model of `path` (a directory with config.json and safetensors) with its weights.

    `dtype`: compute dtype (default: float32 on CPU, the checkpoint's elsewhere).
    `dequantize`: expand quantized matrices to dense `dtype` (default: on the CPU backend, when the
    dense model takes under half of the memory).
    `media`: load a Gemma 4 checkpoint's vision and audio towers (default: when it has them;
    False saves their memory; True requires them), see `build_and_check`.
    """
    model_dir = Path(path)
    model, config, weights = build_and_check(model_dir, media)
    dtype = compute_dtype(config, dtype)
    q6k.set_compute_dtype(model, dtype)
    final = {
        name: value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value
        for name, value in weights.items()
    }
    needed = sum(_final_nbytes(v, dtype) for v in weights.values())
    available = machine_memory.available_memory()
    if needed > available:
        raise ModelTooLargeError(
            f"{model_dir}: the weights need {needed / 1e9:.2f} GB as {dtype}, this machine can "
            f"give {available / 1e9:.2f} GB (pass a quantized checkpoint, a smaller dtype or a "
            "smaller model)"
        )
    machine_memory.raise_wired_limit()
    model.load_weights(list(final.items()), strict=False)
    samples = {name: tensor_sample(value) for name, value in weights.items()}
    described = {name: (value.shape, value.dtype) for name, value in weights.items()}
    del weights, final
    for name, value in tree_flatten(model.parameters()):
        # One tensor at a time, with its fingerprint sample: the source is read once and dropped.
        mx.eval(value, samples[name])
    # The text model's weights identify a model (saved sessions): loaded with or without its
    # towers, a checkpoint is the same model.
    text = {name: d for name, d in described.items() if not name.startswith(OWN_PREFIXES)}
    model.weights_fingerprint = fingerprint(text, samples)

    if dequantize is None:
        extra = _quantized_dense_bytes(model, dtype)
        dequantize = (
            mx.default_device() == mx.cpu
            and needed + extra < DEQUANTIZE_FRACTION * physical_memory()
        )
    if dequantize:
        dequantize_modules(model, dtype)
        for _, value in tree_flatten(model.parameters()):
            mx.eval(value)
    model.eval()
    return model


def load(
    path: str | Path,
    dtype: mx.Dtype | str | None = None,
    dequantize: bool | None = None,
    media: bool | None = None,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a model directory; see `load_model` for the options."""
    from gemma_mlx.tokenizer import load_tokenizer

    model = load_model(path, dtype, dequantize, media)
    return model, load_tokenizer(Path(path))
