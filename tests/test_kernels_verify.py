"""Speculative verify kernels (`metal/verify_*.metal`) run by the CPU emulator with the launches of
`gemma_mlx.kernels.verify`: against the composed-MLX references and numpy (greedy: the same ids;
sampling: the same accepted count and a token in the float64 inverse-CDF bracket), on NaN and
-inf rows, at the production shape (V = 262,144, K up to 8) in float32, bfloat16 and float16
with the automatic self-check as on a Mac, and inside the speculative loop's distribution test."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_kernels_fallback import as_on_a_mac
from test_speculative_sampling import chi_square_p_value

from gemma_mlx.kernels import verify
from gemma_mlx.sample import SamplingFilters

CASES = 120
# 8: one SIMD-group of entries; 1000 and 33001: not multiples of a chunk (several chunks).
VOCABS = (8, 1000, 33001)
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
PRODUCTION_VOCAB = 262_144


def numpy_argmax(logits: np.ndarray) -> np.ndarray:
    """The greedy semantics, independently: NaN counts as -inf, the lowest id among equals."""
    return np.argmax(np.where(np.isnan(logits), -np.inf, logits), axis=-1)


def test_launch_geometry():
    """A 262k row: greedy's launch 1 has 32 threadgroups per row of 256 threads (8192 entries
    each), sampling's 128 for the one row it samples from (2048 entries); launch 2 one
    threadgroup. Reads are lane-adjacent (see the kernels)."""
    K, V = 8, PRODUCTION_VOCAB
    rows = mx.zeros((K + 1, V), mx.bfloat16)
    greedy = verify.greedy_chunks_launch(rows)
    assert (greedy.grid, greedy.threadgroup) == ((32 * 256, K + 1, 1), (256, 1, 1))
    args = (rows, rows[:K], mx.zeros((K,), mx.int32), mx.zeros((K + 1,)))
    sampling = verify.sampling_chunks_launch(*args)
    assert (sampling.grid, sampling.threadgroup) == ((128 * 256, 1, 1), (256, 1, 1))
    combine = verify.sampling_launch(*args, mx.zeros((2, 128)))
    assert combine.grid == combine.threadgroup == (256, 1, 1)


def greedy_case(rng: np.random.Generator, i: int):
    """Logits [K+1, V] and drafts [K]: all accepted, none, a prefix; ties for the maximum; NaN
    entries, and all-NaN / all -inf rows."""
    V = VOCABS[i % 3]
    K = (1, 4, 8)[(i // 3) % 3]
    logits = rng.standard_normal((K + 1, V)).astype(np.float32)
    if i % 2:  # the maximum twice in every row: the lower id must win
        cols = rng.choice(V, (K + 1, 2), replace=True)
        logits[np.arange(K + 1)[:, None], cols] = logits.max() + 1
    if i % 4 == 3:  # NaN at id 0 and elsewhere; one row all NaN, one all -inf (id 0 both)
        logits[:, 0] = np.nan
        logits[rng.random((K + 1, V)) < 0.1] = np.nan
        logits[rng.integers(0, K + 1)] = np.nan
        logits[rng.integers(0, K + 1)] = -np.inf
    best = numpy_argmax(logits)
    accepted = (K, 0, int(rng.integers(0, K + 1)))[(i // 9) % 3]
    drafts = best[:K].copy()
    if accepted < K:
        drafts[accepted] = (drafts[accepted] + 1 + rng.integers(0, V - 1)) % V
        drafts[accepted + 1 :] = rng.integers(0, V, K - accepted - 1)
    return mx.array(logits), mx.array(drafts.astype(np.int32)), accepted, int(best[accepted])


def test_greedy_kernel_matches_reference(kernels):
    rng = np.random.default_rng(0)
    for i in range(CASES):
        logits, drafts, accepted, token = greedy_case(rng, i)
        got = [int(x.item()) for x in verify.verify_greedy(logits, drafts)]
        want = [int(x.item()) for x in verify.verify_greedy_reference(logits, drafts)]
        assert want == [accepted, token], f"case {i}: the reference disagrees with numpy"
        assert got == want, f"case {i}: logits {logits.shape}, drafts {drafts.tolist()}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_nan_and_inf_rows(kernels, dtype):
    """NaN never wins; rows of only NaN, only -inf, or both give id 0; a lone finite value wins."""
    V = 5000
    rows = np.random.default_rng(2).standard_normal((5, V)).astype(np.float32)
    rows[0, [0, 17, 4000]] = np.nan
    rows[1] = np.nan
    rows[2] = -np.inf
    rows[3] = -np.inf
    rows[3, ::7] = np.nan
    rows[4] = np.nan
    rows[4, 4321] = -3.0
    want = numpy_argmax(rows)
    assert want[1:].tolist() == [0, 0, 0, 4321]
    logits = mx.array(rows).astype(DTYPES[dtype])
    drafts = mx.array(want[:-1].astype(np.int32))  # all accepted: every row is read
    got = [int(x.item()) for x in verify.verify_greedy(logits, drafts)]
    assert got == [4, 4321]
    assert got == [int(x.item()) for x in verify.verify_greedy_reference(logits, drafts)]


def probabilities(rng: np.random.Generator, shape, sharpness: float) -> np.ndarray:
    x = rng.standard_normal(shape) * sharpness
    p = np.exp(x - x.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)).astype(np.float32)


def sampling_case(rng: np.random.Generator, i: int):
    """(target [K+1, V], draft [K, V] or None, drafts [K], uniforms [K+1]), with all drafts
    accepted (u = 0), none (u near 1 where q > p), the residual exactly 0 (q = p on the row
    after the accepted drafts), NaN entries and an all-NaN row, and random rounds."""
    V = VOCABS[i % 3]
    K = (1, 3, 8)[(i // 3) % 3]
    target = probabilities(rng, (K + 1, V), 2.0)
    draft = probabilities(rng, (K, V), 2.0) if i % 2 else None
    drafts = rng.integers(0, V, K)
    if draft is not None:
        drafts = np.array([rng.choice(V, p=draft[j] / draft[j].sum()) for j in range(K)])
    uniforms = rng.random(K + 1).astype(np.float32)
    scenario = (i // 9) % 5
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
    elif scenario == 3:  # NaN probabilities weigh 0; an all-NaN row gives id 0
        target[rng.random(target.shape) < 0.2] = np.nan
        target[rng.integers(0, K + 1)] = np.nan
    draft_mx = None if draft is None else mx.array(draft)
    return mx.array(target), draft_mx, mx.array(drafts.astype(np.int32)), mx.array(uniforms)


def assert_correct_round(args: tuple, got, slack: float) -> None:
    """`got` accepts what the reference accepts and lies in the float64 inverse-CDF bracket."""
    want = verify.verify_sampling_reference(*args)
    assert int(got[0].item()) == int(want[0].item())
    problem = verify.sampling_problem(args, got, slack)
    assert problem is None, problem


def test_sampling_kernel_is_correct(kernels):
    rng = np.random.default_rng(1)
    seen = set()
    for i in range(CASES):
        args = sampling_case(rng, i)
        V = args[0].shape[1]
        want = verify.verify_sampling_reference(*args)
        assert verify.sampling_problem(args, want, verify.reference_cdf_slack(V)) is None
        assert_correct_round(args, verify.verify_sampling(*args), verify.kernel_cdf_slack(V))
        n = int(want[0].item())
        seen.add("all" if n == args[2].shape[0] else "none" if n == 0 else "some")
    assert seen == {"all", "none", "some"}


RUNS, V, K = 1000, 8, 3


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


# --- the production shape, self-checked as on a Mac -------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_at_production_shape(emulator, dtype):
    """K = 8 over 262,144 logits of the model's dtype, 5 drafts accepted."""
    K = 8
    rng = np.random.default_rng(6)
    logits = mx.array(3 * rng.standard_normal((K + 1, PRODUCTION_VOCAB)), mx.float32)
    logits = logits.astype(DTYPES[dtype])
    drafts = np.array(verify.greedy_tokens(logits[:K]))
    drafts[5] = (drafts[5] + 1) % PRODUCTION_VOCAB
    drafts = mx.array(drafts)
    got, launched = as_on_a_mac(emulator, lambda: verify.verify_greedy(logits, drafts))
    want = verify.verify_greedy_reference(logits, drafts)
    assert [x.item() for x in got] == [x.item() for x in want] and want[0].item() == 5
    # The self-check's launch and the call's, two kernels each.
    assert launched == {"verify_greedy_chunks": 2, "verify_greedy": 2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k, sampled", [(8, True), (1, False)], ids=["k8-sampled", "k1-one-hot"])
def test_sampling_at_production_shape(emulator, dtype, k, sampled):
    """K = 8 sampled drafts over nearly flat rows, and K = 1 one-hot draft over Gemma 4's
    recommended filtered distribution (temperature 1, top-k 64, top-p 0.95), in `dtype`."""
    rng = np.random.default_rng(7)
    logits = mx.array(rng.standard_normal((k + 1, PRODUCTION_VOCAB)), mx.float32)
    draft_probs = None
    if sampled:
        target = mx.softmax(0.3 * logits, axis=-1)
        draft_probs = mx.softmax(0.3 * mx.array(rng.standard_normal((k, PRODUCTION_VOCAB))), -1)
        q = np.array(draft_probs, np.float64)
        drafts = np.array([rng.choice(PRODUCTION_VOCAB, p=row / row.sum()) for row in q])
        draft_probs = draft_probs.astype(DTYPES[dtype])
    else:
        target = SamplingFilters(1.0, 64, 0.95, 0.0).distribution(3 * logits)
        drafts = np.array([int(np.argmax(np.array(target[0])))])  # likely accepted
    target = target.astype(DTYPES[dtype])
    args = (
        target,
        draft_probs,
        mx.array(drafts, mx.int32),
        mx.array(rng.random(k + 1), mx.float32),
    )
    got, launched = as_on_a_mac(emulator, lambda: verify.verify_sampling(*args))
    assert_correct_round(args, got, verify.kernel_cdf_slack(PRODUCTION_VOCAB))
    assert launched == {"verify_sampling_chunks": 2, "verify_sampling": 2}


def test_verify_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[K\+1, V\] and drafts \[K\]"):
        verify.verify_greedy(mx.zeros((3, 10)), mx.zeros((3,), mx.int32))
    with pytest.raises(ValueError, match="uniforms has shape"):
        verify.verify_sampling(mx.zeros((3, 10)), None, mx.zeros((2,), mx.int32), mx.zeros((2,)))
