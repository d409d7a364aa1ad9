"""The residual kernel (`metal/residual_norm.metal`) run by the CPU emulator with the launches of
`gemma_mlx.kernels.residual`: every residual step of the Gemma 4 sizes (after attention with the
MLP's and the experts' norms, the per-layer-input step, the layer's end with its scalar), a
verify window and a prefill chunk, Gemma 3's (1 + w) norms, through the self-check a Mac runs,
in float32, bfloat16 and float16, against the reference; the reference against the model's own
code, bit for bit."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from layer_kernel_helpers import DTYPES, host, launched, self_checked, tiny_args
from mlx.utils import tree_map

from gemma_mlx.kernels import residual
from gemma_mlx.kernels.operands import Norm
from gemma_mlx.kernels.tolerance import normwise_mismatch
from gemma_mlx.models import gemma4

# name -> (H, rows, layer scalar, norms of the sum, norm offset)
CASES = {
    "E2B after attention: the sum and the MLP's norm": (1536, 1, False, 1, 0.0),
    "26B-A4B after attention: the MLP's and the experts' norms": (2816, 1, False, 2, 0.0),
    "E4B per-layer-input step": (2560, 1, False, 0, 0.0),
    "31B layer end, with the layer scalar": (5376, 1, True, 0, 0.0),
    "a verify window of 4 tokens, three norms": (3840, 4, True, 3, 0.0),
    "a prefill chunk of 64 tokens": (1536, 64, True, 1, 0.0),
    "Gemma 3 270M (1 + w) norms": (640, 1, False, 1, 1.0),
}


def operands(case: str, dtype: mx.Dtype):
    H, rows, scalar, count, offset = CASES[case]
    keys = mx.random.split(mx.random.key(rows + H), 5)
    r = mx.random.normal((1, rows, H), key=keys[0]).astype(dtype)
    a = (mx.random.normal((1, rows, H), key=keys[1]) * 8).astype(dtype)

    def norm(key: mx.array, **kwargs) -> Norm:
        weight = mx.random.uniform(-0.5, 1.5, (H,), key=key).astype(dtype)
        return Norm(weight, 1e-6, offset, **kwargs)

    norms = [norm(k) for k in mx.random.split(keys[2], count)] if count else []
    if count == 3:  # the router's norm: its weight times 1 / sqrt(hidden)
        norms[2] = Norm(norms[2].weight, 1e-6, scale=H**-0.5)
    s = mx.array([1.7], dtype) if scalar else None
    return r, a, norm(keys[3]), s, norms


def flat(result) -> tuple[mx.array, ...]:
    return (result[0], *result[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_residual_self_checked(emulator, case, dtype):
    args = operands(case, dtype)
    got, launches = self_checked(emulator, lambda: residual.residual(*args))
    assert launches == 2  # the self-check's launch, then the call's
    want = residual.residual_reference(*args)
    for a, b in zip(flat(got), flat(want), strict=True):
        assert a.shape == b.shape == args[0].shape and a.dtype == dtype
    assert normwise_mismatch(flat(got), flat(want), dtype) is None
    if dtype != mx.float32:  # rounded where MLX rounds: only the sums of squares' order differs
        for a, b in zip(flat(got), flat(want), strict=True):
            assert np.mean(host(a) == host(b)) > 0.97, case


def test_adversarial_summation_orders(emulator):
    args = operands("a verify window of 4 tokens, three norms", mx.float32)
    got, _ = launched(emulator.variant(order="random", fma=True), lambda: residual.residual(*args))
    assert (
        normwise_mismatch(flat(got), flat(residual.residual_reference(*args)), mx.float32) is None
    )


def test_uncovered_operands_take_the_reference(emulator):
    r, a, post, s, norms = operands("E2B after attention: the sum and the MLP's norm", mx.float32)
    for args in (
        (r, a[:, :, :-1], post, s, norms),  # shapes differ (the reference raises or broadcasts)
        (r, a.astype(mx.bfloat16), post, s, norms),
        (r, a, Norm(None, 1e-6), s, norms),
        (r, a, post, mx.array([1.0, 2.0]), norms),
    ):
        try:
            want = residual.residual_reference(*args)
        except ValueError:
            continue
        got, launches = launched(emulator, lambda args=args: residual.residual(*args))
        assert launches == 0
        assert all(mx.array_equal(x, y).item() for x, y in zip(flat(got), flat(want), strict=True))
    with pytest.raises(ValueError, match="at most 3 norms"):
        residual.residual(r, a, post, None, [post] * 4)


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["gemma4", "gemma3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_equals_the_layer(dtype, offset):
    """The model's residual steps written out, against the reference on the same modules."""
    args = dataclasses.replace(tiny_args(), norm_offset=offset)
    layer = gemma4.DecoderLayer(args, 0)
    layer.update(tree_map(lambda p: mx.random.uniform(0.5, 1.5, p.shape), layer.parameters()))
    layer.set_dtype(dtype)
    x, a = (mx.random.normal((1, 3, args.hidden_size)).astype(dtype) for _ in range(2))
    h = x + layer.post_attention_layernorm(a)
    composed = [h, layer.pre_feedforward_layernorm(h), (h + layer.post_feedforward_layernorm(a))]
    composed[2] = composed[2] * layer.layer_scalar
    first, (normed,) = residual.residual_reference(
        x,
        a,
        Norm.of(layer.post_attention_layernorm),
        None,
        [Norm.of(layer.pre_feedforward_layernorm)],
    )
    end, _ = residual.residual_reference(
        h, a, Norm.of(layer.post_feedforward_layernorm), layer.layer_scalar
    )
    for want, got in zip(composed, [first, normed, end], strict=True):
        assert mx.array_equal(want, got).item()


# --- after the MoE block ----------------------------------------------------------------------


def moe_operands(rows: int, dtype: mx.Dtype, scalar: bool = True, experts: int = 8, H: int = 2816):
    """26B-A4B's layer end: H 2816, the top 8 experts' outputs and the router's weights."""
    keys = mx.random.split(mx.random.key(rows), 7)
    h = mx.random.normal((1, rows, H), key=keys[0]).astype(dtype)
    m = (mx.random.normal((1, rows, H), key=keys[1]) * 3).astype(dtype)
    y = (mx.random.normal((rows, experts, H), key=keys[2]) * 5).astype(dtype)
    w = mx.random.uniform(0.05, 1.0, (1, rows, experts), key=keys[3])
    weights = w / w.sum(axis=-1, keepdims=True)
    norms = [
        Norm(mx.random.uniform(-0.5, 1.5, (H,), key=k).astype(dtype), 1e-6)
        for k in mx.random.split(keys[4], 3)
    ]
    s = mx.array([0.8], dtype) if scalar else None
    return h, m, y, weights, *norms, s


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 4], ids=["1 token", "verify window of 4"])
def test_moe_residual_self_checked(emulator, rows, dtype):
    args = moe_operands(rows, dtype)
    got, launches = self_checked(emulator, lambda: residual.moe_residual(*args))
    assert launches == 2
    want = residual.moe_residual_reference(*args)
    assert got.shape == want.shape == args[0].shape and got.dtype == dtype
    assert normwise_mismatch(got, want, dtype) is None
    if dtype != mx.float32:
        assert np.mean(host(got) == host(want)) > 0.9


def test_moe_residual_adversarial_orders(emulator):
    args = moe_operands(1, mx.float32, scalar=False)
    got, _ = launched(
        emulator.variant(order="random", fma=True), lambda: residual.moe_residual(*args)
    )
    assert normwise_mismatch(got, residual.moe_residual_reference(*args), mx.float32) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moe_residual_reference_equals_the_layer(dtype):
    """The layer's composed end of the MoE block (experts' weighted sum in `Experts`, the two
    post-norms, the residual and the scalar), against the reference on the same modules."""
    args = tiny_args()
    layer = gemma4.DecoderLayer(args, 0)
    layer.update(tree_map(lambda p: mx.random.uniform(0.5, 1.5, p.shape), layer.parameters()))
    nn.quantize(layer.experts, 32, 4)  # half-precision expert products need quantized experts
    layer.set_dtype(dtype)
    h, x, f = (mx.random.normal((1, 3, args.hidden_size)).astype(dtype) for _ in range(3))
    weights, ids = layer.router(h)
    e = layer.experts(x, ids, weights)
    composed = h + layer.post_feedforward_layernorm(
        layer.post_feedforward_layernorm_1(f) + layer.post_feedforward_layernorm_2(e)
    )
    composed = composed * layer.layer_scalar
    fused = residual.moe_residual_reference(
        h,
        f,
        layer.experts.outputs(x, ids),
        weights,
        Norm.of(layer.post_feedforward_layernorm_1),
        Norm.of(layer.post_feedforward_layernorm_2),
        Norm.of(layer.post_feedforward_layernorm),
        layer.layer_scalar,
    )
    assert mx.array_equal(composed, fused).item()
