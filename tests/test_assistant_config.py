"""Drafter configs and drafter/target mismatches fail with errors that name the problem."""

from __future__ import annotations

import pytest
from speculative_helpers import random_assistant, random_target

from gemma_mlx.drafters import AssistantDrafter, make_drafter
from gemma_mlx.errors import ConfigError, WeightsError
from gemma_mlx.models import gemma4_assistant


@pytest.fixture(scope="module")
def target():
    return random_target("e2b")


def config(target, **text_overrides) -> dict:
    base = gemma4_assistant.config_for_target(target.args, hidden_size=32, num_hidden_layers=2)
    base["text_config"].update(text_overrides)
    return base


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (
            {"hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 512},
            "hidden_size_per_layer_input",
        ),
        ({"use_double_wide_mlp": True}, "use_double_wide_mlp"),
        (
            {
                "enable_moe_block": True,
                "num_experts": 4,
                "top_k_experts": 2,
                "moe_intermediate_size": 8,
            },
            "enable_moe_block",
        ),
    ],
)
def test_drafter_config_rejects_target_only_features(target, override, key):
    with pytest.raises(ConfigError, match=key):
        gemma4_assistant.ModelArgs.from_dict(config(target, **override))


def test_centroid_head_must_tile_the_vocabulary(target):
    bad = config(target) | {
        "use_ordered_embeddings": True,
        "num_centroids": 7,
        "centroid_intermediate_top_k": 2,
    }
    with pytest.raises(ConfigError, match="num_centroids"):
        gemma4_assistant.ModelArgs.from_dict(bad)


def test_drafter_for_another_target_is_refused(target):
    other = random_target("31b")  # hidden 64 too, but other KV heads on its layers
    with pytest.raises(ValueError, match="head_dim/KV heads"):
        AssistantDrafter(random_assistant(other), target)


def test_missing_draft_model_names_the_path(target, tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        make_drafter(tmp_path / "nowhere", target)
    assert make_drafter("auto", target, tmp_path / "model") is None  # nothing beside it
