"""Bad model directories fail with an error that names the key, file or tensor at fault."""

from __future__ import annotations

import json
import shutil
import struct

import mlx.core as mx
import pytest

from gemma_mlx.errors import ConfigError, WeightsError
from gemma_mlx.loading import load_model


@pytest.fixture
def checkpoint(reference_checkpoints, tmp_path):
    source, _ = reference_checkpoints("e2b")
    target = tmp_path / "model"
    shutil.copytree(source, target)
    return target


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_missing_key_is_named(checkpoint):
    edit_config(checkpoint, hidden_size=None)
    with pytest.raises(ConfigError, match="'hidden_size'"):
        load_model(checkpoint)


def test_unknown_model_type_is_named(checkpoint):
    edit_config(checkpoint, model_type="llama")
    with pytest.raises(ConfigError, match="unknown model_type 'llama'"):
        load_model(checkpoint)


def test_wrong_type_is_named(checkpoint):
    edit_config(checkpoint, num_kv_shared_layers="three")
    with pytest.raises(ConfigError, match="'num_kv_shared_layers' must be int"):
        load_model(checkpoint)


def test_config_contradicting_weights_names_tensor(checkpoint):
    edit_config(checkpoint, intermediate_size=100)
    with pytest.raises(
        WeightsError,
        match=r"mlp\.(gate|up)_proj\.weight' has shape \(\d+, 64\), config.json implies",
    ):
        load_model(checkpoint)


def test_missing_tensor_is_named(checkpoint):
    path = checkpoint / "model.safetensors"
    weights = mx.load(str(path))
    del weights["model.layers.2.self_attn.o_proj.weight"]
    mx.save_safetensors(str(path), weights)
    with pytest.raises(WeightsError, match=r"model\.layers\.2\.self_attn\.o_proj\.weight"):
        load_model(checkpoint)


def test_truncated_weights_name_the_file(checkpoint):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"model\.safetensors: truncated"):
        load_model(checkpoint)


def test_invalid_json_is_named(checkpoint):
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        load_model(checkpoint)


def test_missing_directory(tmp_path):
    with pytest.raises(WeightsError, match="model directory not found"):
        load_model(tmp_path / "nowhere")


def test_features_never_switched_on_by_default(checkpoint):
    """A config without the PLE key gets no PLE (transformers would default it to 256)."""
    edit_config(checkpoint, hidden_size_per_layer_input=None)
    with pytest.raises(WeightsError, match="embed_tokens_per_layer"):
        load_model(checkpoint)


def test_per_layer_config_serialization_is_accepted(reference_checkpoints, checkpoint):
    """transformers >= 5.2x writes per_layer_config; Google's configs write global_head_dim."""
    config = json.loads((checkpoint / "config.json").read_text())
    assert "per_layer_config" in config
    full = [i for i, t in enumerate(config["layer_types"]) if t == "full_attention"]
    edit_config(checkpoint, per_layer_config=None, global_head_dim=32)
    model = load_model(checkpoint)
    assert all(model.layers[i].self_attn.head_dim == 32 for i in full)


# Damaged directories found by a hostile test: each is named, never a KeyError or TypeError.


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    from tiny_chat_model import write_model

    return write_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def tiny(tiny_source, tmp_path):
    target = tmp_path / "tiny"
    shutil.copytree(tiny_source, target)
    return target


def rewrite_header(path, change):
    """Apply `change` to the JSON header of the safetensors file `path`, keeping its data."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    change(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])


def first_tensor(header):
    return header[next(k for k in header if k != "__metadata__")]


def set_config(**changes):
    def change(directory):
        edit_config(directory, **changes)

    return change


DAMAGED = {
    "index not JSON": (
        lambda d: (d / "model.safetensors.index.json").write_text("{bad"),
        WeightsError, r"model\.safetensors\.index\.json: not valid JSON",
    ),
    "index without weight_map": (
        lambda d: (d / "model.safetensors.index.json").write_text('{"metadata": {}}'),
        WeightsError, r"index\.json: no valid 'weight_map'",
    ),
    "index weight_map outside the directory": (
        lambda d: (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"a": "../model.safetensors"}})
        ),
        WeightsError, "no valid 'weight_map'",
    ),
    "config is a list": (
        lambda d: (d / "config.json").write_text("[1, 2]"),
        ConfigError, r"config\.json: expected a JSON object, got list",
    ),
    "config not UTF-8": (
        lambda d: (d / "config.json").write_bytes(b'{"model_type": "\xff"}'),
        ConfigError, r"config\.json: not valid JSON",
    ),
    "negative hidden size": (
        set_config(hidden_size=-64), ConfigError, r"'hidden_size' = -64 must be in 1\.\.",
    ),
    "zero attention heads": (
        set_config(num_attention_heads=0), ConfigError, "'num_attention_heads' = 0",
    ),
    "vocabulary beyond 32-bit indices": (
        set_config(vocab_size=2**40), ConfigError, "'vocab_size' = 1099511627776",
    ),
    "negative query scale": (
        set_config(query_pre_attn_scalar=-16), ConfigError, "'query_pre_attn_scalar' = -16",
    ),
    "unknown dtype": (
        set_config(torch_dtype="float8"), ConfigError, "'torch_dtype' = 'float8' is not one of",
    ),
    "rope_scaling not an object": (
        set_config(rope_scaling="linear"), ConfigError, r"config\.json: does not describe a model",
    ),
    "header entry without data_offsets": (
        lambda d: rewrite_header(d / "model.safetensors", lambda h: first_tensor(h).pop("data_offsets")),
        WeightsError, r"model\.safetensors: corrupt safetensors header entry for tensor",
    ),
    "header entry not an object": (
        lambda d: rewrite_header(
            d / "model.safetensors", lambda h: h.update(dict.fromkeys(h, 5))
        ),
        WeightsError, "corrupt safetensors header entry",
    ),
    "header is a list": (
        lambda d: (d / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"[]"),
        WeightsError, r"corrupt safetensors header \(not a JSON object\)",
    ),
    "reversed data offsets": (
        lambda d: rewrite_header(
            d / "model.safetensors", lambda h: first_tensor(h).update(data_offsets=[8, 0])
        ),
        WeightsError, "corrupt safetensors header entry",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(DAMAGED))
def test_damaged_directory_is_named(tiny, name):
    damage, error, message = DAMAGED[name]
    damage(tiny)
    with pytest.raises(error, match=message):
        load_model(tiny)


@pytest.mark.parametrize(
    "name, content",
    [("tokenizer_config.json", "[]"), ("generation_config.json", "[1]"),
     ("chat_template.jinja", b"\xff{{ x }}")],
)  # fmt: skip
def test_damaged_tokenizer_files_are_named(tiny, name, content):
    from gemma_mlx.tokenizer import TokenizerError, load_tokenizer

    path = tiny / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TokenizerError, match=name.replace(".", r"\.")):
        load_tokenizer(tiny)


def test_bad_dtype_argument_is_an_option_error(tiny):
    from gemma_mlx.errors import OptionError

    with pytest.raises(OptionError, match="dtype must be one of float32, float16, bfloat16"):
        load_model(tiny, dtype="float64")
