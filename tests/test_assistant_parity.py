"""The MLX drafter against transformers' `Gemma4AssistantForCausalLM` on tiny random configs."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from assistant_reference import assistant_config, save_assistant
from hf_reference import WINDOW
from mlx.utils import tree_flatten
from speculative_helpers import WINDOW as WINDOW_32
from speculative_helpers import random_assistant, random_target

from gemma_mlx.drafters import committed_kv
from gemma_mlx.loading import load_model
from gemma_mlx.models import gemma4_assistant
from gemma_mlx.models.gemma4_assistant import kv_producers

FULL_KEYS = 3 * WINDOW + 2  # the full layer sees every committed position
SLIDING_KEYS = WINDOW - 1  # a sliding layer sees the trailing window
POSITION = FULL_KEYS


@pytest.fixture(scope="module", params=[False, True], ids=["dense-head", "centroid-head"])
def drafter(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("assistant")
    torch_model = save_assistant(assistant_config(ordered=request.param), directory)
    return load_model(directory), torch_model


def random_inputs(seed: int):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    inputs = normal(1, 1, 2 * 64)
    shared = {
        "sliding_attention": (normal(1, 2, SLIDING_KEYS, 16), normal(1, 2, SLIDING_KEYS, 16)),
        "full_attention": (normal(1, 2, FULL_KEYS, 32), normal(1, 2, FULL_KEYS, 32)),
    }
    return inputs, shared


@torch.no_grad()
def reference(torch_model, inputs, shared):
    out = torch_model(
        inputs_embeds=torch.from_numpy(inputs),
        position_ids=torch.tensor([[POSITION]]),
        shared_kv_states={t: tuple(map(torch.from_numpy, kv)) for t, kv in shared.items()},
    )
    return out.logits[0, 0].numpy(), out.last_hidden_state[0, 0].numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_draft_step_matches_transformers(drafter, seed):
    model, torch_model = drafter
    inputs, shared = random_inputs(seed)
    logits, projected = reference(torch_model, inputs, shared)

    x = mx.array(inputs)
    kv = {t: (mx.array(k), mx.array(v)) for t, (k, v) in shared.items()}
    z, ours_projected = model(x[..., :64], x[..., 64:], kv, POSITION)
    ids, ours = model.head(z)

    np.testing.assert_allclose(np.array(ours_projected)[0, 0], projected, atol=1e-4)
    assert projected.std() > 0.1
    if ids is None:
        np.testing.assert_allclose(np.array(ours)[0, 0], logits, atol=1e-4)
        return
    # Centroid head: the same candidate set (every other token holds HF's fill value) and logits.
    ids, ours = np.array(ids)[0, 0], np.array(ours)[0, 0]
    filled = logits == logits.min()
    assert sorted(ids.tolist()) == sorted(np.flatnonzero(~filled).tolist())
    np.testing.assert_allclose(ours, logits[ids], atol=1e-4)
    assert int(ids[ours.argmax()]) == int(logits.argmax())


@pytest.mark.parametrize("dequantize", [False, True], ids=["kept-8bit", "expanded"])
def test_8bit_drafter_directory_drafts_like_the_float_one(tmp_path, dequantize):
    """A converted drafter stored 8-bit (mlx-lm's `quantization` entry) loads, kept quantized or
    expanded to float32, and its draft step matches the float drafter's within 8-bit rounding."""
    target = random_target("e2b")
    drafter = random_assistant(target, centroids=16)
    cache = target.make_cache()
    _, hidden = target(mx.arange(1, 41)[None], cache, return_hidden=True)
    shared = {
        t: committed_kv(cache[i], WINDOW_32 if target.args.is_sliding(i) else None)
        for t, i in kv_producers(target.args).items()
    }
    embedded = target.model.embed(mx.array([[7]]))

    def step(model):
        z, projected = model(embedded, hidden[:, -1:], shared, 40)
        return np.array(model.model.embed_tokens.as_linear(z)), np.array(projected)

    logits, projected = step(drafter)
    nn.quantize(drafter, group_size=32, bits=8)
    config = gemma4_assistant.config_for_target(
        target.args, hidden_size=32, num_hidden_layers=2, num_centroids=16,
        centroid_intermediate_top_k=4,
    )  # fmt: skip
    config["quantization"] = {"group_size": 32, "bits": 8, "mode": "affine"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(
        str(tmp_path / "model.safetensors"), dict(tree_flatten(drafter.parameters()))
    )

    loaded = load_model(tmp_path, dequantize=dequantize)
    kept = isinstance(loaded.pre_projection, nn.QuantizedLinear)
    assert kept == (not dequantize)
    ours_logits, ours_projected = step(loaded)
    for ours, theirs in ((ours_logits, logits), (ours_projected, projected)):
        np.testing.assert_allclose(ours, theirs, atol=0.1 * theirs.std())
        assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.999
    assert not np.allclose(ours_logits, logits, atol=1e-6)  # it did run quantized
