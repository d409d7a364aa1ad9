"""What the emulator gained for the fused layer kernels: the math builtins they call (exp2,
precise rsqrt and tanh, fast cos and sin) against numpy, and inputs passed as they stand
(`ensure_row_contiguous=False`) laid out as a slice of a larger buffer, so that only a kernel
reading them through their strides gets their values."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

MATH = """
  uint i = thread_position_in_grid.x;
  float v = x[i];
  y0[i] = metal::exp2(v);
  y1[i] = metal::precise::rsqrt(metal::abs(v) + 1.0f);
  y2[i] = metal::precise::tanh(v);
  y3[i] = metal::fast::cos(v * 100.0f);
  y4[i] = metal::fast::sin(v * 100.0f);
"""


def test_math_builtins(emulator):
    x = np.random.default_rng(0).uniform(-8, 8, 64).astype(np.float32)
    kernel = emulator.metal_kernel(
        name="math_probe", input_names=["x"], output_names=[f"y{i}" for i in range(5)], source=MATH
    )
    got = kernel(
        inputs=[mx.array(x)],
        grid=(64, 1, 1),
        threadgroup=(64, 1, 1),
        output_shapes=[x.shape] * 5,
        output_dtypes=[mx.float32] * 5,
    )
    x64 = x.astype(np.float64)
    wide = (x * np.float32(100)).astype(np.float64)
    want = [
        np.exp2(x64),
        1 / np.sqrt(np.abs(x64) + 1),
        np.tanh(x64),
        np.cos(wide),
        np.sin(wide),
    ]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.array(a), b, rtol=1e-6, atol=1e-6)


STRIDED = """
  uint row = thread_position_in_grid.y;
  uint column = thread_position_in_grid.x;
  y[row * x_shape[1] + column] = x[row * x_strides[0] + column * x_strides[1]];
"""
IGNORES_STRIDES = """
  uint row = thread_position_in_grid.y;
  uint column = thread_position_in_grid.x;
  y[row * x_shape[1] + column] = x[row * x_shape[1] + column];
"""


@pytest.mark.parametrize("source, reads_values", [(STRIDED, True), (IGNORES_STRIDES, False)])
def test_inputs_as_they_stand_need_their_strides(emulator, source, reads_values):
    x = np.arange(6 * 40, dtype=np.float32).reshape(6, 40)
    kernel = emulator.metal_kernel(
        name="strided_probe",
        input_names=["x"],
        output_names=["y"],
        source=source,
        ensure_row_contiguous=False,
    )
    (y,) = kernel(
        inputs=[mx.array(x)],
        grid=(40, 6, 1),
        threadgroup=(40, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[mx.float32],
    )
    assert np.array_equal(np.array(y), x) == reads_values
