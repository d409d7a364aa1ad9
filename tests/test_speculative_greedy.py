"""Greedy speculative decoding gives plain greedy's tokens, 600 tokens past a 32-token window.

Targets: dense (31B-like, k_eq_v), E-style (E2B-like: PLE, KV sharing) and MoE (26B-A4B-like), random
weights. Drafters: a random MTP assistant (dense and centroid heads) whose first m drafts of each
round are swapped for the right tokens, m uniform in 0..k, so every round keeps a different number
of drafts and the caches are trimmed by every amount from 0 to k; prompt lookup; and a perturbed
copy of the target (partial accepts of its own). The reference decodes one token per forward pass
with no trimming.
"""

from __future__ import annotations

import numpy as np
import pytest
from speculative_helpers import (
    PartlyRightDrafter,
    noisy_copy,
    plain_greedy,
    random_assistant,
    random_target,
)

from gemma_mlx.drafters import AssistantDrafter, ModelDrafter, PromptLookupDrafter
from gemma_mlx.speculative import SpeculationStats, speculative_tokens

LENGTH = 600


@pytest.fixture(scope="module", params=["31b", "e2b", "26b-a4b"])
def target_and_reference(request):
    target = random_target(request.param)
    prompt = np.random.default_rng(0).integers(1, target.args.vocab_size, 40).tolist()
    return target, prompt, plain_greedy(target, prompt, LENGTH)


def speculate(target, prompt, drafter, num_draft):
    stats = SpeculationStats()
    cache = target.make_cache(max_trim=8)
    steps = speculative_tokens(
        target, prompt, cache, drafter, num_draft=num_draft, max_tokens=LENGTH, stats=stats
    )
    return [step.token for step in steps], stats


def assert_same(got, expected):
    first = next((i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b), None)
    assert first is None, f"diverged at token {first}: {got[first]} != {expected[first]}"


@pytest.mark.parametrize("num_draft", range(1, 7))
def test_mtp_drafter(target_and_reference, num_draft):
    target, prompt, expected = target_and_reference
    assistant = random_assistant(target, centroids=16 * (num_draft % 2))
    drafter = PartlyRightDrafter(AssistantDrafter(assistant, target), len(prompt), expected)
    got, stats = speculate(target, prompt, drafter, num_draft)
    assert_same(got, expected)
    assert max(stats.draft_lengths) == num_draft
    # The loop keeps exactly the drafts that equal the target's argmax, no more, no fewer.
    assert stats.accepted == drafter.right
    assert stats.accepted_per_verify > 0.3 * num_draft


def test_prompt_lookup(target_and_reference):
    target, prompt, expected = target_and_reference
    got, stats = speculate(target, prompt, PromptLookupDrafter(), "auto")
    assert_same(got, expected)
    assert stats.accepted > 0


@pytest.mark.parametrize("target_and_reference", ["31b"], indirect=True)
def test_separate_draft_model(target_and_reference):
    """The draft model's own cache is rolled back too (its side does not depend on the target's
    structure, so the dense target suffices)."""
    target, prompt, expected = target_and_reference
    got, stats = speculate(target, prompt, ModelDrafter(noisy_copy(target, 0.1)), 3)
    assert_same(got, expected)
    # Partial accepts: some rounds keep everything, some keep a part, some nothing.
    assert 0.1 < stats.acceptance_rate < 0.95
