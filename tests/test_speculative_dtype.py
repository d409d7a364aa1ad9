"""The Mac-dtype lane at the real vocabulary: decoding with a 262,144-token model in bfloat16 and
float16 on the CPU (`dtype` in conftest.py; float32 is what every other speculative test runs).

A Mac computes in half precision, where arithmetic over a 262,144-entry row fails in ways float32
never shows: a bfloat16 running sum of probabilities stalls near 0.03 (an inverse CDF then returns
the last id), and bfloat16 log-probabilities `logits - logsumexp` round nearby logits of a flat row
to one value (an argmax then picks the lower id where the logits differ). The target is a tiny
random Gemma 4 (dense, k_eq_v, softcapped, tied head) with the real vocabulary; its rows are flat
(top probability ~2e-4), the hard case for both.

References: greedy decoding is the argmax of each step's logits (one token per forward pass, no
drafts); sampled tokens are checked against each step's distribution (softmax(logits / T) in
float64, or the plain sampler's filtered distribution) by a randomized probability integral
transform (u = P(X < t) + v P(X = t) is uniform on [0, 1) exactly when t is drawn from that
distribution, independently at every step), chi-square over 8 bins of u.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import MAC_DTYPES
from speculative_helpers import PartlyRightDrafter, plain_greedy, random_assistant, random_target

from gemma_mlx.decode import generate_tokens
from gemma_mlx.drafters import AssistantDrafter, PromptLookupDrafter
from gemma_mlx.sample import SamplingFilters, greedy, make_sampler
from gemma_mlx.speculative import SpeculationStats, speculative_tokens

VOCAB = 262_144
WINDOW = 8  # the sliding window wraps within the prompt
LENGTH = 40

pytestmark = pytest.mark.parametrize("dtype", MAC_DTYPES, indirect=True, scope="module")


@pytest.fixture(scope="module")
def target(dtype):
    model = random_target("31b", window=WINDOW, dtype=dtype, vocab_size=VOCAB)
    prompt = np.random.default_rng(0).integers(1, VOCAB, 24).tolist()
    return model, prompt, plain_greedy(model, prompt, LENGTH)


def first_difference(got: list[int], expected: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b), None)


def test_plain_greedy_is_the_argmax_of_the_logits(target):
    """The production loop (log-probabilities, then the greedy sampler) picks what the logits
    say; bfloat16 log-probabilities used to merge the top two of a flat row."""
    model, prompt, expected = target
    steps = generate_tokens(model, prompt, model.make_cache(), greedy, max_tokens=LENGTH)
    got = [step.token for step in steps]
    assert first_difference(got, expected) is None


@pytest.mark.parametrize("drafter", ["mtp", "prompt-lookup"])
def test_greedy_drafts_equal_plain_greedy(target, dtype, drafter):
    """A verify pass computes k + 1 rows at once; its tokens are still plain greedy's. (MTP: a
    random assistant whose first m drafts of each round are the right tokens, m uniform in 0..k,
    so windows are accepted in part and the caches trimmed by every amount.)"""
    model, prompt, expected = target
    if drafter == "mtp":
        assistant = AssistantDrafter(random_assistant(model, dtype=dtype), model)
        drafter = PartlyRightDrafter(assistant, len(prompt), expected)
    else:
        drafter = PromptLookupDrafter()
    stats = SpeculationStats()
    steps = speculative_tokens(
        model, prompt, model.make_cache(max_trim=4), drafter, num_draft=4, max_tokens=LENGTH,
        stats=stats,
    )  # fmt: skip
    got = [step.token for step in steps]
    assert first_difference(got, expected) is None
    assert stats.verify_steps > 0


def chi_square_p_value(counts: np.ndarray) -> float:
    """p-value of `counts` against equal expected counts."""
    expected = counts.sum() / len(counts)
    statistic = float(((counts - expected) ** 2 / expected).sum())
    dof = len(counts) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(statistic / 2)))


def transform(token: int, probs: np.ndarray, v: float) -> float:
    """Randomized PIT of `token` under the distribution `probs`."""
    return float(probs[:token].sum() + v * probs[token])


def target_distribution(logprobs: mx.array, options: dict) -> np.ndarray:
    """What the plain sampler draws from, in float64: softmax(logprobs / T); with filters, the
    plain sampler's own filtered distribution (`SamplingFilters`, whose top-k/top-p conventions
    define it), renormalized."""
    if set(options) == {"temperature"}:
        z = np.array(logprobs.astype(mx.float32), dtype=np.float64) / options["temperature"]
        p = np.exp(z - z.max())
    else:
        filters = SamplingFilters(
            options["temperature"], options["top_k"], options["top_p"], min_p=0.0
        )
        p = np.array(filters.distribution(logprobs[None])[0], dtype=np.float64)
    return p / p.sum()


def test_plain_sampling_follows_the_distribution_and_repeats(target):
    """The plain sampler over the whole vocabulary: its tokens follow softmax(logits / T), and a
    seed repeats them."""
    model, prompt, _ = target

    def sample(seed: int, tokens: int) -> list:
        sampler = make_sampler(0.8, seed=seed)
        return list(generate_tokens(model, prompt, model.make_cache(), sampler, max_tokens=tokens))

    steps = sample(seed=5, tokens=LENGTH)
    rng = np.random.default_rng(6)
    options = {"temperature": 0.8}
    u = [transform(s.token, target_distribution(s.logprobs, options), rng.random()) for s in steps]
    counts = np.histogram(u, bins=8, range=(0.0, 1.0))[0]
    assert chi_square_p_value(counts) > 1e-3, counts
    assert [s.token for s in sample(seed=5, tokens=10)] == [s.token for s in steps[:10]]


@pytest.mark.parametrize(
    "options",
    [{"temperature": 0.8}, {"temperature": 1.0, "top_k": 64, "top_p": 0.95}],
    ids=["temperature", "gemma4-filters"],
)
def test_sampled_drafts_follow_the_target_distribution(target, dtype, options):
    """Rejection sampling against a random MTP assistant's own sampled drafts: the emitted tokens
    (accepted drafts and resampled ones alike) follow the target's distribution, also with Gemma
    4's recommended filters. With bfloat16 probabilities the residual's running sum stalled and
    most resampled tokens were id 262143."""
    model, prompt, _ = target
    drafter = AssistantDrafter(random_assistant(model, dtype=dtype), model)
    mx.random.seed(7)
    steps = list(
        speculative_tokens(
            model, prompt, model.make_cache(max_trim=4), drafter, num_draft=3, max_tokens=LENGTH,
            **options,
        )
    )  # fmt: skip
    rng = np.random.default_rng(8)
    u = [transform(s.token, target_distribution(s.logprobs, options), rng.random()) for s in steps]
    counts = np.histogram(u, bins=8, range=(0.0, 1.0))[0]
    assert chi_square_p_value(counts) > 1e-3, counts
    assert sum(s.token == VOCAB - 1 for s in steps) <= 1
