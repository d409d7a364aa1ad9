"""Samplers against the analytically filtered distribution; processors against numpy."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from gemma_mlx.sample import (
    OptionError,
    make_logit_bias,
    make_logits_processors,
    make_repetition_penalty,
    make_sampler,
)

LOGITS = np.array([2.0, 1.3, 0.9, 0.5, 0.1, -0.4, -1.0, -2.2], dtype=np.float32)
SAMPLES = 40_000


def filtered_distribution(logits, temp, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """transformers' order, by definition: temperature, top-k, top-p (on the renormalised top-k),
    min-p (relative to the most likely token)."""
    p = np.exp(logits / temp - np.max(logits / temp))
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.ones_like(p, dtype=bool)
    if top_k:
        keep[order[top_k:]] = False
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    if top_p < 1:
        mass_before = 0.0
        for i in order:
            if keep[i]:
                keep[i] = mass_before < top_p
                mass_before += q[i]
    if min_p:
        keep &= p >= min_p * p.max()
    r = np.where(keep, p, 0.0)
    return r / r.sum()


def draw(sampler, logits: np.ndarray, n: int) -> np.ndarray:
    logprobs = mx.array(logits) - mx.logsumexp(mx.array(logits))
    tokens = sampler(mx.broadcast_to(logprobs, (n, logits.size)))
    return np.bincount(np.array(tokens), minlength=logits.size)


def chi_square_p_value(counts: np.ndarray, expected_p: np.ndarray) -> float:
    support = expected_p > 0
    expected = expected_p[support] * counts.sum()
    stat = float((((counts[support] - expected) ** 2) / expected).sum())
    dof = int(support.sum()) - 1
    if dof == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0)))


SETTINGS = [
    dict(temp=1.0),
    dict(temp=0.7),
    dict(temp=1.5, top_k=3),
    dict(temp=1.0, top_p=0.8),
    dict(temp=0.8, top_p=0.5),
    dict(temp=1.0, min_p=0.2),
    dict(temp=1.3, top_k=5, top_p=0.9),
    dict(temp=1.2, top_k=6, top_p=0.85, min_p=0.1),
]


@pytest.mark.parametrize(
    "settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items())
)
def test_sampling_matches_filtered_distribution(settings):
    expected = filtered_distribution(LOGITS, **settings)
    counts = draw(make_sampler(**settings, seed=7), LOGITS, SAMPLES)
    assert counts[expected == 0].sum() == 0, "a filtered-out token was sampled"
    assert chi_square_p_value(counts, expected) > 1e-3


@pytest.mark.parametrize("settings", SETTINGS[2:], ids=str)
def test_distribution_is_the_filtered_distribution(settings):
    logprobs = mx.array(LOGITS) - mx.logsumexp(mx.array(LOGITS))
    got = make_sampler(**settings).distribution(logprobs[None])[0]
    np.testing.assert_allclose(np.array(got), filtered_distribution(LOGITS, **settings), atol=1e-6)


def test_chi_square_detects_a_wrong_distribution():
    """The test above has power: unfiltered samples do not pass for the top-k distribution."""
    unfiltered = draw(make_sampler(temp=1.5, seed=7), LOGITS, SAMPLES)
    assert unfiltered[filtered_distribution(LOGITS, temp=1.5, top_k=3) == 0].sum() > 0
    biased = draw(make_sampler(temp=1.0, seed=7), LOGITS, SAMPLES)
    assert chi_square_p_value(biased, filtered_distribution(LOGITS, temp=0.7)) < 1e-6


def test_seeded_sampling_is_reproducible():
    logits = mx.random.normal((1, 300), key=mx.random.key(1))
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def run(seed):
        sampler = make_sampler(temp=1.0, top_p=0.95, seed=seed)
        return [int(sampler(logprobs)[0]) for _ in range(50)]

    first = run(3)
    mx.random.normal((10,))  # global random state moves on: the seeded sampler must not care
    assert run(3) == first
    assert run(4) != first


def test_temperature_zero_is_argmax():
    logprobs = mx.random.normal((5, 100), key=mx.random.key(2))
    np.testing.assert_array_equal(
        np.array(make_sampler(0.0)(logprobs)), np.argmax(np.array(logprobs), axis=-1)
    )


def test_repetition_penalty_matches_definition():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 50)).astype(np.float32)
    history = [3, 7, 7, 11, 40, 2, 49]
    got = make_repetition_penalty(1.3, context_size=4)(mx.array(history), mx.array(logits))
    want = logits.copy()
    for t in set(history[-4:]):
        want[0, t] = want[0, t] * 1.3 if want[0, t] < 0 else want[0, t] / 1.3
    np.testing.assert_allclose(np.array(got), want, rtol=1e-6)


def test_logit_bias_adds_to_the_named_tokens():
    logits = np.zeros((1, 10), dtype=np.float32)
    got = make_logit_bias({2: 5.0, 7: -3.0})(mx.array([]), mx.array(logits))
    want = logits.copy()
    want[0, 2], want[0, 7] = 5.0, -3.0
    np.testing.assert_array_equal(np.array(got), want)


@pytest.mark.parametrize(
    "options, name",
    [
        (dict(temp=-1.0), "temperature"),
        (dict(temp=1.0, top_p=1.5), "top-p"),
        (dict(temp=1.0, min_p=1.0), "min-p"),
        (dict(temp=1.0, top_k=-2), "top-k"),
    ],
)
def test_invalid_sampling_options_name_the_option(options, name):
    with pytest.raises(OptionError, match=name):
        make_sampler(**options)


def test_invalid_processor_options_name_the_option():
    with pytest.raises(OptionError, match="repetition penalty"):
        make_logits_processors(repetition_penalty=0.0)
    with pytest.raises(OptionError, match="outside the vocabulary"):
        make_logits_processors(logit_bias={600: 1.0}, vocab_size=512)
