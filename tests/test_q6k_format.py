"""Q6_K weights in a converted directory: kept as GGUF blocks by default, requantized on request
(`--requant-bits`, `--mlx-lm-compatible`), loaded as `gemma_mlx.models.q6k` layers (or expanded
exactly to dense ones on the CPU), a clear error for a bad entry, and GGUF caches keyed by the
converter's format version."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from convert_sources import run_converter
from gemma_mlx.convert import convert
from gguf import GGMLQuantizationType as T
from gguf_reference import gguf_variant, write_gguf
from hf_reference import VOCAB, save_reference
from tiny_chat_model import write_model
from transformers import Gemma3TextConfig

from gemma_mlx import convert as convert_package
from gemma_mlx import hub
from gemma_mlx.errors import ConfigError
from gemma_mlx.kernels import q6k
from gemma_mlx.loading import load_model
from gemma_mlx.models.q6k import MODE, Q6KEmbedding, Q6KLinear

WIDTH = 256  # a Q6_K row


def q6k_where_it_fits(name: str, value: np.ndarray) -> T:
    """Q6_K for every matrix with rows of 256 (embedding, q/k/v, gate/up), Q4_0 for the rest."""
    if value.ndim < 2 or value.shape[-1] % 32:
        return T.F32
    return T.Q6_K if value.shape[-1] % 256 == 0 else T.Q4_0


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    """A Gemma 3 GGUF at width 256 whose embedding and 5 projections per layer are Q6_K; and the
    values gguf-py decodes them to, by name."""
    root = tmp_path_factory.mktemp("q6k-gguf")
    config = Gemma3TextConfig(**(gguf_variant("gemma3").to_dict() | {"hidden_size": WIDTH}))
    stored = write_gguf(
        save_reference(config, root / "hf"), root / "model.gguf", choose=q6k_where_it_fits
    )
    return root / "model.gguf", stored


@pytest.fixture(scope="module")
def exact_dir(gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("exact") / "mlx"
    report = convert(gguf[0], out, progress=False)
    return out, report


def quantization(directory) -> dict:
    return json.loads((directory / "config.json").read_text())["quantization"]


def test_default_keeps_q6_k_blocks_exactly(exact_dir):
    out, report = exact_dir
    kept = [r for r in report.records if r.source == "Q6_K"]
    assert len(kept) == 1 + 6 * 5  # the embedding, q/k/v/gate/up of 6 layers
    assert all(r.exact and r.target == "GGUF Q6_K blocks" for r in kept)
    assert {r.bits_per_weight for r in kept} == {6.5625}
    assert report.inexact == []
    entries = quantization(out)
    assert entries["model.embed_tokens"] == {"group_size": 16, "bits": 6, "mode": MODE}
    assert entries["model.layers.0.mlp.gate_proj"]["mode"] == MODE
    assert "mode" not in entries["model.layers.0.mlp.down_proj"]  # Q4_0: affine
    assert entries["mode"] == "affine" and entries["bits"] == 4


def test_loaded_layers_decode_to_gguf_py_values(exact_dir, gguf):
    out, _ = exact_dir
    stored = gguf[1]
    model = load_model(out, dequantize=False)
    embed, gate = model.model.embed_tokens, model.model.layers[0].mlp.gate_proj
    assert isinstance(embed, Q6KEmbedding) and isinstance(gate, Q6KLinear)
    np.testing.assert_array_equal(
        np.asarray(q6k.decode(embed.weight)), stored["model.embed_tokens.weight"]
    )
    x = mx.random.normal((2, WIDTH), key=mx.random.key(1))
    expected = np.asarray(x, np.float64) @ stored["model.layers.0.mlp.gate_proj.weight"].T
    np.testing.assert_allclose(np.asarray(gate(x)), expected, rtol=1e-5, atol=1e-5)

    dense = load_model(out)  # the CPU default: every layer expanded to float32, exactly
    assert isinstance(dense.model.embed_tokens, nn.Embedding)
    assert isinstance(dense.model.layers[0].mlp.gate_proj, nn.Linear)
    np.testing.assert_array_equal(
        np.asarray(dense.model.embed_tokens.weight), stored["model.embed_tokens.weight"]
    )
    prompt = mx.array([[5, 17, 300, VOCAB - 1]])
    np.testing.assert_allclose(np.asarray(dense(prompt)), np.asarray(model(prompt)), atol=2e-4)


def test_requant_bits_and_mlx_lm_compatible_requantize_q6_k(gguf, tmp_path):
    """`--mlx-lm-compatible`: 8-bit affine (reported inexact) that mlx-lm loads; `--requant-bits
    4`: a smaller file; the default output is one mlx-lm cannot load (README says so)."""
    import mlx_lm

    status, stderr = run_converter(gguf[0], "-o", tmp_path / "compat", "--mlx-lm-compatible")
    assert status == 0, stderr
    assert "bits/weight" in stderr
    entries = quantization(tmp_path / "compat")
    assert entries["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert all(not isinstance(e, dict) or "mode" not in e for e in entries.values())
    mlx_lm.load(str(tmp_path / "compat"))

    report = convert(gguf[0], tmp_path / "small", progress=False, requant_bits=4)
    requantized = [r for r in report.records if r.source == "Q6_K"]
    assert requantized and all(not r.exact and r.bits_per_weight == 5.0 for r in requantized)
    assert quantization(tmp_path / "small")["model.embed_tokens"] == {"group_size": 32, "bits": 4}

    exact = tmp_path / "exact"
    convert(gguf[0], exact, progress=False)
    with pytest.raises(ValueError, match=MODE):
        mlx_lm.load(str(exact))


def test_report_gives_exactness_and_bits_for_every_tensor(gguf, tmp_path):
    status, stderr = run_converter(
        gguf[0], "-o", tmp_path / "out", "--report", tmp_path / "report.json", "--no-progress"
    )
    assert status == 0, stderr
    tensors = json.loads((tmp_path / "report.json").read_text())["tensors"]
    assert tensors and all(isinstance(t["exact"], bool) for t in tensors)
    assert all(t["bits_per_weight"] > 0 for t in tensors)
    assert {t["target"] for t in tensors if t["source"] == "Q6_K"} == {"GGUF Q6_K blocks"}


def test_bad_q6_k_entry_is_a_config_error_naming_the_module(exact_dir, tmp_path):
    out, _ = exact_dir
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in out.iterdir():
        (broken / item.name).symlink_to(item)
    config = json.loads((out / "config.json").read_text())
    config["quantization"]["model.norm"] = {"group_size": 16, "bits": 6, "mode": MODE}
    (broken / "config.json").unlink()
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"'model\.norm': mode 'gguf_q6_k' is for a linear"):
        load_model(broken)


def test_q6_k_layer_needs_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        Q6KLinear(100, 4)


def test_gguf_cache_entry_is_keyed_by_the_converter_format(tmp_path, monkeypatch):
    """A cache entry an older converter wrote (another FORMAT_VERSION) is not reused."""
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    calls = []

    def convert_gguf(src, out, progress=True):
        calls.append(src)
        write_model(out)

    monkeypatch.setattr(convert_package, "convert_gguf", convert_gguf)
    source = tmp_path / "model.gguf"
    source.write_bytes(b"gguf")
    first = hub.resolve_model(source)
    assert first.name.endswith(f"-v{convert_package.FORMAT_VERSION}")
    assert hub.resolve_model(source) == first and len(calls) == 1
    monkeypatch.setattr(convert_package, "FORMAT_VERSION", convert_package.FORMAT_VERSION + 1)
    second = hub.resolve_model(source)
    assert second != first and len(calls) == 2


def test_kv_budget_reads_the_compute_dtype_of_a_q6_k_embedding(exact_dir):
    """Continuous batching sizes KV caches by the model's compute dtype, which a Q6_K embedding
    (uint8 blocks, no scales) gives through its lookups' dtype."""
    from gemma_mlx.batching.memory import sequence_kv_bytes

    out, _ = exact_dir
    blocks = load_model(out, dtype="bfloat16", dequantize=False)
    dense = load_model(out, dtype="bfloat16", dequantize=True)
    assert isinstance(blocks.model.embed_tokens, Q6KEmbedding)
    assert sequence_kv_bytes(blocks, 40, 4, 8) == sequence_kv_bytes(dense, 40, 4, 8) > 0
