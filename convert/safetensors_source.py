"""Hugging Face safetensors sources: compressed-tensors `pack-quantized` int4, and unquantized
(QAT) checkpoints quantized here with the Q4_0 recipe they were trained for.

Tensor names go through the model's own `sanitize` (prefixes, towers, fused experts), so the output
holds exactly our (and mlx-lm's) parameter names. A Gemma 4 checkpoint with vision/audio towers
keeps them (unquantized towers in their source precision) and its multimodal config.
"""

from __future__ import annotations

import re
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from gemma_mlx.convert.mlx_format import (
    QuantizedTensor,
    compact,
    dequantize,
    quantize_affine,
    quantize_q4_0,
    quantized_nbytes,
)
from gemma_mlx.convert.pipeline import Job, Plan, check_against_config, lazy_model
from gemma_mlx.convert.tensors import (
    Converted,
    ErrorMeter,
    TensorRecord,
    make_record,
    quantize_rows,
)

from gemma_mlx.errors import ConfigError, WeightsError
from gemma_mlx.loading import read_config, read_weights, weight_files
from gemma_mlx.models.gemma4_multimodal import OWN_PREFIXES as TOWER_PREFIXES
from gemma_mlx.models.gemma4_multimodal import has_towers, holds_towers

# Kept in the source precision by default, as in Google's QAT releases: embeddings, router, head.
DEFAULT_KEEP = (r"embed_tokens", r"lm_head", r"\.router\.")
RECIPES = ("q4_0", "affine")
DRAFTER_BITS = 8
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
)  # fmt: skip
CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def detect_format(config: dict[str, Any], path: Path) -> str:
    if "quantization" in config:
        raise ConfigError(
            f"{path / 'config.json'} has a 'quantization' section: this is already an MLX model, "
            "load it directly"
        )
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method is None:
        return "safetensors"
    if method == "compressed-tensors":
        return "compressed-tensors"
    raise ConfigError(
        f"{path / 'config.json'}: quantization_config.quant_method = {method!r} is not supported"
    )


def output_config(config: dict[str, Any], media: bool) -> dict[str, Any]:
    """The config.json our converted directories carry: without the source's quantization keys;
    the flat text config for a text model (multimodal wrappers unwrapped); whole for a model kept
    with its towers (`media`: the loader reads `text_config`, `vision_config`, `audio_config` and
    the media token ids) and for an MTP drafter (its top level holds the drafter's own fields)."""
    if media or "assistant" in str(config.get("model_type", "")):
        return {k: v for k, v in config.items() if k not in ("quantization_config", "quantization")}
    text = dict(config.get("text_config") or config)
    for key in (
        "quantization_config",
        "quantization",
        "text_config",
        "vision_config",
        "audio_config",
    ):
        text.pop(key, None)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype"):
        if key in config and key not in text:
            text[key] = config[key]
    return text


def ct_scheme(config: dict[str, Any], path: Path) -> tuple[int, bool]:
    """(group size, symmetric) of a compressed-tensors W4A16 `pack-quantized` config."""
    qc = config["quantization_config"]
    if qc.get("format") != "pack-quantized":
        raise ConfigError(
            f"{path}: compressed-tensors format {qc.get('format')!r} is not supported "
            "(only 'pack-quantized')"
        )
    groups = list((qc.get("config_groups") or {}).values())
    schemes = {
        (
            g["weights"]["num_bits"],
            g["weights"].get("strategy"),
            g["weights"].get("group_size"),
            g["weights"].get("symmetric", True),
        )
        for g in groups
    }
    if len(schemes) != 1:
        raise ConfigError(
            f"{path}: quantization_config has {len(schemes)} weight schemes; one is supported"
        )
    bits, strategy, group_size, symmetric = schemes.pop()
    if bits != 4 or strategy != "group" or group_size not in (32, 64, 128):
        raise ConfigError(
            f"{path}: compressed-tensors weights num_bits={bits}, strategy={strategy!r}, "
            f"group_size={group_size} are not supported (int4, 'group', 32/64/128)"
        )
    return group_size, symmetric


def unpack_int4_rows(packed: np.ndarray, rows: int) -> np.ndarray:
    """compressed-tensors packs a zero point along dim 0: 8 nibbles per int32, LSB first."""
    nibbles = np.stack([(packed.view(np.uint32) >> (4 * i)) & 0xF for i in range(8)], axis=1)
    return nibbles.reshape(-1, packed.shape[-1])[:rows].astype(np.int32) - 8


def safetensors_plan(
    path: Path,
    recipe: str = "q4_0",
    group_size: int = 32,
    keep: tuple[str, ...] = DEFAULT_KEEP,
    quantize_drafter: bool = False,
) -> Plan:
    path = Path(path)
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    config = read_config(path)
    source_format = detect_format(config, path)
    files = weight_files(path)
    weights, origin = read_weights(files)
    # A Gemma 4 checkpoint keeps its vision/audio towers (a text-only export stays a text model).
    media = has_towers(config) and holds_towers(weights)
    weights = lazy_model(config, media).sanitize(weights)
    check_against_config(
        config, dict(_output_shapes(weights)), {}, files[0] if len(files) == 1 else path, media
    )
    drafter = "assistant" in str(config.get("model_type", ""))
    if not drafter:  # drafters share their target's tokenizer
        check_tokenizer(path)
    quantize_floats = source_format == "safetensors" and (quantize_drafter or not drafter)
    keep_patterns = [re.compile(k) for k in keep]
    ct = ct_scheme(config, path) if source_format == "compressed-tensors" else None

    def float_job(name: str) -> Job:
        shape, nbytes, dtype = weights[name].shape, weights[name].nbytes, weights[name].dtype
        wanted = (
            quantize_floats and name.endswith(".weight") and len(shape) in (2, 3)
            and shape[-1] % group_size == 0
            and not any(p.search(name) for p in keep_patterns)
            and not name.startswith(TOWER_PREFIXES)  # no QAT grid to keep: source precision
        )  # fmt: skip
        dtype_name = str(dtype).split(".")[-1]
        bits = DRAFTER_BITS if drafter else 4
        numel = int(np.prod(shape))
        output_bytes = quantized_nbytes(numel, bits, group_size, 2) if wanted else nbytes

        def run() -> list[tuple[str, Converted, TensorRecord]]:
            value = weights.pop(name)  # once read, the data must not outlive its job
            if not wanted:
                record = make_record(name, dtype_name, dtype_name, shape, nbytes, ErrorMeter())
                return [(name, Converted(value), record)]
            meter = ErrorMeter()
            if drafter:  # drafters lose acceptance below 8 bits, and have no QAT grid to keep
                quantize = partial(quantize_affine, bits=DRAFTER_BITS, group_size=group_size)
                target = f"min/max affine {DRAFTER_BITS}-bit g{group_size} (drafter)"
            elif recipe == "q4_0":
                quantize = partial(quantize_q4_0, group_size=group_size)
                target = f"Q4_0 recipe 4-bit g{group_size}"
            else:
                quantize = partial(quantize_affine, bits=4, group_size=group_size)
                target = f"min/max affine 4-bit g{group_size}"
            q = quantize_rows(value, lambda w: w, quantize, shape[-1], meter)
            return [
                (name, Converted(q), make_record(name, dtype_name, target, shape, q.nbytes, meter))
            ]

        return Job(name, nbytes, output_bytes, run)

    def ct_job(base: str) -> Job:
        group, symmetric = ct
        packed, scale = weights[f"{base}.weight_packed"], weights[f"{base}.weight_scale"]
        nbytes = packed.nbytes + scale.nbytes
        output_bytes = packed.nbytes + 2 * scale.size * 4  # float32 scales at most, and biases
        has_zero = f"{base}.weight_zero_point" in weights
        if not has_zero and not symmetric:
            raise WeightsError(
                f"{origin.get(f'{base}.weight_packed', path)}: '{base}' is asymmetric but has no "
                "weight_zero_point"
            )

        def run() -> list[tuple[str, Converted, TensorRecord]]:
            packed, scale = (
                weights.pop(f"{base}.weight_packed"),
                weights.pop(f"{base}.weight_scale"),
            )
            zero = weights.pop(f"{base}.weight_zero_point", None)
            p = np.asarray(packed).view(np.uint32)
            s = np.asarray(scale.astype(mx.float32))
            rows, columns = p.shape[0], p.shape[-1] * 8
            if s.shape != (rows, columns // group):
                raise WeightsError(
                    f"{path}: '{base}.weight_scale' has shape {s.shape}, the packed weight implies "
                    f"{(rows, columns // group)}"
                )
            zp = (
                0.0 if zero is None else unpack_int4_rows(np.asarray(zero), rows).astype(np.float32)
            )
            q = QuantizedTensor(p, compact(s), compact(-(8 + zp) * s), 4, group)
            # compressed-tensors' own dequantization, in float32: (nibble - 8 - zp) * scale.
            nibbles = (p[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
            expand = partial(np.repeat, repeats=group, axis=-1)
            reference = (
                nibbles.reshape(rows, columns) - 8.0 - expand(zp + np.zeros_like(s))
            ) * expand(s)
            meter = ErrorMeter()
            meter.add(dequantize(q), reference)
            source = f"compressed-tensors int4 g{group}{'' if zero is None else ' + zero point'}"
            target = f"affine 4-bit g{group} ({np.dtype(q.scales.dtype).name} scales)"
            record = make_record(f"{base}.weight", source, target, (rows, columns), q.nbytes, meter)
            return [(f"{base}.weight", Converted(q), record)]

        return Job(base, nbytes, output_bytes, run)

    jobs = []
    for name in weights:
        suffix = name.rsplit(".", 1)[-1]
        if suffix in CT_SUFFIXES:
            if suffix == "weight_packed":
                jobs.append(ct_job(name.removesuffix(".weight_packed")))
            continue
        jobs.append(float_job(name))

    def write_extra_files(out_dir: Path) -> None:
        for side in SIDE_FILES:
            if (path / side).is_file():
                shutil.copy2(path / side, out_dir / side)

    return Plan(source_format, output_config(config, media), jobs, write_extra_files)


def check_tokenizer(path: Path) -> None:
    """Refuse a source whose tokenizer files are missing or unreadable: the converted model could
    not be loaded (before converting, not after)."""
    from gemma_mlx.tokenizer import load_tokenizer

    if not (path / "tokenizer.json").is_file():
        raise ConfigError(
            f"{path}: no tokenizer.json, so the converted model could not be loaded; copy the "
            "tokenizer files of the original model (tokenizer.json, tokenizer_config.json) into it"
        )
    load_tokenizer(path)


def _output_shapes(weights: dict[str, mx.array]):
    """(name, unquantized shape) of every output tensor: a packed int4 weight unpacks 8 per int32."""
    for name, value in weights.items():
        if name.endswith(".weight_packed"):
            yield name.removesuffix("_packed"), (*value.shape[:-1], value.shape[-1] * 8)
        elif name.rsplit(".", 1)[-1] not in CT_SUFFIXES:
            yield name, tuple(value.shape)
