"""GGUF files of every Gemma variant convert into MLX models that compute what transformers computes
on the GGUF's own (gguf-py dequantized) weights."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

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


# Google's "Q4_0" QAT GGUFs: linears Q4_0, the tied embedding / head Q6_K, some E2B/E4B
# projections (here: the per-layer-embedding ones) F16, norms and small tensors F32.
F16_PROJECTIONS = ("per_layer_model_projection", "per_layer_input_gate", "per_layer_projection")


def release_mix(name: str, value: np.ndarray) -> T:
    if value.ndim < 2 or value.shape[-1] % 32 or "router" in name:
        return T.F32
    if name.endswith("embed_tokens.weight"):
        return T.Q6_K
    return T.F16 if any(p in name for p in F16_PROJECTIONS) else T.Q4_0


@pytest.fixture(scope="module")
def release_like(tmp_path_factory):
    """An E2B-like Gemma 4 (PLE, KV sharing) at width 256 (a Q6_K row), written in the release's
    mix and converted with the defaults: (torch reference on the GGUF's values, stored values by
    name, converted directory, report)."""
    from transformers import Gemma4TextConfig

    root = tmp_path_factory.mktemp("release-mix")
    config = Gemma4TextConfig(**(gguf_variant("e2b").to_dict() | {"hidden_size": 256}))
    torch_model = save_reference(config, root / "hf")
    stored = write_gguf(torch_model, root / "model.gguf", choose=release_mix)
    reference_state_dict(torch_model, stored)
    report = convert(root / "model.gguf", root / "mlx", progress=False)
    return torch_model, stored, root / "mlx", report


def test_release_mix_converts_bit_exactly(release_like):
    """Every weight of the converted directory, decoded as the model decodes it, equals gguf-py's
    dequantization bit for bit; F16 stays float16; no tensor is re-rounded."""
    from gemma_mlx.kernels import q6k

    _, stored, out, report = release_like
    assert {r.source for r in report.records} == {"Q4_0", "Q6_K", "F16", "F32"}
    assert report.inexact == []
    weights = {}
    for path in sorted(out.glob("model*.safetensors")):
        weights.update(mx.load(str(path)))
    config = json.loads((out / "config.json").read_text())["quantization"]
    assert config["model.embed_tokens"] == {"group_size": 16, "bits": 6, "mode": "gguf_q6_k"}
    checked = Counter()
    for name, expected in stored.items():
        base = name.removesuffix(".weight")
        entry = config.get(base)
        if isinstance(entry, dict) and entry.get("mode") == "gguf_q6_k":
            ours = q6k.decode(weights[name])
        elif f"{base}.scales" in weights:
            ours = mx.dequantize(
                weights[name], weights[f"{base}.scales"].astype(mx.float32),
                weights[f"{base}.biases"].astype(mx.float32), group_size=32, bits=4,
            )  # fmt: skip
        else:
            ours = weights[name]
            checked[str(ours.dtype)] += 1
        ours = np.asarray(ours.astype(mx.float32)).reshape(expected.shape)
        np.testing.assert_array_equal(ours, expected, err_msg=name)
        nonzero = expected != 0  # gguf-py's d * 0 keeps d's sign; MLX's affine form gives +0.0
        np.testing.assert_array_equal(
            ours[nonzero].view(np.uint32), expected[nonzero].view(np.uint32)
        )
        checked[base.rpartition(".")[2]] += 1
    assert checked["mlx.core.float16"] == sum(r.source == "F16" for r in report.records) > 0
    assert checked["embed_tokens"] == 1


def test_release_mix_logits_equal_the_float32_reference(release_like):
    """Quantized as a Mac keeps it, in float32: transformers on gguf-py's values, within 1e-4."""
    torch_model, _, out, _ = release_like
    expected = reference_logits(torch_model, PROMPT)
    model = load_model(out, dtype="float32", dequantize=False)
    from gemma_mlx.models.q6k import Q6KEmbedding

    assert isinstance(model.model.embed_tokens, Q6KEmbedding)
    ours = np.array(model(mx.array([PROMPT]))[0])
    assert np.abs(ours[-1] - expected[-1]).max() <= 1e-4
    assert np.abs(ours - expected).max() <= 1e-3
    assert expected.std() > 0.1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_release_mix_in_half_precision(release_like, dtype):
    """What a Mac computes: a Q6_K lookup is the exact row rounded once to the compute dtype (the
    layers downstream stay in it), the tied head gives float32 logits of the half-precision hidden
    state times the exact table."""
    torch_model, stored, out, _ = release_like
    model = load_model(out, dtype=dtype, dequantize=False)
    half = getattr(mx, dtype)
    table = stored["model.embed_tokens.weight"]
    ids = mx.array(PROMPT)
    rows = model.model.embed_tokens(ids)
    assert rows.dtype == half
    assert mx.array_equal(rows, mx.array(table[PROMPT]).astype(half)).item()
    h = mx.random.normal((3, table.shape[1]), key=mx.random.key(0)).astype(half)
    logits = model.model.embed_tokens.as_linear(h)
    assert logits.dtype == mx.float32
    h32 = np.asarray(h.astype(mx.float32), np.float64)
    exact = h32 @ table.T.astype(np.float64)
    assert (np.abs(np.asarray(logits) - exact) <= 1e-6 * (np.abs(h32) @ np.abs(table).T)).all()

    ours = model(mx.array([PROMPT]))[0]
    assert model.model.embed(ids[None]).dtype == half and ours.dtype == mx.float32
    # The whole model against float32: half-precision activations (and, in bfloat16, Q4_0's
    # float16 scales rounded to bfloat16 at load) move logits by up to 0.85 (bf16) / 0.095
    # (fp16) of a range of ~30 here: a sanity bound, the exactness is asserted above.
    expected = reference_logits(torch_model, PROMPT)
    bound = {"bfloat16": 0.1, "float16": 0.02}[dtype] * np.abs(expected).max()
    assert np.abs(np.asarray(ours) - expected).max() <= bound
