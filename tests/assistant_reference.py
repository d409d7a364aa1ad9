"""Tiny random Gemma 4 assistant (MTP drafter) checkpoints written by transformers (torch).

transformers 5.23's `Gemma4TextConfig.kv_sharing_modes` raises when every layer is KV-shared, which
is every assistant; `all_layers_shared_fix` patches that property for the test session only (all
layers "reuse"), which is what the config means and what 5.13 did.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from hf_reference import VOCAB, WINDOW, F, S, _gemma4_text, _perturb
from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM
from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig

NUM_CENTROIDS = 16  # 32 tokens per cluster over the 512-token test vocabulary


@contextlib.contextmanager
def all_layers_shared_fix():
    original = Gemma4TextConfig.kv_sharing_modes

    def modes(self):
        if self.num_kv_shared_layers == self.num_hidden_layers:
            return ["reuse"] * self.num_hidden_layers
        return original.fget(self)

    Gemma4TextConfig.kv_sharing_modes = property(modes)
    try:
        yield
    finally:
        Gemma4TextConfig.kv_sharing_modes = original


def assistant_config(
    backbone_hidden: int = 64,
    head_dim: int = 16,
    global_head_dim: int = 32,
    num_kv_heads: int = 2,
    rope_parameters: dict | None = None,
    sliding_window: int = WINDOW,
    ordered: bool = False,
) -> Gemma4AssistantConfig:
    """A 3-layer drafter (sliding, sliding, full) matching a target's head dims and KV heads."""
    text = _gemma4_text(
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        global_head_dim=global_head_dim,
        sliding_window=sliding_window,
        layer_types=[S, S, F],
        vocab_size_per_layer_input=0,
    )
    if rope_parameters is not None:
        text["rope_parameters"] = rope_parameters
    extra = dict(
        use_ordered_embeddings=True, num_centroids=NUM_CENTROIDS, centroid_intermediate_top_k=4
    )
    return Gemma4AssistantConfig(
        text_config=text, backbone_hidden_size=backbone_hidden, **(extra if ordered else {})
    )


def save_assistant(config: Gemma4AssistantConfig, directory: Path, seed: int = 0):
    """Random float32 drafter saved to `directory`; returns the torch model in eval mode."""
    torch.manual_seed(seed)
    with all_layers_shared_fix():
        model = Gemma4AssistantForCausalLM(config).to(torch.float32)
    _perturb(model, seed)
    if config.use_ordered_embeddings:
        g = torch.Generator().manual_seed(seed)
        model.masked_embedding.token_ordering.copy_(torch.randperm(VOCAB, generator=g))
    model.eval()
    with all_layers_shared_fix():
        model.save_pretrained(directory, safe_serialization=True)
    return model
