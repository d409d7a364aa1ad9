"""GGUF files of every Gemma variant convert into MLX models that compute what transformers computes
on the GGUF's own (gguf-py dequantized) weights."""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_tokenizer_equals_transformers_gguf_path_and_needs_no_torch(tmp_path):
    """The runtime install has no torch: the converter builds the tokenizer without it, and the
    files equal what transformers' own (torch-importing) GGUF reader builds."""
    torch_model = save_reference(gguf_variant("gemma3"), tmp_path / "hf")
    write_gguf(torch_model, tmp_path / "model.gguf", T.Q8_0)
    script = (
        "import sys; sys.modules['torch'] = None\n"  # `import torch` now raises ImportError
        "from gemma_mlx.convert import convert\n"
        f"convert({str(tmp_path / 'model.gguf')!r}, {str(tmp_path / 'mlx')!r}, progress=False)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)

    from transformers import GemmaTokenizer

    reference = GemmaTokenizer.from_pretrained(str(tmp_path), gguf_file="model.gguf")
    reference.save_pretrained(str(tmp_path / "reference"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        ours = json.loads((tmp_path / "mlx" / name).read_text())
        theirs = json.loads((tmp_path / "reference" / name).read_text())
        for how_it_was_loaded in ("is_local", "local_files_only"):
            theirs.pop(how_it_was_loaded, None)
        assert ours == theirs, name
