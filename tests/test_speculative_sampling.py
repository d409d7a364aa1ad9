"""Rejection sampling keeps the target's distribution (chi-square over many rounds, 8 tokens)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from speculative_helpers import random_target

from gemma_mlx.drafters import ModelDrafter
from gemma_mlx.kernels.verify import verify_sampling_reference as verify_sampling
from gemma_mlx.speculative import SpeculationStats, speculative_tokens

V, K, RUNS = 8, 3, 40_000


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    statistic = float(((counts - expected) ** 2 / expected).sum())
    dof = len(counts) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(statistic / 2)))


@pytest.fixture(scope="module")
def distributions():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(V, 0.7), K + 1).astype(np.float32)
    q = rng.dirichlet(np.full(V, 0.7), K).astype(np.float32)
    return p, q


def run_rounds(p: np.ndarray, q: np.ndarray | None, drafts: np.ndarray, seed: int):
    """(accepted, next token) of RUNS independent rounds; drafts [RUNS, K]."""
    uniforms = np.random.default_rng(seed).random((RUNS, K + 1)).astype(np.float32)
    q_mx = None if q is None else mx.array(q)
    rounds = mx.vmap(lambda d, u: verify_sampling(mx.array(p), q_mx, d, u))
    n, token = rounds(mx.array(drafts.astype(np.int32)), mx.array(uniforms))
    return np.array(n), np.array(token)


def emitted(drafts: np.ndarray, n: np.ndarray, token: np.ndarray, index: int) -> np.ndarray:
    """Token number `index` of each round's output (drafts[:n] then the next token)."""
    return np.where(n > index, drafts[:, min(index, K - 1)], token)


def assert_follows_target(p: np.ndarray, drafts, n, token) -> np.ndarray:
    """First output token ~ p[0]; among rounds that kept d1, the second ~ p[1] (this target's
    conditionals do not depend on the prefix). Returns the first tokens' counts."""
    first = np.bincount(emitted(drafts, n, token, 0), minlength=V)
    assert chi_square_p_value(first, p[0]) > 1e-3
    kept = n >= 1
    second = np.bincount(emitted(drafts[kept], n[kept], token[kept], 1), minlength=V)
    assert chi_square_p_value(second, p[1]) > 1e-3
    return first


def assert_acceptance(n: np.ndarray, expected: float) -> None:
    observed = (n >= 1).mean()
    assert abs(observed - expected) < 4 * np.sqrt(expected * (1 - expected) / RUNS)


def test_sampled_drafts_keep_target_distribution(distributions):
    p, q = distributions
    rng = np.random.default_rng(1)
    drafts = np.stack([rng.choice(V, RUNS, p=q[i] / q[i].sum()) for i in range(K)], axis=1)
    n, token = run_rounds(p, q, drafts, seed=2)
    first = assert_follows_target(p, drafts, n, token)
    assert_acceptance(n, np.minimum(p[0], q[0]).sum())  # Leviathan et al.'s acceptance rate
    # The test can tell distributions apart: the draft distribution itself is rejected.
    assert chi_square_p_value(first, q[0]) < 1e-6


def test_deterministic_drafts_keep_target_distribution(distributions):
    """One-hot drafts (prompt lookup, greedy drafting): accept d with probability p(d)."""
    p, _ = distributions
    drafts = np.tile(np.array([[3, 1, 6]]), (RUNS, 1))
    n, token = run_rounds(p, None, drafts, seed=3)
    assert_follows_target(p, drafts, n, token)
    assert_acceptance(n, p[0][3])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_target_drafting_for_itself_is_always_accepted(temperature):
    """q = p exactly when the draft model is the target: every draft is accepted, also when
    sampling, so the loop pairs each draft with the right rows of p and q."""
    target = random_target("31b")
    prompt = np.random.default_rng(4).integers(1, target.args.vocab_size, 20).tolist()
    stats = SpeculationStats()
    mx.random.seed(5)
    steps = speculative_tokens(
        target, prompt, target.make_cache(), ModelDrafter(target), num_draft=4,
        temperature=temperature, max_tokens=120, stats=stats,
    )  # fmt: skip
    tokens = [step.token for step in steps]
    assert len(tokens) == 120
    assert stats.acceptance_rate > 0.97


def test_seeded_drafting_repeats_whatever_else_draws():
    """A seed fixes the whole drafted run (draft choices, acceptance uniforms, resamples): the
    loop draws from the sampler's own stream, not from the global generator others also use."""
    target = random_target("31b")
    prompt = np.random.default_rng(6).integers(1, target.args.vocab_size, 12).tolist()

    def run(seed: int, global_seed: int) -> list[int]:
        mx.random.seed(global_seed)
        steps = speculative_tokens(
            target, prompt, target.make_cache(), ModelDrafter(target), num_draft=3,
            temperature=1.0, top_k=20, seed=seed, max_tokens=30,
        )  # fmt: skip
        return [step.token for step in steps]

    first = run(seed=11, global_seed=1)
    assert run(seed=11, global_seed=2) == first
    assert run(seed=12, global_seed=1) != first
