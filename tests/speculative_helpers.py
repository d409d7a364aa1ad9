"""Tiny random targets and drafters (MLX-initialized) for the speculative decoding tests."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from hf_reference import VARIANTS
from mlx.utils import tree_map

from gemma_mlx.models import gemma4_assistant, get_model_classes
from gemma_mlx.speculative import DraftContext, Drafter, Proposal

WINDOW = 32  # the acceptance criterion's sliding window


def random_target(
    variant: str, seed: int = 0, window: int = WINDOW, dtype: str = "float32", **overrides
) -> nn.Module:
    """A random MLX model with the structure of `hf_reference.VARIANTS[variant]` (text config
    keys in `overrides` replaced), computing in `dtype` like `gemma_mlx.load(..., dtype=dtype)`."""
    config = VARIANTS[variant]().to_dict()
    text = config.get("text_config") or config
    text.update(sliding_window=window, **overrides)
    model_class, args_class = get_model_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    cast(model, dtype)
    return model


def cast(model: nn.Module, dtype: str) -> None:
    """Every floating parameter to `dtype`, as the loader casts a checkpoint."""
    wanted = getattr(mx, dtype)
    model.update(
        tree_map(
            lambda w: w.astype(wanted) if mx.issubdtype(w.dtype, mx.floating) else w,
            model.parameters(),
        )
    )
    mx.eval(model.parameters())


def random_assistant(
    target: nn.Module, seed: int = 1, centroids: int = 0, dtype: str = "float32"
) -> gemma4_assistant.Model:
    config = gemma4_assistant.config_for_target(
        target.args,
        hidden_size=32,
        num_hidden_layers=2,
        num_centroids=centroids,
        centroid_intermediate_top_k=4,
    )
    mx.random.seed(seed)
    model = gemma4_assistant.Model(gemma4_assistant.ModelArgs.from_dict(config))
    if centroids:
        ordering = mx.random.permutation(target.args.vocab_size).astype(mx.int32)
        model.masked_embedding.token_ordering = ordering
    cast(model, dtype)
    return model


def noisy_copy(target: nn.Module, scale: float, seed: int = 2) -> nn.Module:
    """The target with every weight perturbed: a draft model that agrees often, not always."""
    mx.random.seed(seed)
    draft = type(target)(target.args)
    draft.update(
        tree_map(lambda w: w + scale * mx.random.normal(w.shape) * w.std(), target.parameters())
    )
    mx.eval(draft.parameters())
    return draft


def plain_greedy(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    """Reference: one token per forward pass, no drafting, no trimming."""
    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache)[0, -1]
    out = []
    for _ in range(n):
        out.append(int(mx.argmax(logits)))
        logits = model(mx.array([[out[-1]]]), cache)[0, -1]
    return out


class PartlyRightDrafter:
    """Wraps a drafter: each round its first m drafts (m uniform in 0..k) are replaced by the
    reference continuation, so rounds keep every count of drafts from 0 to k and the caches are
    trimmed by every amount. `right` counts the leading drafts that equal the reference: exactly
    what greedy verification must accept."""

    def __init__(self, inner: Drafter, prompt_length: int, reference: list[int], seed: int = 0):
        self.inner = inner
        self.prompt_length = prompt_length
        self.reference = reference
        self.rng = np.random.default_rng(seed)
        self.right = 0

    def prefill(self, context: DraftContext) -> None:
        self.inner.prefill(context)

    def propose(self, context: DraftContext, k: int) -> Proposal:
        drafts = self.inner.propose(context, k).tokens.tolist()
        done = len(context.tokens) - self.prompt_length
        expected = self.reference[done : done + len(drafts)]
        m = int(self.rng.integers(0, len(drafts) + 1))
        drafts = expected[:m] + drafts[m:]
        self.right += next(
            (i for i, (a, b) in enumerate(zip(drafts, expected, strict=True)) if a != b),
            len(drafts),
        )
        return Proposal(mx.array(drafts, mx.int32))

    def commit(self, context: DraftContext, k: int, accepted: int) -> None:
        self.inner.commit(context, k, accepted)
