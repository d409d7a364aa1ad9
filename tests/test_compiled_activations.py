"""RMSNorm and RoPE compiled on the CPU (`gemma_mlx.kernels.activations`): bit for bit MLX's
`mx.fast` operations, in the three dtypes, at the shapes the models use, with fewer operations.
GeGLU (its cube as products, not `x ** 3`): as close to the exact tanh-approximate GELU as
`nn.gelu_approx` is."""

from __future__ import annotations

import io
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from gemma_mlx.kernels.activations import geglu, rms_norm, rope

DTYPES = [mx.float32, mx.bfloat16, mx.float16]


def operations(array: mx.array) -> int:
    dot = io.StringIO()
    mx.export_to_dot(dot, array)
    return len(re.findall(r'label ="[A-Za-z]', dot.getvalue()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 640), (1, 16, 1536), (5, 4, 1, 256), (1, 37, 8, 512)])
def test_rms_norm_is_mx_fast_bit_for_bit(shape, dtype):
    x = (3 * mx.random.normal(shape, key=mx.random.key(0))).astype(dtype)
    for weight in (mx.random.normal(shape[-1:], key=mx.random.key(1)).astype(dtype), None):
        for eps in (1e-6, 1e-5):
            got, want = rms_norm(x, weight, eps), mx.fast.rms_norm(x, weight, eps)
            assert got.dtype == want.dtype and mx.array_equal(got, want).item()
    weight = mx.ones(shape[-1:], dtype)
    assert operations(rms_norm(x, weight, 1e-6)) < operations(mx.fast.rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim,rotated", [(64, 32), (256, 32), (512, 64)])
def test_rope_at_row_positions_is_mx_fast_bit_for_bit(head_dim, rotated, dtype):
    """Rows as one-position sequences at their own positions (the batched pass), default and
    proportional RoPE (infinite wavelengths past `rotated` pairs), with and without scaling."""
    rows = mx.random.normal((16, 4, 1, head_dim), key=mx.random.key(2)).astype(dtype)
    positions = mx.array([3, 900, 17, 0, 5000, 31, 64, 65] * 2, dtype=mx.int32)
    exponents = mx.arange(0, 2 * rotated, 2, dtype=mx.float32) / head_dim
    pad = mx.full((head_dim // 2 - rotated,), mx.inf, mx.float32)
    freqs = mx.concatenate([mx.power(mx.array(1e6), exponents), pad])
    for base, scale, wavelengths in ((10_000.0, 1.0, None), (None, 0.125, freqs)):
        got = rope(rows, head_dim, base, scale, positions, wavelengths)
        want = mx.fast.rope(
            rows, head_dim, traditional=False, base=base, scale=scale, offset=positions,
            freqs=wavelengths,
        )  # fmt: skip
        assert got.dtype == want.dtype and mx.array_equal(got, want).item()
    compiled = operations(rope(rows, head_dim, 10_000.0, 1.0, positions, None))
    fast = mx.fast.rope(
        rows, head_dim, traditional=False, base=10_000.0, scale=1.0, offset=positions
    )
    assert compiled < operations(fast)


def test_rope_at_one_offset_is_not_compiled_per_position():
    """An int offset (a sequence alone) runs as `mx.fast.rope` itself: compiling it would
    trace the function again at every position."""
    x = mx.random.normal((1, 4, 1, 64), key=mx.random.key(3))
    fast = mx.fast.rope(x, 64, traditional=False, base=1e4, scale=1.0, offset=7)
    got = rope(x, 64, 1e4, 1.0, 7, None)
    assert mx.array_equal(got, fast).item() and operations(got) == operations(fast)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_geglu_is_as_close_to_exact_as_gelu_approx(dtype):
    """At an MLP's shape and range, geglu's largest error against the tanh-approximate GELU in
    float64 is within one rounding of `nn.gelu_approx(gate) * up`'s own."""
    gate = (4 * mx.random.normal((16, 6144), key=mx.random.key(3))).astype(dtype)
    up = mx.random.normal((16, 6144), key=mx.random.key(4)).astype(dtype)
    g, u = (np.array(a.astype(mx.float32), dtype=np.float64) for a in (gate, up))
    exact = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3))) * u
    got = geglu(gate, up)
    assert got.dtype == dtype
    ours = np.abs(np.array(got.astype(mx.float32), dtype=np.float64) - exact)
    mlx = np.abs(np.array((nn.gelu_approx(gate) * up).astype(mx.float32), dtype=np.float64) - exact)
    ulp = (
        float(np.finfo(np.float32).eps)
        if dtype == mx.float32
        else {mx.bfloat16: 2**-7, mx.float16: 2**-10}[dtype]
    )
    scale = np.maximum(np.abs(exact), 1.0)
    assert (ours / scale).max() <= (mlx / scale).max() + ulp
