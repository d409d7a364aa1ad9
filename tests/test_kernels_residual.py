"""The residual kernel (`metal/residual_norm.metal`) run by the CPU emulator with the launches of
`gemma_mlx.kernels.residual`: every residual step of the Gemma 4 sizes (after attention with the
MLP's and the experts' norms, the per-layer-input step, the layer's end with its scalar), a
verify window and a prefill chunk, Gemma 3's (1 + w) norms, through the self-check a Mac runs,
in float32, bfloat16 and float16, against the reference; the reference against the model's own
code, bit for bit."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
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
