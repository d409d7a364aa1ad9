"""The drafters' pieces against brute force: shared K/V after trims, prompt lookup, draft length."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from gemma_mlx.cache import KVCache, RotatingKVCache
from gemma_mlx.drafters import PromptLookupDrafter, committed_kv
from gemma_mlx.speculative import AdaptiveDraftLength, DraftContext

WINDOW, MAX_TRIM = 8, 4


@pytest.mark.parametrize("make", [KVCache, lambda: RotatingKVCache(WINDOW, MAX_TRIM)])
def test_committed_kv_is_the_visible_window_after_trims(make):
    """Feed chunks, trim random amounts (past the wrap too); the drafter's K/V are always exactly
    the positions a query at `offset` attends, with the values written there last."""
    rng = np.random.default_rng(0)
    cache, history = make(), []  # history[i] = key written at position i (the live one)
    window = WINDOW if isinstance(cache, RotatingKVCache) else None
    for _ in range(60):
        n = int(rng.integers(1, 6))
        keys = rng.standard_normal((1, 1, n, 2)).astype(np.float32)
        cache.update_and_fetch(mx.array(keys), mx.array(keys))
        history = history[: cache.offset - n] + list(keys[0, 0])
        trim = int(rng.integers(0, min(MAX_TRIM, n) + 1))
        cache.trim(trim)
        history = history[: cache.offset]
        k, v = committed_kv(cache, window)
        first = 0 if window is None else max(0, cache.offset - window + 1)
        np.testing.assert_array_equal(np.array(k)[0, 0], np.array(history[first:]))
        np.testing.assert_array_equal(np.array(v), np.array(k))


def lookup_reference(tokens: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """Brute force: latest earlier occurrence of the longest matching suffix, continued periodically."""
    for n in range(max_ngram, 0, -1):
        suffix = tokens[-n:]
        for end in range(len(tokens) - 2, n - 2, -1):
            if tokens[end + 1 - n : end + 1] == suffix:
                out = list(tokens)
                for i in range(k):
                    out.append(out[end + 1 + i])
                return out[len(tokens) :]
    return []


def test_prompt_lookup_matches_brute_force():
    rng = np.random.default_rng(1)
    drafter = PromptLookupDrafter()
    tokens = rng.integers(0, 6, 30).tolist()
    context = DraftContext(None, [], tokens, None, None)
    drafter.prefill(context)
    for _ in range(200):
        k = int(rng.integers(1, 7))
        proposal = drafter.propose(context, k).tokens.tolist()
        assert proposal == lookup_reference(tokens, k)
        tokens.extend(rng.integers(0, 6, int(rng.integers(1, 4))).tolist())


def simulate(
    controller: AdaptiveDraftLength,
    alpha: float,
    a: float,
    b: float,
    rounds: int = 300,
    noise: float = 0.0,
    step: float | None = None,
):
    """Feed the controller rounds of a synthetic drafter; returns the draft lengths it chose.

    A round with k drafts costs a + b k, a plain step (k = 0) `step` where given (else a).
    `noise`: each round's time is multiplied by a log-normal factor of that sigma (a busy CPU)."""
    rng = np.random.default_rng(2)
    chosen = []
    for _ in range(rounds):
        k = controller.choose()
        accepted = 0
        while accepted < k and rng.random() < alpha:
            accepted += 1
        cost = step if k == 0 and step is not None else a + b * k
        controller.observe(k, accepted, cost * rng.lognormal(0.0, noise))
        chosen.append(k)
    return chosen


def speed(k: int, alpha: float, a: float, b: float, step: float | None = None) -> float:
    cost = step if k == 0 and step is not None else a + b * k
    return (1 - alpha ** (k + 1)) / (1 - alpha) / cost


@pytest.mark.parametrize(
    ("alpha", "b"), [(0.9, 0.05), (0.7, 0.1), (0.5, 0.3), (0.05, 0.5), (0.3, 1.0)]
)
def test_adaptive_draft_length_finds_the_fastest(alpha, b):
    controller = AdaptiveDraftLength(max_draft=8)
    chosen = simulate(controller, alpha, 1.0, b)
    best = max(range(9), key=lambda k: speed(k, alpha, 1.0, b))
    # After warm-up its rounds run within a few percent of the best fixed draft length
    # (probes and the noise of a ~20-round acceptance estimate included).
    late = chosen[100:]
    achieved = np.mean([speed(k, alpha, 1.0, b) for k in late])
    assert achieved > 0.95 * speed(best, alpha, 1.0, b)
    if best == 0:  # speculation off: the probes back off
        assert np.mean(np.array(late) == 0) > 0.95


def test_adaptive_draft_length_keeps_poor_drafts_short_on_a_noisy_clock():
    """With drafts rarely accepted, timing noise must not make long rounds look free."""
    alpha, b = 0.15, 0.2
    chosen = simulate(AdaptiveDraftLength(max_draft=8), alpha, 1.0, b, rounds=400, noise=1.0)
    late = chosen[100:]
    achieved = np.mean([speed(k, alpha, 1.0, b) for k in late])
    assert achieved > 0.95 * max(speed(k, alpha, 1.0, b) for k in range(9))
    assert max(late) <= 3


@pytest.mark.parametrize(("alpha", "b"), [(0.85, 0.08), (0.5, 0.08), (0.25, 0.4)])
def test_adaptive_draft_length_when_a_verify_costs_more_than_a_step(alpha, b):
    """On the CPU backend a plain step is a one-row product and a verify a few-row one: a verify
    costs ~1.7 steps, then little per draft. The controller must not read the step's cost off
    the verify rounds' line, so its first round is a plain step; then long drafts pay with good
    drafts, none with poor ones."""
    a, step = 1.7, 1.0
    chosen = simulate(AdaptiveDraftLength(max_draft=8), alpha, a, b, rounds=400, step=step)
    assert chosen[0] == 0, "the plain step's cost is measured, not extrapolated"
    late = chosen[100:]
    best = max(range(9), key=lambda k: speed(k, alpha, a, b, step))
    achieved = np.mean([speed(k, alpha, a, b, step) for k in late])
    assert achieved > 0.95 * speed(best, alpha, a, b, step), (best, np.bincount(late))
