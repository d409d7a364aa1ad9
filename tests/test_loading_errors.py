"""Bad model directories fail with an error that names the key, file or tensor at fault."""

from __future__ import annotations

import json
import shutil

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
