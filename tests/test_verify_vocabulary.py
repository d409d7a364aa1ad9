"""Rejection-sampling verify at the real vocabulary (262,144 entries) with probabilities in
bfloat16, float16 and float32, as a Mac's model dtype would give them: the first token a round
emits follows the float64 distribution of the round's inputs (chi-square), and each round is
correct to float32 rounding (its token lies in the float64 inverse-CDF bracket of its uniform),
with no draft (K = 0) and after drafts that are usually rejected (one-hot and sampled), on a
peaked and a flat row.

A cumulative sum in bfloat16 stalls long before it reaches 1 over 262k entries: the sampled id
then clamped to V - 1 (p = 0.07 on the peaked row, 0.8-0.9 on the flat one)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_speculative_sampling import chi_square_p_value

from gemma_mlx.kernels.verify import reference_cdf_slack, round_problem, verify_sampling_reference

V, K = 262_144, 3
DRAWS, CHECKED, MIN_EXPECTED = 150, 50, 5  # rounds drawn, rounds checked one by one
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


def logits_row(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Peaked: 20 random ids hold ~93% of the mass; flat: standard normal logits."""
    x = rng.standard_normal(V)
    if kind == "peaked":
        x[rng.choice(V, 20, replace=False)] += 12.0
    return x


def probabilities(logits: np.ndarray, dtype: mx.Dtype) -> mx.array:
    """softmax in float32, then the model dtype (what a bfloat16 model's softmax gives)."""
    return mx.softmax(mx.array(logits, mx.float32), axis=-1).astype(dtype)


def as_float64(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32)).astype(np.float64)


def first_token_law(p: np.ndarray, q_law: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The law of a round's first token, in float64, for target values p and draft values q (the
    kernel's inputs as they are) with the draft drawn from q_law: accepted with probability
    min(1, p/q), else drawn from max(p - q, 0) normalised (p itself when that is all 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(q > 0, np.minimum(1.0, p / q), 0.0)
    accepted = q_law * ratio
    residual = np.maximum(p - q, 0.0)
    residual = residual if residual.sum() > 0 else p
    return accepted + (1.0 - accepted.sum()) * residual / residual.sum()


def assert_follows(tokens: np.ndarray, law: np.ndarray) -> None:
    """Every token possible, and chi-square: an id expected at least MIN_EXPECTED times is a
    cell of its own, the others are merged in id order into cells of MIN_EXPECTED."""
    assert (law[tokens] > 0).all(), f"impossible tokens drawn: {tokens[law[tokens] == 0]}"
    expected = law * len(tokens)
    own = expected >= MIN_EXPECTED
    merged = np.cumsum(np.where(own, 0.0, expected)) // MIN_EXPECTED
    merged = np.minimum(merged, max(merged.max() - 1, 0))  # the partial last cell: merged
    cells = np.where(own, np.cumsum(own) - 1 + merged.max() + 1, merged).astype(np.int64)
    counts = np.bincount(cells[tokens], minlength=cells.max() + 1)
    mass = np.bincount(cells, weights=law, minlength=cells.max() + 1)
    used = mass > 0
    p_value = chi_square_p_value(counts[used], mass[used] / mass.sum())
    clamped = (tokens == V - 1).mean()
    assert p_value > 1e-3, f"p = {p_value:.2e}; id V - 1 drawn {clamped:.1%} of the time"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["peaked", "flat"])
@pytest.mark.parametrize("drafts", ["none", "one-hot", "sampled"])
def test_sampled_token_follows_float64_distribution(dtype, kind, drafts):
    rng = np.random.default_rng(["peaked", "flat"].index(kind))
    target = probabilities(logits_row(kind, rng), DTYPES[dtype])
    p = as_float64(target)
    k = 0 if drafts == "none" else K
    rows = mx.broadcast_to(target, (k + 1, V))
    draft_probs, q_law, q = None, np.zeros(V), np.zeros(V)
    d = np.zeros((DRAWS, k), np.int64)
    if drafts == "one-hot":  # the least likely ids: almost always rejected
        d[:] = np.argsort(p, kind="stable")[:k]
        q_law[d[0, 0]] = q[d[0, 0]] = 1.0
    elif drafts == "sampled":  # a draft distribution far from the target's
        draft_row = probabilities(logits_row(kind, rng), DTYPES[dtype])
        draft_probs = mx.broadcast_to(draft_row, (k, V))
        q = as_float64(draft_row)
        q_law = q / q.sum()
        d = rng.choice(V, (DRAWS, k), p=q_law)
    law = first_token_law(p, q_law, q) if k else p / p.sum()

    firsts = np.empty(DRAWS, np.int64)
    uniforms = rng.random((DRAWS, k + 1)).astype(np.float32)
    p_rows = np.broadcast_to(p, (k + 1, V))
    q_rows = None if draft_probs is None else np.broadcast_to(q, (k, V))
    problems = []
    for i in range(DRAWS):
        u = mx.array(uniforms[i])
        n, token = verify_sampling_reference(rows, draft_probs, mx.array(d[i], mx.int32), u)
        result = (n.item(), token.item())
        if i < CHECKED:
            slack = reference_cdf_slack(V)
            problems.append(round_problem(p_rows, q_rows, d[i], uniforms[i], result, slack))
        firsts[i] = d[i, 0] if result[0] > 0 else result[1]
    wrong = [problem for problem in problems if problem]
    assert not wrong, f"{len(wrong)} of {CHECKED} rounds wrong, e.g. {wrong[0]}"
    assert_follows(firsts, law)
