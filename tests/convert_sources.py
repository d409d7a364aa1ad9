"""Tiny converter sources (a Q4_0 GGUF, a safetensors directory with its tokenizer, a
compressed-tensors checkpoint) and helpers to run the converter's command line in-process and to
see what it left behind."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from tiny_chat_model import write_model


def tiny_gguf(directory: Path) -> Path:
    """A Gemma 3 GGUF as llama.cpp writes it (built from a tiny transformers model)."""
    from gguf import GGMLQuantizationType
    from gguf_reference import gguf_variant, write_gguf
    from hf_reference import save_reference

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tiny.gguf"
    model = save_reference(gguf_variant("gemma3"), directory / "hf")
    write_gguf(model, path, GGMLQuantizationType.Q4_0)
    shutil.rmtree(directory / "hf")
    return path


def tiny_safetensors(directory: Path) -> Path:
    """An unquantized Gemma 3 checkpoint directory with its tokenizer (no torch needed)."""
    return write_model(directory)


# The linears Google's QAT checkpoints quantize (attention and MLP projections).
QUANTIZED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.")


def is_quantized_linear(name: str) -> bool:
    return name.endswith(".weight") and any(part in name for part in QUANTIZED)


def write_compressed_tensors(
    directory: Path,
    group_size: int,
    symmetric: bool,
    quantized: Callable[[str], bool] = is_quantized_linear,
) -> dict:
    """Quantize the weights `quantized` names in the checkpoint in `directory` with
    compressed-tensors' own quantizer and packer; returns its own decompression of every quantized
    weight (float32 torch tensors), by name."""
    import torch
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import load_file, save_file

    args = QuantizationArgs(
        num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group_size
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    path = next(directory.glob("*.safetensors"))
    state = load_file(path)
    out, decompressed = {}, {}
    for name, weight in state.items():
        if not quantized(name):
            out[name] = weight
            continue
        weight = weight.to(torch.bfloat16)  # as released: bf16 weights, so bf16 scales
        groups = weight.float().reshape(weight.shape[0], -1, group_size)
        scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        module = {
            "weight": weight,
            "weight_scale": scale.to(weight.dtype),
            "weight_zero_point": zero,
        }
        compressed = PackedQuantizationCompressor.compress(module, scheme)
        base = name.removesuffix(".weight")
        out |= {f"{base}.{key}": value for key, value in compressed.items()}
        # Its own dequantization, carried out in float32 (in bf16 it would round (q - zp) * scale).
        in_float32 = dict(compressed, weight_scale=compressed["weight_scale"].float())
        decompressed[name] = PackedQuantizationCompressor.decompress(in_float32, scheme)["weight"]
    path.unlink()
    save_file(out, directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized")
    config["quantization_config"] = qc.model_dump(mode="json") | {
        "quant_method": "compressed-tensors"
    }
    (directory / "config.json").write_text(json.dumps(config))
    return decompressed


def put_on_q4_0_grid(
    directory: Path, selected: Callable[[str], bool] = is_quantized_linear
) -> dict:
    """Move the `selected` weights of the checkpoint in `directory` onto the Q4_0 grid (what QAT
    trains), in place; returns the new state (torch tensors), by name."""
    import torch
    from gemma_mlx.convert.mlx_format import dequantize, quantize_q4_0
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    state = load_file(path)
    for name, weight in state.items():
        if selected(name):
            on_grid = dequantize(quantize_q4_0(weight.float().numpy(), 32))
            state[name] = torch.from_numpy(on_grid).to(weight.dtype)
    save_file(state, path)
    return state


def run_converter(*argv: str | Path) -> tuple[int, str]:
    """(exit status, stderr) of `gemma-mlx-convert argv`, run in this process."""
    from gemma_mlx.convert.__main__ import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            status = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            status = e.code
    return status, stderr.getvalue()


def staging_leftovers(directory: Path) -> list[str]:
    """Staging paths (`.<name>.partial-...`) anywhere under `directory`."""
    return sorted(str(p) for p in Path(directory).rglob("*.partial-*"))


def digest(path: Path) -> str:
    """A hash of a file, or of a directory's names and contents."""
    path = Path(path)
    h = hashlib.sha256()
    for item in sorted([path] if path.is_file() else path.rglob("*")):
        h.update(str(item.relative_to(path.parent)).encode())
        if item.is_file():
            h.update(item.read_bytes())
    return h.hexdigest()
