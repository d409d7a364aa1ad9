"""Converting Gemma 4 checkpoints with their vision/audio towers: the converted directory loads
as the multimodal model and gives transformers' logits with an image and audio in the prompt."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from convert_sources import is_quantized_linear, put_on_q4_0_grid, write_compressed_tensors
from gemma_mlx.convert import convert
from multimodal_reference import VARIANTS, save_reference, token_types
from safetensors.torch import load_file, save_file
from test_convert_safetensors import load_into
from test_multimodal_parity import encoded_prompt, one_torch_thread  # noqa: F401 (fixture)
from tiny_chat_model import write_tokenizer

import gemma_mlx
from gemma_mlx.models import gemma4_multimodal

TOWERS = gemma4_multimodal.OWN_PREFIXES


def language_linear(name: str) -> bool:
    """The text model's projections: what QAT checkpoints quantize (the towers stay as trained)."""
    return "language_model" in name and is_quantized_linear(name)


def assert_logits_match(torch_model, directory, variant: str) -> None:
    model, _ = gemma_mlx.load(directory)
    assert isinstance(model, gemma4_multimodal.Model)
    kwargs, tokens, media = encoded_prompt(model, variant)
    with torch.no_grad():
        ref = torch_model(
            input_ids=torch.tensor([tokens]),
            mm_token_type_ids=torch.tensor([token_types(tokens)]),
            **kwargs,
        ).logits[0]
    ref = ref.numpy()
    ours = np.array(model(mx.array([tokens]), media=media)[0])
    assert np.abs(ours[-1] - ref[-1]).max() <= 1e-4
    assert np.abs(ours - ref).max() <= 1e-3


def assert_towers_kept(report, directory, has_audio: bool) -> None:
    """Every tower tensor written in its source precision, and the multimodal config kept."""
    towers = [r for r in report.records if r.name.startswith(TOWERS)]
    assert towers and all(r.target == r.source and r.max_abs_error == 0 for r in towers)
    assert any(r.name.startswith("embed_vision.") for r in towers)
    assert any(r.name.startswith("embed_audio.") for r in towers) == has_audio
    config = json.loads((directory / "config.json").read_text())
    assert config["vision_config"] and bool(config.get("audio_config")) == has_audio
    assert (
        "quantization_config" not in config or "quant_method" not in config["quantization_config"]
    )


@pytest.mark.parametrize("variant, symmetric", [("e2b", True), ("31b", False)])
def test_compressed_tensors_keeps_the_towers(tmp_path, variant, symmetric):
    """E2B: vision and audio; 31B: vision whose image tokens attend both ways (the nested text
    config keeps `use_bidirectional_attention`)."""
    torch_model = save_reference(VARIANTS[variant](), tmp_path / "ct")
    write_tokenizer(tmp_path / "ct")
    expected = write_compressed_tensors(tmp_path / "ct", 32, symmetric, language_linear)
    load_into(torch_model, expected)

    report = convert(tmp_path / "ct", tmp_path / "mlx", progress=False)
    assert report.source_format == "compressed-tensors"
    assert_towers_kept(report, tmp_path / "mlx", has_audio=variant == "e2b")
    assert_logits_match(torch_model, tmp_path / "mlx", variant)


def test_qat_safetensors_12b_unified_keeps_its_embedders(tmp_path):
    """The 12B: encoder-free vision and audio embedders; text projections on the Q4_0 grid (what
    QAT trains), which the converter keeps exactly."""
    torch_model = save_reference(VARIANTS["12b"](), tmp_path / "qat")
    write_tokenizer(tmp_path / "qat")
    state = put_on_q4_0_grid(tmp_path / "qat", language_linear)
    load_into(torch_model, {k: v for k, v in state.items() if language_linear(k)})

    report = convert(tmp_path / "qat", tmp_path / "mlx", progress=False)
    quantized = [r for r in report.records if "Q4_0 recipe" in r.target]
    assert quantized and all(r.max_abs_error == 0 for r in quantized)
    assert not any(r.name.startswith(TOWERS) for r in quantized)
    assert_towers_kept(report, tmp_path / "mlx", has_audio=True)
    assert_logits_match(torch_model, tmp_path / "mlx", "12b")


def test_text_only_export_converts_as_a_text_model(tmp_path):
    """A multimodal config without tower weights (a text-only export) stays a flat text model."""
    save_reference(VARIANTS["31b"](), tmp_path / "src")
    write_tokenizer(tmp_path / "src")
    path = tmp_path / "src" / "model.safetensors"
    state = load_file(path)
    save_file({k: v for k, v in state.items() if "language_model" in k}, path)
    convert(tmp_path / "src", tmp_path / "mlx", progress=False)
    config = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert config["model_type"] == "gemma4_text" and "vision_config" not in config
    model, _ = gemma_mlx.load(tmp_path / "mlx")
    assert not isinstance(model, gemma4_multimodal.Model)


def test_converted_towers_in_half_precision(tmp_path):
    """What a Mac computes: a converted E2B-like directory in bf16/fp16 encodes an image close to
    float32."""
    save_reference(VARIANTS["e2b"](), tmp_path / "src")
    write_tokenizer(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "mlx", progress=False)
    full, _ = gemma_mlx.load(tmp_path / "mlx")
    ref = np.array(encoded_prompt(full, "e2b")[2].embeddings)
    for dtype in ("bfloat16", "float16"):
        half, _ = gemma_mlx.load(tmp_path / "mlx", dtype=dtype)
        low = np.array(encoded_prompt(half, "e2b")[2].embeddings.astype(mx.float32))
        assert np.isfinite(low).all()
        assert np.abs(low - ref).max() / np.abs(ref).max() <= 5e-2, dtype
