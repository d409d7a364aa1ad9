"""The converter's contract: bad input ends with one line naming the file, field or option and exit
status 2, before anything is written where the check can run first; unexpected errors with one line,
a hint and exit status 1; a full disk with one line and nothing left behind."""

from __future__ import annotations

import json
import struct
import subprocess

import numpy as np
import pytest
from convert_sources import digest, run_converter, staging_leftovers, tiny_gguf, tiny_safetensors
from gemma_mlx.convert import OutputExistsError, convert
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter
from gguf_reference import finish
from tiny_chat_model import write_tokenizer

from gemma_mlx.errors import GemmaMLXError
from gemma_mlx.outputs import OutputError


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return tiny_gguf(tmp_path_factory.mktemp("gguf"))


@pytest.fixture
def hf_dir(tmp_path):
    from hf_reference import VARIANTS, save_reference

    save_reference(VARIANTS["gemma3"](), tmp_path / "hf")
    write_tokenizer(tmp_path / "hf")
    return tmp_path / "hf"


@pytest.fixture
def st_dir(tmp_path):
    return tiny_safetensors(tmp_path / "st")


def rewrite_gguf(source, path, keep_field=lambda name: True, tensor=None, values=None) -> None:
    """A copy of the GGUF `source` without the fields `keep_field` rejects, with `values` for some;
    `tensor(t)` may give another (data, type) for a tensor."""
    reader = GGUFReader(source)
    writer = GGUFWriter(path, "gemma3")
    for field in reader.fields.values():
        if field.name.startswith(("gemma3.", "tokenizer.")) and keep_field(field.name):
            writer.add_key_value(
                field.name,
                (values or {}).get(field.name, field.contents()),
                field.types[0],
                field.types[-1] if len(field.types) > 1 else None,
            )
    for t in reader.tensors:
        data, qtype = (tensor and tensor(t)) or (np.asarray(t.data), t.tensor_type)
        writer.add_tensor(t.name, data, raw_dtype=qtype)
    finish(writer)


def assert_fails_cleanly(src, out, *fragments: str) -> None:
    with pytest.raises(GemmaMLXError) as error:
        convert(src, out, progress=False)
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))
    assert not out.exists()
    assert staging_leftovers(out.parent) == []


def assert_bad_input(argv, *fragments: str) -> str:
    """The command line exits 2 with one line on stderr holding every fragment."""
    status, err = run_converter(*argv)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, (status, err)
    assert lines[0].startswith("gemma-mlx-convert: error:") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# the library's errors --------------------------------------------------------------------------


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
    def q8_1(t):
        if t.name == "blk.0.attn_q.weight":  # Q8_1: 32 weights in 40 bytes, no dequantizer
            return np.zeros((t.data.shape[0], int(t.shape[0]) // 32 * 40), np.uint8), T.Q8_1
        return None

    path = tmp_path / "q8_1.gguf"
    rewrite_gguf(gguf_file, path, tensor=q8_1)
    assert_fails_cleanly(
        path, tmp_path / "out", str(path), "model.layers.0.self_attn.q_proj", "Q8_1"
    )


def test_missing_tensor(hf_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

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


def test_force_replaces_only_a_conversion(st_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        convert(st_dir, out, progress=False)
    with pytest.raises(OutputError, match="not written by gemma_mlx"):
        convert(st_dir, out, force=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    convert(st_dir, out, force=True, progress=False)  # an empty directory may be replaced
    convert(st_dir, out, force=True, progress=False)  # and so may our own output
    assert (out / "config.json").is_file() and staging_leftovers(tmp_path) == []


# the command line ------------------------------------------------------------------------------


def damage_index(directory, text: str) -> str:
    (directory / "model.safetensors.index.json").write_text(text)
    return "model.safetensors.index.json"


def damage_config(directory, change) -> str:
    path = directory / "config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return "config.json"


def drop_data_offsets(directory) -> str:
    path = directory / "model.safetensors"
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    del header[next(k for k in header if k != "__metadata__")]["data_offsets"]
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + length :])
    return "model.safetensors"


DAMAGED_DIRECTORIES = {
    "invalid index": lambda d: damage_index(d, "{"),
    "index without weight_map": lambda d: damage_index(d, '{"metadata": {}}'),
    "config not an object": lambda d: damage_config(d, lambda c: [c]),
    "negative size": lambda d: damage_config(d, lambda c: c | {"hidden_size": -64}),
    "wrong type": lambda d: damage_config(d, lambda c: c | {"num_hidden_layers": "two"}),
    "no data_offsets": drop_data_offsets,
    "no tokenizer": lambda d: (d / "tokenizer.json").unlink() or "tokenizer.json",
}


@pytest.mark.parametrize("damage", DAMAGED_DIRECTORIES)
def test_damaged_directory_is_one_line_and_exit_2(st_dir, tmp_path, damage):
    fragment = DAMAGED_DIRECTORIES[damage](st_dir)
    before = digest(st_dir)
    assert_bad_input([st_dir, "-o", tmp_path / "out"], fragment)
    assert digest(st_dir) == before and not (tmp_path / "out").exists()
    assert staging_leftovers(tmp_path) == []


def test_damaged_gguf_is_one_line_and_exit_2(gguf_file, tmp_path):
    raw = gguf_file.read_bytes()
    variants = {
        "truncated.gguf": raw[: len(raw) * 2 // 3],
        "magic.gguf": b"GGUX" + raw[4:],
        "version.gguf": raw[:4] + struct.pack("<I", 99) + raw[8:],
        "counts.gguf": raw[:8] + struct.pack("<Q", 2**60) + raw[16:],  # tensor count
    }
    for name, content in variants.items():
        (tmp_path / name).write_bytes(content)
        assert_bad_input([tmp_path / name, "-o", tmp_path / "out"], name)
    no_vocabulary = tmp_path / "no-vocabulary.gguf"
    rewrite_gguf(gguf_file, no_vocabulary, keep_field=lambda n: n != "tokenizer.ggml.tokens")
    assert_bad_input([no_vocabulary, "-o", tmp_path / "out"], "tokenizer.ggml.tokens")
    layers = tmp_path / "layers.gguf"  # a flipped bit here once meant billions of layers
    rewrite_gguf(gguf_file, layers, values={"gemma3.block_count": 2**31 + 6})
    assert_bad_input([layers, "-o", tmp_path / "out"], "block_count = 2147483654", "6 layers")
    assert not (tmp_path / "out").exists() and staging_leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--shard-size-gb", "nan"], "--shard-size-gb"),
        (["--shard-size-gb", "-1"], "--shard-size-gb"),
        (["--shard-size-gb", "0"], "--shard-size-gb"),
        (["--shard-size-gb", "inf"], "--shard-size-gb"),
        (["--shard-size-gb", "lots"], "--shard-size-gb"),
        (["--requant-bits", "3"], "--requant-bits"),
        (["--no-such-option"], "--no-such-option"),
    ],
)
def test_argument_errors_are_one_line(gguf_file, tmp_path, argv, fragment):
    line = assert_bad_input([gguf_file, "-o", tmp_path / "out", *argv], fragment)
    assert "usage" not in line
    assert not (tmp_path / "out").exists()


def test_missing_output_argument_is_one_line(gguf_file):
    assert_bad_input([gguf_file], "-o")


def test_output_is_checked_before_the_source_is_read(tmp_path):
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF" + b"\xff" * 64)
    (tmp_path / "out").mkdir()
    assert_bad_input([damaged, "-o", tmp_path / "out"], "already exists")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    assert_bad_input([damaged, "-o", tmp_path / "notes", "--force"], "not written by gemma_mlx")


def test_report_into_a_missing_directory_fails_before_anything_is_written(gguf_file, tmp_path):
    out = tmp_path / "out"
    assert_bad_input([gguf_file, "-o", out, "--report", tmp_path / "nowhere" / "r.json"], "nowhere")
    assert not out.exists()
    (tmp_path / "r.json").write_text("an older report")
    assert_bad_input([gguf_file, "-o", out, "--report", tmp_path / "r.json"], "r.json", "--force")
    assert not out.exists() and (tmp_path / "r.json").read_text() == "an older report"
    assert_bad_input([gguf_file, "-o", out, "--report", out / "r.json"], "inside OUT")


def test_report_is_written_after_the_output(gguf_file, tmp_path):
    status, err = run_converter(gguf_file, "-o", tmp_path / "out", "--report", tmp_path / "r.json")
    assert status == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["output"] == str(tmp_path / "out")


def test_unexpected_error_is_one_line_with_a_hint(gguf_file, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something nobody expected\nover two lines")

    monkeypatch.setattr("gemma_mlx.convert.pipeline.ShardWriter.add", broken)
    status, err = run_converter(gguf_file, "-o", tmp_path / "out", "--no-progress")
    assert status == 1 and len(err.strip().splitlines()) == 1, err
    assert "RuntimeError: something nobody expected over two lines" in err and "--verbose" in err
    status, err = run_converter(gguf_file, "-o", tmp_path / "out", "--no-progress", "--verbose")
    assert status == 1 and "Traceback" in err
    assert not (tmp_path / "out").exists() and staging_leftovers(tmp_path) == []


# a full disk -----------------------------------------------------------------------------------


@pytest.fixture
def small_filesystem(tmp_path):
    """A 128 KiB tmpfs (needs root; skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_too_little_free_space_is_refused_before_converting(gguf_file, small_filesystem):
    out = small_filesystem / "out"
    assert_bad_input([gguf_file, "-o", out], "needs", "bytes", "free")
    assert list(small_filesystem.iterdir()) == []


def test_disk_full_during_conversion_leaves_nothing(gguf_file, small_filesystem, monkeypatch):
    # The disk fills up while we write (another process, say): the check beforehand passed.
    monkeypatch.setattr("gemma_mlx.convert.pipeline.check_free_space", lambda *a: None)
    out = small_filesystem / "out"
    assert_bad_input([gguf_file, "-o", out, "--no-progress"], str(small_filesystem))
    assert list(small_filesystem.iterdir()) == []
