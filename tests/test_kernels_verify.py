"""Speculative verify kernels (`metal/verify_greedy.metal`, `metal/verify_sampling.metal`) run by
the CPU emulator with the launches of `gemma_mlx.kernels.verify`, against the composed-MLX
references (the speculative loop's own verify), and inside the speculative loop."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_speculative_sampling import chi_square_p_value

from gemma_mlx.kernels import verify

CASES = 120
# 8: one SIMD-group; 1000 and 33001: not multiples of their threadgroups (64 and 1024 threads).
VOCABS = (8, 1000, 33001)


def test_threadgroup_sizes():
    assert [verify.threads_for(v) for v in (8, 1000, 33001, 262144)] == [32, 64, 1024, 1024]


def greedy_case(rng: np.random.Generator, i: int):
    """Logits [K+1, V] and drafts [K]: all accepted, none, a prefix; ties for the maximum."""
    V = VOCABS[i % 3]
    K = (1, 4, 8)[(i // 3) % 3]
    logits = rng.standard_normal((K + 1, V)).astype(np.float32)
    if i % 2:  # the maximum twice in every row: the lower id must win
        cols = rng.choice(V, (K + 1, 2), replace=True)
        logits[np.arange(K + 1)[:, None], cols] = logits.max() + 1
    best = np.argmax(logits, axis=-1)
    accepted = (K, 0, int(rng.integers(0, K + 1)))[(i // 9) % 3]
    drafts = best[:K].copy()
    if accepted < K:
        drafts[accepted] = (drafts[accepted] + 1 + rng.integers(0, V - 1)) % V
        drafts[accepted + 1 :] = rng.integers(0, V, K - accepted - 1)
    return mx.array(logits), mx.array(drafts.astype(np.int32)), accepted


def test_greedy_kernel_matches_reference(kernels):
    rng = np.random.default_rng(0)
    for i in range(CASES):
        logits, drafts, accepted = greedy_case(rng, i)
        got = [int(x.item()) for x in verify.verify_greedy(logits, drafts)]
        want = [int(x.item()) for x in verify.verify_greedy_reference(logits, drafts)]
        assert want[0] == accepted
        assert got == want, f"case {i}: logits {logits.shape}, drafts {drafts.tolist()}"


def probabilities(rng: np.random.Generator, shape, sharpness: float) -> np.ndarray:
    x = rng.standard_normal(shape) * sharpness
    p = np.exp(x - x.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)).astype(np.float32)


def sampling_case(rng: np.random.Generator, i: int):
    """(target [K+1, V], draft [K, V] or None, drafts [K], uniforms [K+1]), with all drafts
    accepted (u = 0), none (u near 1 where q > p), the residual exactly 0 (q = p on the row
    after the accepted drafts), and random rounds."""
    V = VOCABS[i % 3]
    K = (1, 3, 8)[(i // 3) % 3]
    target = probabilities(rng, (K + 1, V), 2.0)
    draft = probabilities(rng, (K, V), 2.0) if i % 2 else None
    drafts = rng.integers(0, V, K)
    if draft is not None:
        drafts = np.array([rng.choice(V, p=draft[j] / draft[j].sum()) for j in range(K)])
    uniforms = rng.random(K + 1).astype(np.float32)
    scenario = (i // 9) % 4
    if scenario == 0:  # all accepted
        uniforms[:K] = 0.0
    elif scenario == 1:  # none accepted: the first draft has q above p, u just under 1
        drafts[0] = int(np.argmin(target[0] - (draft[0] if draft is not None else 1.0)))
        uniforms[0] = np.float32(0.999999)
        if draft is not None:
            draft[0, drafts[0]] = max(draft[0, drafts[0]], 2 * target[0, drafts[0]] + 1e-3)
    elif scenario == 2 and draft is not None:  # nothing left after the rejection: use p
        uniforms[0] = np.float32(0.999999)
        draft[0] = target[0]
        target[0, drafts[0]] = draft[0, drafts[0]] / 2
    draft_mx = None if draft is None else mx.array(draft)
    return mx.array(target), draft_mx, mx.array(drafts.astype(np.int32)), mx.array(uniforms)


def test_sampling_kernel_matches_reference(kernels):
    rng = np.random.default_rng(1)
    seen = set()
    for i in range(CASES):
        args = sampling_case(rng, i)
        got = [int(x.item()) for x in verify.verify_sampling(*args)]
        want = [int(x.item()) for x in verify.verify_sampling_reference(*args)]
        assert got == want, f"case {i}: target {args[0].shape}, draft probs {args[1] is not None}"
        seen.add("all" if want[0] == args[2].shape[0] else "none" if want[0] == 0 else "some")
    assert seen == {"all", "none", "some"}


RUNS, V, K = 3000, 8, 3


def kernel_rounds(p: np.ndarray, q: np.ndarray | None, drafts: np.ndarray, seed: int):
    uniforms = np.random.default_rng(seed).random((RUNS, K + 1)).astype(np.float32)
    p_mx, q_mx = mx.array(p), None if q is None else mx.array(q)
    n, token = np.zeros(RUNS, np.int64), np.zeros(RUNS, np.int64)
    for r in range(RUNS):
        a, b = verify.verify_sampling(p_mx, q_mx, mx.array(drafts[r]), mx.array(uniforms[r]))
        n[r], token[r] = a.item(), b.item()
    return n, token


@pytest.mark.parametrize("sampled_drafts", [True, False], ids=["sampled", "one-hot"])
def test_sampling_kernel_keeps_target_distribution(kernels, sampled_drafts):
    """Chi-square: the first token a round emits follows p[0], the second (when d1 was kept)
    p[1], with a draft distribution far from the target's."""
    rng = np.random.default_rng(4)
    p = rng.dirichlet(np.full(V, 0.7), K + 1).astype(np.float32)
    q = rng.dirichlet(np.full(V, 0.7), K).astype(np.float32) if sampled_drafts else None
    if q is None:
        drafts = np.tile(np.array([[3, 1, 6]], np.int32), (RUNS, 1))
    else:
        drafts = np.stack([rng.choice(V, RUNS, p=q[i] / q[i].sum()) for i in range(K)], 1)
    n, token = kernel_rounds(p, q, drafts.astype(np.int32), seed=5)
    first = np.where(n > 0, drafts[:, 0], token)
    assert chi_square_p_value(np.bincount(first, minlength=V), p[0]) > 1e-3
    kept = n >= 1
    second = np.where(n[kept] > 1, drafts[kept, 1], token[kept])
    assert chi_square_p_value(np.bincount(second, minlength=V), p[1]) > 1e-3
    if q is not None:  # the test tells distributions apart: the draft's is rejected
        assert chi_square_p_value(np.bincount(first, minlength=V), q[0]) < 1e-6


def test_verify_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[K\+1, V\] and drafts \[K\]"):
        verify.verify_greedy(mx.zeros((3, 10)), mx.zeros((3,), mx.int32))
    with pytest.raises(ValueError, match="uniforms has shape"):
        verify.verify_sampling(mx.zeros((3, 10)), None, mx.zeros((2,), mx.int32), mx.zeros((2,)))
