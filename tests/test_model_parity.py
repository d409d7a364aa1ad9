"""Our forward pass against transformers' (torch, float32) on tiny random configs of every variant."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hf_reference import VARIANTS, VOCAB, WINDOW, reference_logits

from gemma_mlx.loading import load_model

# 3x past the sliding window, so sliding masks and full layers both matter.
PROMPT_LENGTH = 3 * WINDOW + 6


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(reference_checkpoints, variant):
    directory, torch_model = reference_checkpoints(variant)
    tokens = np.random.default_rng(1).integers(1, VOCAB, PROMPT_LENGTH).tolist()
    expected = reference_logits(torch_model, tokens)

    model = load_model(directory)
    ours = np.array(model(mx.array([tokens]))[0])

    assert ours.shape == expected.shape
    assert np.abs(ours[-1] - expected[-1]).max() <= 1e-4
    assert np.abs(ours - expected).max() <= 1e-3
    # The comparison has teeth: the logits are far from constant.
    assert expected.std() > 0.1


@pytest.mark.parametrize("variant", ["e2b", "e4b"])
def test_kv_shared_layers_skip_prompt_positions(reference_checkpoints, variant):
    """logits_to_keep=1 runs only the last position through the KV-shared layers, same logits."""
    directory, torch_model = reference_checkpoints(variant)
    tokens = np.random.default_rng(2).integers(1, VOCAB, PROMPT_LENGTH).tolist()
    model = load_model(directory)
    last = np.array(model(mx.array([tokens]), logits_to_keep=1)[0])
    assert last.shape == (1, VOCAB)
    np.testing.assert_allclose(last[0], reference_logits(torch_model, tokens)[-1], atol=1e-4)
