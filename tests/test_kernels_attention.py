"""The decode-attention kernels (`metal/attention_chunks.metal`, `metal/attention_combine.metal`) run
by the CPU emulator with the launches of `gemma_mlx.kernels.attention`: Gemma 4's 512-wide heads
at a 4096-token context (E2B: 8 query heads on one KV head; 31B: 32 on 4), contexts that fill
chunks partly or not at all, keys and values read as slices of a larger cache buffer (the
emulator lays them out with padding, so only their strides find them), through the self-check a
Mac runs, in float32, bfloat16 and float16, against attention computed in float32 (the composed
path rounds scores and weights to the model's dtype, the kernel does not)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from layer_kernel_helpers import DTYPES, host, launched, self_checked

from gemma_mlx.kernels import attention
from gemma_mlx.kernels.tolerance import NORMWISE, normwise_mismatch

# name -> (query heads, KV heads, head dim, positions, cache capacity, scale)
CASES = {
    "E2B full layer, 4096 positions": (8, 1, 512, 4096, 4352, 1.0),
    "31B full layer (32 query heads on 4), 300 positions": (32, 4, 512, 300, 512, 1.0),
    "one partial chunk, a query scale": (8, 2, 512, 5, 256, 0.0625),
    "a single position": (4, 1, 512, 1, 256, 1.0),
}


def operands(case: str, dtype: mx.Dtype):
    HQ, HKV, D, L, capacity, scale = CASES[case]
    keys = mx.random.split(mx.random.key(L), 3)
    q = mx.random.normal((1, HQ, 1, D), key=keys[0]).astype(dtype)
    # Normed keys make scores of order sqrt(D); scaled down to keep the softmax from one-hot.
    buffer_k = (mx.random.normal((1, HKV, capacity, D), key=keys[1]) * 0.1).astype(dtype)
    buffer_v = mx.random.normal((1, HKV, capacity, D), key=keys[2]).astype(dtype)
    return q, buffer_k[..., :L, :], buffer_v[..., :L, :], scale


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_attention_self_checked(emulator, case, dtype):
    q, k, v, scale = operands(case, dtype)
    got, launches = self_checked(emulator, lambda: attention.decode_attention(q, k, v, scale))
    assert launches == 4  # the self-check's two launches, then the call's
    assert got.shape == q.shape and got.dtype == dtype
    exact = attention.float32_attention(q, k, v, scale)
    assert normwise_mismatch(got, exact, dtype) is None, case
    # At least as close to float32 attention as the composed path (to rounding of the output).
    composed = attention.attention_reference(q, k, v, scale)
    ours, theirs = (np.abs(host(a) - host(exact)).max() for a in (got, composed))
    assert ours <= max(theirs, NORMWISE[dtype] * np.abs(host(exact)).max()), case


def test_adversarial_orders(emulator):
    q, k, v, scale = operands("31B full layer (32 query heads on 4), 300 positions", mx.float32)
    got, _ = launched(
        emulator.variant(order="random", fma=True),
        lambda: attention.decode_attention(q, k, v, scale),
    )
    assert normwise_mismatch(got, attention.float32_attention(q, k, v, scale), mx.float32) is None


def test_tolerance_tells_a_shifted_window():
    """Attention over the positions one place off is far outside the tolerance."""
    q, k, v, scale = operands("one partial chunk, a query scale", mx.bfloat16)
    want = attention.float32_attention(q, k[..., 1:, :], v[..., 1:, :], scale)
    shifted = attention.float32_attention(q, k[..., :-1, :], v[..., :-1, :], scale)
    assert normwise_mismatch(shifted, want, mx.bfloat16) is not None


@pytest.mark.parametrize(
    "change",
    ["mask", "two queries", "head size 256", "two sequences"],
)
def test_other_shapes_take_mlx_attention(emulator, change):
    q, k, v, scale = operands("one partial chunk, a query scale", mx.float32)
    mask = None
    if change == "mask":
        mask = mx.ones((1, k.shape[2]), mx.bool_)
    elif change == "two queries":
        q = mx.concatenate([q, q], axis=2)
        mask = "causal"
    elif change == "head size 256":
        q, k, v = q[..., :256], k[..., :256], v[..., :256]
    else:
        q, k, v = (mx.concatenate([a, a]) for a in (q, k, v))
    got, launches = launched(emulator, lambda: attention.decode_attention(q, k, v, scale, mask))
    assert launches == 0
    assert mx.array_equal(got, attention.attention_reference(q, k, v, scale, mask)).item()
