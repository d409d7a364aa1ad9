"""compressed-tensors W4A16 and unquantized QAT checkpoints: exact conversion, and what min/max
re-rounding (mlx-lm's `convert -q`) would lose."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from convert_sources import is_quantized_linear, put_on_q4_0_grid, write_compressed_tensors
from gemma_mlx.convert import convert
from hf_reference import VARIANTS, VOCAB, reference_logits, save_reference
from safetensors.torch import load_file
from tiny_chat_model import write_tokenizer

from gemma_mlx.loading import load_model

PROMPT = np.random.default_rng(4).integers(4, VOCAB, 19).tolist()


def load_into(torch_model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    state = torch_model.state_dict()
    for name, value in weights.items():
        assert name in state, name
        state[name] = value
    torch_model.load_state_dict(state)


@pytest.mark.parametrize("variant, symmetric", [("e2b", True), ("31b", False)])
def test_compressed_tensors_is_exact(tmp_path, variant, symmetric):
    torch_model = save_reference(VARIANTS[variant](), tmp_path / "ct")
    write_tokenizer(tmp_path / "ct")  # the converter refuses a source without one
    expected_weights = write_compressed_tensors(tmp_path / "ct", 32, symmetric)
    load_into(torch_model, expected_weights)

    report = convert(tmp_path / "ct", tmp_path / "mlx", progress=False)
    assert report.source_format == "compressed-tensors"
    converted = [r for r in report.records if r.source.startswith("compressed-tensors")]
    assert len(converted) == len(expected_weights) and all(r.exact for r in converted)

    ours = mx.load(str(tmp_path / "mlx" / "model.safetensors"))
    for name, expected in expected_weights.items():
        short = name.replace("model.language_model.", "model.").removesuffix(".weight")
        if f"{short}.scales" not in ours:  # a KV-shared layer's unused K/V: dropped by design
            continue
        w = mx.dequantize(
            ours[f"{short}.weight"],
            ours[f"{short}.scales"].astype(mx.float32),
            ours[f"{short}.biases"].astype(mx.float32),
            group_size=32,
            bits=4,
        )
        np.testing.assert_array_equal(np.array(w), expected.numpy())

    logits = np.array(load_model(tmp_path / "mlx")(mx.array([PROMPT]))[0])
    reference = reference_logits(torch_model, PROMPT)
    assert np.abs(logits[-1] - reference[-1]).max() <= 1e-4


def test_qat_checkpoint_keeps_its_grid_where_mlx_lm_does_not(tmp_path):
    """Weights on the Q4_0 grid (what QAT trains) convert with zero error; mlx-lm re-rounds them."""
    torch_model = save_reference(VARIANTS["gemma3"](), tmp_path / "qat")
    write_tokenizer(tmp_path / "qat")
    state = put_on_q4_0_grid(tmp_path / "qat")
    load_into(torch_model, {k: v.float() for k, v in state.items() if is_quantized_linear(k)})

    report = convert(tmp_path / "qat", tmp_path / "ours", progress=False)
    quantized = [r for r in report.records if "Q4_0 recipe" in r.target]
    assert quantized and max(r.max_abs_error for r in quantized) == 0.0
    ours = np.array(load_model(tmp_path / "ours")(mx.array([PROMPT]))[0])
    reference = reference_logits(torch_model, PROMPT)
    ours_error = np.abs(ours - reference).max()
    assert ours_error <= 1e-3

    from mlx_lm.convert import convert as mlx_lm_convert

    mlx_lm_convert(
        str(tmp_path / "qat"), str(tmp_path / "mlx_lm"), quantize=True, q_group_size=32, q_bits=4
    )
    theirs_weights = mx.load(str(tmp_path / "mlx_lm" / "model.safetensors"))
    name = next(k for k in state if is_quantized_linear(k)).removesuffix(".weight")
    theirs = mx.dequantize(
        theirs_weights[f"{name}.weight"],
        theirs_weights[f"{name}.scales"],
        theirs_weights[f"{name}.biases"],
        group_size=32,
        bits=4,
    )
    weight_error = np.abs(
        np.array(theirs.astype(mx.float32)) - state[f"{name}.weight"].float().numpy()
    ).max()
    print(
        f"\nQAT grid: our max weight error 0, mlx_lm.convert -q {weight_error:.3g}; "
        f"logit error vs transformers: ours {ours_error:.2g}"
    )
    assert weight_error > 1e-3


def test_unquantized_affine_recipe_by_flag(tmp_path):
    save_reference(VARIANTS["gemma3"](), tmp_path / "plain")
    write_tokenizer(tmp_path / "plain")
    report = convert(tmp_path / "plain", tmp_path / "out", recipe="affine", progress=False)
    quantized = [r for r in report.records if "min/max affine" in r.target]
    assert quantized and all(0 < r.max_abs_error < 0.05 for r in quantized)
    kept = {r.name for r in report.records if r.target == r.source}
    assert "model.embed_tokens.weight" in kept


@pytest.mark.parametrize("quantize_drafter", [False, True])
def test_mtp_drafter_checkpoint_converts(tmp_path, quantize_drafter):
    """Drafters stay in source precision by default (as released), 8-bit on request; both load."""
    from assistant_reference import assistant_config, save_assistant

    save_assistant(assistant_config(ordered=True), tmp_path / "drafter")
    report = convert(
        tmp_path / "drafter", tmp_path / "out", quantize_drafter=quantize_drafter, progress=False
    )
    quantized = [r for r in report.records if "8-bit" in r.target]
    assert bool(quantized) == quantize_drafter
    assert all(r.max_abs_error < 2e-3 for r in quantized)
    model = load_model(tmp_path / "out")
    assert model.model_type == "gemma4_assistant"
    if not quantize_drafter:
        source = load_file(tmp_path / "drafter" / "model.safetensors")
        ours = mx.load(str(tmp_path / "out" / "model.safetensors"))
        name = next(k for k in source if k.endswith("q_proj.weight"))
        np.testing.assert_array_equal(np.array(ours[name]), source[name].numpy())
