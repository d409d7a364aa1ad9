"""The emulator itself: Metal's SIMD-group semantics against numpy, and loud failures for what
would not behave the same on Metal (unknown builtins, missing barriers, out-of-bounds writes)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from emulator import EmulatorError


def run(emulator, source: str, x: np.ndarray, threads: int, outputs: int = 1, header: str = ""):
    kernel = emulator.metal_kernel(
        name="probe",
        input_names=["x"],
        output_names=[f"y{i}" for i in range(outputs)],
        source=source,
        header=header,
    )
    return [
        np.array(y)
        for y in kernel(
            inputs=[mx.array(x)],
            grid=(threads, 1, 1),
            threadgroup=(threads, 1, 1),
            output_shapes=[x.shape] * outputs,
            output_dtypes=[mx.float32] * outputs,
        )
    ]


def test_simd_functions_over_32_lanes(emulator):
    x = np.random.default_rng(0).integers(-50, 50, 64).astype(np.float32)
    source = """
        uint i = thread_position_in_grid.x;
        float v = x[i];
        y0[i] = simd_sum(v);
        y1[i] = simd_prefix_exclusive_sum(v);
        y2[i] = simd_shuffle_xor(v, ushort(5));
        y3[i] = float(uint64_t(simd_ballot(v > 0.0f)) >> thread_index_in_simdgroup & 1);
        y4[i] = simd_max(v);
    """
    got = run(emulator, source, x, 64, outputs=5)
    lanes = x.reshape(2, 32)
    np.testing.assert_array_equal(got[0], np.repeat(lanes.sum(1), 32))
    np.testing.assert_array_equal(got[1], (np.cumsum(lanes, 1) - lanes).ravel())
    np.testing.assert_array_equal(got[2], lanes[:, np.arange(32) ^ 5].ravel())
    np.testing.assert_array_equal(got[3], (x > 0).astype(np.float32))
    np.testing.assert_array_equal(got[4], np.repeat(lanes.max(1), 32))


def test_bfloat_and_half_round_like_mlx(emulator):
    x = np.random.default_rng(1).standard_normal(64).astype(np.float32) * 100
    source = """
        uint i = thread_position_in_grid.x;
        y0[i] = float(bfloat16_t(x[i]));
        y1[i] = float(half(x[i]));
    """
    got = run(emulator, source, x, 64, outputs=2)
    np.testing.assert_array_equal(
        got[0], np.array(mx.array(x).astype(mx.bfloat16).astype(mx.float32))
    )
    np.testing.assert_array_equal(got[1], x.astype(np.float16).astype(np.float32))


def test_missing_barrier_shows_as_a_wrong_result(emulator):
    """Each thread reads its neighbour's threadgroup slot; without the barrier, some run before
    the neighbour wrote it (the emulator shuffles the order of threads between barriers)."""
    x = np.arange(64, dtype=np.float32)
    source = """
        uint t = thread_index_in_threadgroup;
        threadgroup float tile[64];
        tile[t] = x[t];
        %s
        y0[t] = tile[(t + 1) %% 64];
    """
    want = np.roll(x, -1)
    np.testing.assert_array_equal(
        run(emulator, source % "threadgroup_barrier(mem_flags::mem_threadgroup);", x, 64)[0], want
    )
    assert not np.array_equal(run(emulator, source % "", x, 64)[0], want)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("y0[0] = metal::erf(x[0]);", "erf"),  # a builtin the prelude does not implement
        ("y0[thread_position_in_grid.x + 64] = 1.0f;", "outside buffer `y0`"),
        (
            "if (thread_index_in_threadgroup < 16) { threadgroup_barrier(mem_flags::mem_threadgroup); }",
            "cannot make progress",
        ),
        ("const device float* p = x; y0[0] = p[0];", "address space"),
    ],
    ids=["unknown builtin", "out of bounds", "divergent barrier", "address space"],
)
def test_what_metal_would_not_run_the_same_fails_loudly(emulator, source, message):
    with pytest.raises(EmulatorError, match=message):
        run(emulator, source, np.zeros(64, np.float32), 64)
