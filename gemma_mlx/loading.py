"""Load a model directory (Hugging Face format, or converted by gemma_mlx.convert) into MLX.

Weights are memory-mapped and materialized one tensor at a time after their final cast, so loading
never holds two copies of the model. On the CPU backend the model computes in float32 and, when it
fits, quantized matrices are expanded to dense float32 (MLX's CPU quantized kernels are several times
slower than a dense float32 product through OpenBLAS, see NOTES.md); elsewhere it keeps the
checkpoint's half precision and its quantization.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from gemma_mlx.errors import ConfigError, ModelTooLargeError, WeightsError
from gemma_mlx.models import get_model_classes

# Fraction of physical memory a model may take. The rest is for the KV cache, activations and the OS.
MEMORY_FRACTION = 0.85
# On the CPU backend, expand quantized weights to float32 only while the result stays this small.
DEQUANTIZE_FRACTION = 0.5


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json in the model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, from its index when it has one."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
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
    data_size = size - 8 - header_len
    for name, info in header.items():
        if name != "__metadata__" and info["data_offsets"][1] > data_size:
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
        return getattr(mx, requested) if isinstance(requested, str) else requested
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
            method = config["quantization_config"].get("quant_method", "?")
            raise ConfigError(
                f"config.json: '{method}' quantized checkpoints are loaded through the converter: "
                "run `gemma-mlx-convert SRC -o OUT` first"
            )
        return

    def predicate(path: str, module: nn.Module) -> bool | dict:
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
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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
    return total


def build_and_check(model_dir: Path) -> tuple[nn.Module, dict[str, Any], dict[str, mx.array]]:
    """The model of `model_dir` (parameters not yet loaded) and its memory-mapped weights, after
    checking that every tensor is present with the shape config.json implies. Reads no weight data,
    so the converter uses it to verify an output directory before moving it into place."""
    if not model_dir.is_dir():
        raise WeightsError(f"{model_dir}: model directory not found")
    config = read_config(model_dir)
    model_class, args_class = get_model_classes(config)
    args = args_class.from_dict(config)
    if args.embed_scale_dtype is None:
        args.embed_scale_dtype = checkpoint_dtype(config)
    model = model_class(args)

    weights, origin = read_weights(weight_files(model_dir))
    weights = model.sanitize(weights)
    apply_quantization(model, config, weights)
    check_names_and_shapes(model, weights, origin, model_dir)
    return model, config, weights


def load_model(
    path: str | Path, dtype: mx.Dtype | str | None = None, dequantize: bool | None = None
) -> nn.Module:
    """Build the model of `path` (a directory with config.json and safetensors) with its weights.

    `dtype`: compute dtype (default: float32 on CPU, the checkpoint's elsewhere).
    `dequantize`: expand quantized matrices to dense `dtype` (default: on the CPU backend, when the
    dense model takes under half of the memory).
    """
    model_dir = Path(path)
    model, config, weights = build_and_check(model_dir)
    dtype = compute_dtype(config, dtype)
    final = {
        name: value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value
        for name, value in weights.items()
    }
    needed = sum(_final_nbytes(v, dtype) for v in weights.values())
    limit = physical_memory()
    if needed > MEMORY_FRACTION * limit:
        raise ModelTooLargeError(
            f"{model_dir}: the model needs {needed / 2**30:.1f} GiB as {dtype}, this machine has "
            f"{limit / 2**30:.1f} GiB (pass a quantized checkpoint or a smaller dtype)"
        )
    model.load_weights(list(final.items()), strict=False)
    del weights, final
    for _, value in tree_flatten(model.parameters()):
        mx.eval(value)  # one tensor at a time: the memory-mapped source is dropped right after

    if dequantize is None:
        extra = _quantized_dense_bytes(model, dtype)
        dequantize = mx.default_device() == mx.cpu and needed + extra < DEQUANTIZE_FRACTION * limit
    if dequantize:
        dequantize_modules(model, dtype)
        for _, value in tree_flatten(model.parameters()):
            mx.eval(value)
    model.eval()
    return model


def load(
    path: str | Path, dtype: mx.Dtype | str | None = None, dequantize: bool | None = None
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a model directory; see `load_model` for the options."""
    from gemma_mlx.tokenizer import load_tokenizer

    model = load_model(path, dtype, dequantize)
    return model, load_tokenizer(Path(path))
