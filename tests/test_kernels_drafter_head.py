"""The drafter head kernel (`metal/drafter_head.metal`) run by the CPU emulator with the launches of
`gemma_mlx.kernels.drafter_head`, against its composed-MLX reference; the reference against a
brute-force numpy full-vocabulary argmax and against the assistant's own head; the kernel inside
the assistant's greedy drafting."""

from __future__ import annotations

from collections import Counter

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from speculative_helpers import random_assistant, random_target
from test_kernels_fallback import broken_source, on_kernels

from gemma_mlx.drafters import AssistantDrafter, pick
from gemma_mlx.kernels import drafter_head
from gemma_mlx.kernels.backend import KernelFallbackWarning, use_kernel_factory
from gemma_mlx.kernels.drafter_head import HeadTable
from gemma_mlx.speculative import speculative_tokens

CASES = 120
# (weight dtype or None, bits, group size): float tables and MLX affine layouts.
LAYOUTS = (
    (mx.float32, 0, 0),
    (mx.bfloat16, 0, 0),
    (mx.float16, 0, 0),
    (None, 8, 32),
    (None, 4, 64),
    (None, 2, 32),
)


def make_table(rng: np.random.Generator, rows: int, D: int, layout, integer: bool) -> HeadTable:
    """A random table; `integer`: small integers and only a few distinct rows, so that logits
    tie exactly."""
    dtype, bits, group = layout
    # Row r holds the values of row copies[r].
    copies = rng.integers(0, 3, rows) if integer else np.arange(rows)
    if not bits:
        values = rng.integers(-3, 4, (rows, D)) if integer else rng.standard_normal((rows, D))
        return HeadTable(mx.array(values[copies].astype(np.float32)).astype(dtype))
    words = rng.integers(0, 2**32, (rows, D * bits // 32), dtype=np.uint64).astype(np.uint32)
    if integer:
        scales = np.ones((rows, D // group), np.float32)
        biases = rng.integers(-2, 3, (rows, D // group)).astype(np.float32)
    else:
        scales = rng.uniform(0.01, 0.1, (rows, D // group)).astype(np.float32)
        biases = rng.uniform(-0.5, 0.5, (rows, D // group)).astype(np.float32)
    scale_dtype = (mx.float32, mx.float16, mx.bfloat16)[int(rng.integers(0, 3))]
    return HeadTable(
        mx.array(words[copies]),
        mx.array(scales[copies]).astype(scale_dtype),
        mx.array(biases[copies]).astype(scale_dtype),
        group,
        bits,
    )


def head_case(rng: np.random.Generator, i: int):
    """(scores [N, C], z [N, D], ordering [V], table, top_k): vocabularies that are no multiple of
    the threadgroup, top_k from 1 to C, and in half the cases small integers everywhere, so that
    centroid scores tie at the top-k boundary and candidate logits tie for the maximum."""
    layout = LAYOUTS[i % len(LAYOUTS)]
    integer = (i // len(LAYOUTS)) % 2 == 1
    C = (16, 40, 300, 7)[(i // 12) % 4]  # 300: several centroids per thread
    cluster = (4, 7, 32)[(i // 3) % 3]
    top_k = min((1, 3, 8, 32)[i % 4], C)
    D = (64, 128)[i % 2] if layout[2] == 64 else (32, 96, 64)[i % 3]
    N = 3 if i % 5 == 0 else 1
    V = C * cluster
    rows = V + int(rng.integers(0, 5))  # a table may have more rows than the ordering names
    ordering = rng.permutation(rows)[:V].astype(np.int32)
    if integer:
        scores = rng.integers(-2, 3, (N, C)).astype(np.float32)
        z = rng.integers(-2, 3, (N, D)).astype(np.float32)
    else:
        scores = rng.standard_normal((N, C)).astype(np.float32)
        z = rng.standard_normal((N, D)).astype(np.float32)
    table = make_table(rng, rows, D, layout, integer)
    z_dtype = layout[0] or mx.float32
    return mx.array(scores), mx.array(z).astype(z_dtype), mx.array(ordering), table, top_k


def test_threadgroup_sizes():
    # E2B/E4B: 2048 centroids, 32 x 128 candidates, 128 per threadgroup; toy heads: one
    # SIMD-group per 4 candidates; never more than 256 threads.
    assert drafter_head.threads_for(2048, 4096) == 256
    assert drafter_head.threads_for(16, 4) == 32
    assert drafter_head.threads_for(40, 21) == 192
    assert drafter_head.threads_for(16384, 4) == 256  # 64 centroids per thread at most


def test_kernel_matches_reference(kernels):
    rng = np.random.default_rng(0)
    launches = kernels.launches
    ties = Counter()
    for i in range(CASES):
        args = head_case(rng, i)
        got = np.array(drafter_head.greedy_token(*args))
        want = np.array(drafter_head.greedy_token_reference(*args))
        scores, _, _, table, top_k = args
        where = f"case {i}: scores {scores.shape}, top_k {top_k}, bits {table.bits}"
        np.testing.assert_array_equal(got, want, err_msg=where)
        ties["centroids"] += int(tied_at_boundary(np.array(scores), top_k))
        ties["logits"] += int(brute_force(*args)[1])
    assert kernels.launches - launches == 2 * CASES  # the slices, then the pick
    assert ties["centroids"] > 10 and ties["logits"] > 10


def tied_at_boundary(scores: np.ndarray, k: int) -> bool:
    """Whether the k-th best score equals the (k+1)-th in some row: the top-k set needs the
    tie-break."""
    if k == scores.shape[1]:
        return False
    ranked = -np.sort(-scores, axis=1)
    return bool((ranked[:, k - 1] == ranked[:, k]).any())


def test_e2b_shaped_head(kernels):
    """The E2B assistant's head: 2048 centroids, top 32 of 128 tokens each, width 256, 8-bit."""
    rng = np.random.default_rng(1)
    C, cluster, D = 2048, 128, 256
    ordering = mx.array(rng.permutation(C * cluster).astype(np.int32))
    table = make_table(rng, C * cluster, D, (None, 8, 32), integer=False)
    scores = mx.array(rng.standard_normal((1, C)).astype(np.float32))
    z = mx.array(rng.standard_normal((1, D)).astype(np.float32))
    args = (scores, z, ordering, table, 32)
    assert (
        drafter_head.greedy_token(*args).item() == drafter_head.greedy_token_reference(*args).item()
    )


def brute_force(scores, z, ordering, table: HeadTable, top_k: int) -> tuple[np.ndarray, bool]:
    """transformers' way in float64: the full vocabulary row with every token outside the top-k
    clusters at -inf, then argmax (first = lowest token id among equal logits). Also whether
    two tokens tied for the maximum in some row."""
    scores, ordering = np.array(scores, np.float64), np.array(ordering)
    z = np.array(z.astype(mx.float32), np.float64)
    C = scores.shape[1]
    if table.quantized:
        words = np.array(table.weight).astype(np.uint64)
        position = np.arange(table.width, dtype=np.uint64) * np.uint64(table.bits)
        codes = words[:, position // 32] >> (position % 32) & np.uint64(2**table.bits - 1)
        group = np.arange(table.width) // table.group_size
        scales = np.array(table.scales.astype(mx.float32), np.float64)[:, group]
        biases = np.array(table.biases.astype(mx.float32), np.float64)[:, group]
        rows = scales * codes + biases
    else:
        rows = np.array(table.weight.astype(mx.float32), np.float64)
    tokens, tied = [], False
    for s, x in zip(scores, z, strict=True):
        top = sorted(range(C), key=lambda c: (-s[c], c))[:top_k]
        row = np.full(rows.shape[0], -np.inf)
        candidates = ordering.reshape(C, -1)[top].ravel()
        row[candidates] = rows[candidates] @ x
        tokens.append(int(np.argmax(row)))
        tied |= bool((row == row.max()).sum() > 1)
    return np.array(tokens), tied


def test_reference_is_a_full_vocabulary_argmax():
    rng = np.random.default_rng(2)
    for i in range(36):
        args = head_case(rng, i)
        want, _ = brute_force(*args)
        np.testing.assert_array_equal(np.array(drafter_head.greedy_token_reference(*args)), want)


@pytest.mark.parametrize("bits", [0, 8])
def test_reference_is_the_assistants_head(bits):
    """Without ties, the entry point gives the token the assistant's own head and `pick` give."""
    target = random_target("e2b")
    assistant = random_assistant(target, centroids=16)
    if bits:
        nn.quantize(assistant, group_size=32, bits=bits)
    z = mx.random.normal((20, 1, assistant.args.text.hidden_size), key=mx.random.key(3))
    ids, logits = assistant.head(z)
    for n in range(z.shape[0]):
        token, _ = pick(logits[n, 0], ids[n, 0], None, target.args.vocab_size)
        assert assistant.greedy_token(z[n : n + 1]).item() == token.item()


def test_drafting_on_the_kernel(emulator):
    """Greedy drafting with a centroid-head assistant launches the head kernel (self-checked, as
    on a Mac) once per draft and emits the reference path's tokens."""
    target = random_target("e2b")
    assistant = random_assistant(target, centroids=16)
    nn.quantize(assistant, group_size=32, bits=8)
    prompt = np.random.default_rng(0).integers(1, target.args.vocab_size, 12).tolist()

    def run() -> list[int]:
        steps = speculative_tokens(
            target,
            prompt,
            target.make_cache(max_trim=8),
            AssistantDrafter(assistant, target),
            num_draft=3,
            max_tokens=12,
        )
        return [s.token for s in steps]

    launched = on_kernels(emulator, run)
    assert launched["drafter_head"] > 3


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_rows_without_a_number_give_a_candidate(kernels, poison):
    """z of NaN (every logit NaN) or of inf against negative rows (every logit -inf): NaN ranks as
    -inf, so all candidates tie and the lowest candidate id wins, in kernel and reference; one
    NaN row among finite ones never wins."""
    rng = np.random.default_rng(6)
    C, cluster, D, top_k = 40, 7, 64, 8
    ordering = rng.permutation(C * cluster).astype(np.int32)
    scores = rng.standard_normal((2, C)).astype(np.float32)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    candidates = ordering.reshape(C, -1)[top].reshape(2, -1)
    weight = -rng.uniform(0.5, 1.0, (C * cluster, D)).astype(np.float32)
    z = rng.standard_normal((2, D)).astype(np.float32)
    z[0] = np.nan if poison == "nan" else np.inf
    best = candidates[1][np.argmax(weight[candidates[1]] @ z[1])]
    weight[best] = np.nan  # row 1: its best candidate's logit becomes NaN
    args = (mx.array(scores), mx.array(z), mx.array(ordering), HeadTable(mx.array(weight)), top_k)
    got = np.array(drafter_head.greedy_token(*args))
    np.testing.assert_array_equal(got, np.array(drafter_head.greedy_token_reference(*args)))
    assert got[0] == candidates[0].min()
    finite = [t for t in candidates[1] if t != best]
    assert got[1] == max(finite, key=lambda t: (weight[t] @ z[1], -t))


def test_unsupported_layouts_use_the_reference(kernels):
    """3-bit codes straddle words: the kernel is not launched, the reference answers."""
    rng = np.random.default_rng(4)
    scores, z, ordering, _, top_k = head_case(rng, 1)
    w, s, b = mx.quantize(mx.random.normal((ordering.size, z.shape[-1])), group_size=32, bits=3)
    table = HeadTable(w, s, b, 32, 3)
    launches = kernels.launches
    got = drafter_head.greedy_token(scores, z, ordering, table, top_k)
    assert kernels.launches == launches
    want = drafter_head.greedy_token_reference(scores, z, ordering, table, top_k)
    assert mx.array_equal(got, want).item()


def test_rejects_bad_shapes():
    table = HeadTable(mx.zeros((64, 8)))
    ordering = mx.arange(64, dtype=mx.int32)
    with pytest.raises(ValueError, match=r"top_k = 9 must be in 1\.\.8"):
        drafter_head.greedy_token(mx.zeros((1, 8)), mx.zeros((1, 8)), ordering, table, 9)
    with pytest.raises(ValueError, match=r"ordering \[C \* cluster\]"):
        drafter_head.greedy_token(mx.zeros((1, 7)), mx.zeros((1, 8)), ordering, table, 2)
    with pytest.raises(ValueError, match="table rows have 8 values, z has 4"):
        drafter_head.greedy_token(mx.zeros((1, 8)), mx.zeros((1, 4)), ordering, table, 2)


def off_by_one(emulator):
    """A factory whose head kernel builds and runs but returns the next token id."""

    def factory(**kwargs):
        kernel = emulator.metal_kernel(**kwargs)
        return lambda **call: [out + 1 for out in kernel(**call)]

    return factory


@pytest.mark.parametrize("make_factory", [broken_source, off_by_one], ids=["build", "check"])
def test_failed_kernel_warns_once_and_matches_reference(emulator, make_factory):
    rng = np.random.default_rng(5)
    cases = [head_case(rng, i) for i in (3, 4, 3)]
    with (
        use_kernel_factory(make_factory(emulator), mode="auto"),
        pytest.warns(KernelFallbackWarning, match="drafter_head.greedy") as caught,
    ):
        got = [drafter_head.greedy_token(*args) for args in cases]
    assert len(caught) == 1
    for args, tokens in zip(cases, got, strict=True):
        assert mx.array_equal(tokens, drafter_head.greedy_token_reference(*args)).item()
