"""GGUF files of every Gemma variant convert into MLX models that compute what transformers computes
on the GGUF's own (gguf-py dequantized) weights."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from gemma_mlx.convert import convert
from gguf import GGMLQuantizationType as T
from gguf_reference import gguf_variant, reference_state_dict, write_gguf
from hf_reference import VOCAB, reference_logits, save_reference

from gemma_mlx.loading import load_model

PROMPT = np.random.default_rng(3).integers(4, VOCAB, 21).tolist()


@pytest.mark.parametrize(
    "variant, qtype",
    [("gemma3", T.Q4_0), ("e2b", T.Q8_0), ("26b-a4b", T.Q4_0), ("12b", T.Q5_1), ("31b", T.Q4_1)],
)
def test_converted_gguf_matches_transformers(tmp_path, variant, qtype):
    torch_model = save_reference(gguf_variant(variant), tmp_path / "hf")
    stored = write_gguf(torch_model, tmp_path / "model.gguf", qtype)
    reference_state_dict(torch_model, stored)
    expected = reference_logits(torch_model, PROMPT)

    report = convert(tmp_path / "model.gguf", tmp_path / "mlx", progress=False)
    quantized = [r for r in report.records if r.source == qtype.name]
    assert quantized and all(r.exact for r in quantized)

    model = load_model(tmp_path / "mlx")
    ours = np.array(model(mx.array([PROMPT]))[0])
    assert np.abs(ours[-1] - expected[-1]).max() <= 1e-4
    assert np.abs(ours - expected).max() <= 1e-3
    assert expected.std() > 0.1
    config = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert config["quantization"]["mode"] == "affine"
