"""MoE route and dispatch kernels (`metal/route.metal`, `metal/dispatch.metal`) run by the CPU
emulator with the launches of `gemma_mlx.kernels.moe`, against the composed-MLX references."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from gemma_mlx.kernels import moe
from gemma_mlx.kernels.backend import use_kernel_factory
from gemma_mlx.models import gemma4

CASES = 120


def route_case(rng: np.random.Generator, i: int):
    """Logits [T, E], scales [E], k: the 26B-A4B shape (E 128, k 8) and others; ties in a third."""
    E = (128, 128, 40, 6)[
        i % 4
    ]  # 40: a partial last lane column; 6: inputs Metal passes as constant
    k = min((8, 1, 2)[i % 3], E)
    T = (1, 64, int(rng.integers(2, 20)))[(i // 4) % 3]
    if i % 3 == 0:  # many equal logits: few distinct values
        logits = rng.integers(-2, 3, (T, E)).astype(np.float32)
    else:
        logits = (rng.standard_normal((T, E)) * 3).astype(np.float32)
    dtype = (mx.float32, mx.float32, mx.bfloat16, mx.float16)[(i // 3) % 4]
    scale = rng.uniform(0.2, 3.0, E).astype(np.float32)
    return mx.array(logits).astype(dtype), mx.array(scale), k


def test_route_kernel_matches_reference(kernels):
    rng = np.random.default_rng(0)
    launches = kernels.launches
    for i in range(CASES):
        logits, scale, k = route_case(rng, i)
        got_w, got_ids = moe.route(logits, scale, k)
        want_w, want_ids = moe.route_reference(logits, scale, k)
        where = f"case {i}: T, E = {logits.shape}, k = {k}, {logits.dtype}"
        np.testing.assert_array_equal(np.array(got_ids), np.array(want_ids), err_msg=where)
        np.testing.assert_allclose(np.array(got_w), np.array(want_w), rtol=1e-6, err_msg=where)
    assert kernels.launches - launches == CASES


def test_route_reference_breaks_ties_by_lower_id():
    """The oracle itself, against a brute-force numpy ranking."""
    rng = np.random.default_rng(1)
    logits = rng.integers(-1, 2, (16, 12)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, 12).astype(np.float32)
    weights, ids = moe.route_reference(mx.array(logits), mx.array(scale), 4)
    for t in range(16):
        ranked = sorted(range(12), key=lambda e: (-logits[t, e], e))[:4]
        assert np.array(ids[t]).tolist() == ranked
        top = np.exp(logits[t, ranked] - logits[t, ranked].max())
        np.testing.assert_allclose(np.array(weights[t]), top / top.sum() * scale[ranked], rtol=1e-6)


def dispatch_case(rng: np.random.Generator, i: int):
    """Expert ids [T, k] with E experts: 26B-A4B's 128, few (many repeats), more than the
    kernel's 256 threads (a chunked scan)."""
    E = (128, 8, 300)[i % 3]
    k = (8, 1, 4, 2)[i % 4]
    T = (1, 64, int(rng.integers(2, 40)))[(i // 3) % 3]
    if i % 5 == 0:  # every pair on a handful of experts
        ids = rng.choice(rng.choice(E, 3, replace=False), (T, k))
    else:
        ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)])
    return mx.array(ids.astype(np.uint32)), E


def test_dispatch_kernel_matches_reference(kernels):
    rng = np.random.default_rng(2)
    for i in range(CASES):
        ids, E = dispatch_case(rng, i)
        got = moe.dispatch(ids, E)
        want = moe.dispatch_reference(ids, E)
        for name, a, b in zip(moe.Dispatch._fields, got, want, strict=True):
            np.testing.assert_array_equal(
                np.array(a), np.array(b), err_msg=f"case {i}: {name}, ids {ids.shape}, E = {E}"
            )


def test_dispatch_reference_is_a_stable_counting_sort():
    """The oracle itself, against numpy's stable argsort and bincount."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 10, (7, 3))
    got = moe.dispatch_reference(mx.array(ids.astype(np.uint32)), 10)
    order = np.argsort(ids.ravel(), kind="stable")
    np.testing.assert_array_equal(np.array(got.order), order)
    np.testing.assert_array_equal(np.array(got.inverse_order), np.argsort(order))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(ids.ravel(), minlength=10))])
    np.testing.assert_array_equal(np.array(got.expert_offsets), offsets)
    np.testing.assert_array_equal(np.array(got.sorted_tokens), order // 3)


def test_route_rejects_bad_top_k():
    with pytest.raises(ValueError, match="top_k = 9"):
        moe.route(mx.zeros((2, 8)), mx.ones((8,)), 9)


def moe_args(**overrides) -> gemma4.ModelArgs:
    from hf_reference import VARIANTS

    return gemma4.ModelArgs.from_dict(VARIANTS["26b-a4b"]().to_dict() | overrides)


def test_dispatch_pays_where_mlx_switches_to_its_sorted_kernel():
    """MLX's Metal gather_qmm sorts-and-batches only from 16 pairs and 4 pairs per expert."""
    assert moe.dispatch_pays(512, 128) and not moe.dispatch_pays(511, 128)  # 26B-A4B: 64 tokens
    assert not moe.dispatch_pays(9 * 8, 128)  # a verify window of 8 drafts
    assert moe.dispatch_pays(16, 4) and not moe.dispatch_pays(15, 1)


@pytest.mark.parametrize("tokens, launches", [(5, 2), (12, 4)])
def test_moe_block_runs_the_kernels(emulator, tokens, launches):
    """The model's router and experts call the entry points: with the kernels (self-checked, as
    on a Mac) they launch once per call each and give the reference path's output. 5 tokens of
    16 experts' top 8 multiply their 40 pairs where they stand; 12 tokens' 96 are grouped."""
    args = moe_args()
    assert moe.dispatch_pays(tokens * args.top_k_experts, args.num_experts) == (tokens == 12)
    mx.random.seed(0)
    router, experts = gemma4.Router(args), gemma4.Experts(args)
    mx.eval(router.parameters(), experts.parameters())
    h = mx.random.normal((1, tokens, args.hidden_size))

    def block():
        weights, ids = router(h)
        return experts(h, ids, weights)

    want = block()
    with use_kernel_factory(emulator.metal_kernel, mode="auto"):
        before = emulator.launches
        got = block()
        mx.eval(got)
        # auto: one self-check launch per kernel, then the call's own launch
        assert emulator.launches - before == launches
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16], ids=str)
def test_experts_grouped_or_not_give_identical_outputs(dtype):
    """Grouping the pairs by expert changes the order of the products, not their arithmetic:
    4-bit experts (as converted) in each dtype, bit for bit."""
    args = moe_args(moe_intermediate_size=64)
    mx.random.seed(1)
    router, experts = gemma4.Router(args), gemma4.Experts(args)
    mx.eval(router.parameters(), experts.parameters())
    nn.quantize(experts, group_size=32, bits=4)
    experts.set_dtype(dtype)
    glu = experts.switch_glu
    for tokens in (2, 9, 40):
        x = mx.random.normal((tokens, args.hidden_size)).astype(dtype)
        ids = router(x)[1]
        a, b = glu.per_pair(x, ids), glu.grouped(x, ids)
        assert a.dtype == dtype and mx.array_equal(a, b).item(), tokens


@pytest.mark.parametrize("tokens", [5, 12])
def test_moe_model_matches_transformers_either_way(reference_checkpoints, tokens):
    """The 26B-A4B-like model on a short prompt, its pairs multiplied where they stand (5 tokens)
    or grouped (12); `test_model_parity` runs a long prompt."""
    from hf_reference import VOCAB, reference_logits

    from gemma_mlx.loading import load_model

    directory, torch_model = reference_checkpoints("26b-a4b")
    prompt = np.random.default_rng(tokens).integers(1, VOCAB, tokens).tolist()
    ours = np.array(load_model(directory)(mx.array([prompt]))[0])
    expected = reference_logits(torch_model, prompt)
    assert np.abs(ours - expected).max() <= 1e-4
    assert expected.std() > 0.1
