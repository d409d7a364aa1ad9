"""Bad input ends with a clear error naming the file and tensor or field, and leaves no output."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gemma_mlx.convert import OutputExistsError, convert
from gemma_mlx.convert.__main__ import main
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf_reference import finish, gguf_variant, write_gguf
from hf_reference import VARIANTS, save_reference
from safetensors.numpy import load_file, save_file

from gemma_mlx.errors import GemmaMLXError


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(save_reference(gguf_variant("gemma3"), path.parent / "hf"), path, T.Q4_0)
    return path


@pytest.fixture
def hf_dir(tmp_path):
    save_reference(VARIANTS["gemma3"](), tmp_path / "hf")
    return tmp_path / "hf"


def assert_fails_cleanly(src, out, *fragments: str) -> None:
    with pytest.raises(GemmaMLXError) as error:
        convert(src, out, progress=False)
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_truncated_gguf(gguf_file, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf_file.read_bytes()[: gguf_file.stat().st_size // 2])
    assert_fails_cleanly(truncated, tmp_path / "out", str(truncated), "truncated")


def test_unknown_gguf_architecture(tmp_path):
    path = tmp_path / "llama.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    finish(writer)
    assert_fails_cleanly(path, tmp_path / "out", str(path), "general.architecture", "'llama'")


def test_unsupported_gguf_quant_type(gguf_file, tmp_path):
    from gguf import GGUFReader

    path = tmp_path / "q8_1.gguf"
    reader = GGUFReader(gguf_file)
    writer = GGUFWriter(path, "gemma3")
    for field in reader.fields.values():
        if field.name.startswith(("gemma3.", "tokenizer.")):
            writer.add_key_value(
                field.name,
                field.contents(),
                field.types[0],
                field.types[-1] if len(field.types) > 1 else None,
            )
    for tensor in reader.tensors:
        data, qtype = np.asarray(tensor.data), tensor.tensor_type
        if tensor.name == "blk.0.attn_q.weight":  # Q8_1: 32 weights in 40 bytes, no dequantizer
            columns = int(tensor.shape[0])
            data, qtype = np.zeros((data.shape[0], columns // 32 * 40), np.uint8), T.Q8_1
        writer.add_tensor(tensor.name, data, raw_dtype=qtype)
    finish(writer)
    assert_fails_cleanly(
        path, tmp_path / "out", str(path), "model.layers.0.self_attn.q_proj", "Q8_1"
    )


def test_missing_tensor(hf_dir, tmp_path):
    weights = load_file(hf_dir / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, hf_dir / "model.safetensors")
    assert_fails_cleanly(
        hf_dir, tmp_path / "out", "model.safetensors", "model.layers.1.mlp.up_proj.weight"
    )


def test_shape_contradicts_config(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    config["intermediate_size"] += 32
    (hf_dir / "config.json").write_text(json.dumps(config))
    assert_fails_cleanly(hf_dir, tmp_path / "out", "model.safetensors", "mlp.", "shape")


def test_unsupported_compressed_tensors_scheme(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
    }
    (hf_dir / "config.json").write_text(json.dumps(config))
    assert_fails_cleanly(hf_dir, tmp_path / "out", str(hf_dir), "num_bits=8", "strategy='channel'")


def test_existing_output_needs_force(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        convert(hf_dir, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    convert(hf_dir, out, force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere.gguf"), "-o", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "nowhere.gguf" in err and "Traceback" not in err
