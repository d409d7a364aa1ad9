"""The emulator itself: Metal's SIMD-group semantics against numpy, loud failures for what would
not behave the same on Metal (unknown builtins, missing barriers, out-of-bounds writes, address
spaces), the adversarial switches (random summation orders, FMA contraction), and metal/select.h's
argmax on rows of NaN and -inf."""

from __future__ import annotations

import platform
import subprocess

import mlx.core as mx
import numpy as np
import pytest
from emulator import EmulatorError
from emulator.harness import fma_flags


def run(
    emulator,
    source: str,
    x: np.ndarray,
    threads: int,
    outputs: int = 1,
    header: str = "",
    output_dtype=mx.float32,
):
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
            output_dtypes=[output_dtype] * outputs,
        )
    ]


@pytest.mark.parametrize("order", ["fixed", "random"])
def test_simd_functions_over_32_lanes(emulator, order):
    emulator = emulator.variant(order=order)
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


# ---- address spaces: what g++ with the prelude accepts and Metal rejects ----------------------

STORE = "inline void store(float* p, float v) { *p = v; }\n"
THREAD_STORE = "inline void store(thread float* p, float v) { *p = v; }\n"


@pytest.mark.parametrize(
    ("header", "source", "problem"),
    [
        ("", "float* p = &y0[0]; p[thread_position_in_grid.x] = x[0];", "`p` is a pointer or"),
        ("", "const float& v = x[0]; y0[thread_position_in_grid.x] = v;", "`v` is a pointer or"),
        (STORE, "store(&y0[thread_position_in_grid.x], x[0]);", "`p` is a pointer or"),
        (THREAD_STORE, "store(&y0[thread_position_in_grid.x], x[0]);", "no matching function"),
        ("", "thread float& v = y0[thread_position_in_grid.x]; v = 1.0f;", "address space"),
        (
            "",
            "threadgroup float tile[64]; device float* p = &tile[0]; y0[0] = p[0];",
            "cannot initialize",
        ),
    ],
    ids=[
        "pointer without address space",
        "reference without address space",
        "parameter without address space",
        "device pointer to a thread parameter",
        "device value bound to a thread reference",
        "threadgroup pointer as a device one",
    ],
)
def test_strictness_check_rejects_address_space_mistakes(emulator, header, source, problem):
    """Each body compiles with g++ and the prelude (address spaces are empty macros there); the
    clang check (C++ for OpenCL) rejects it before g++ runs, naming the line."""
    with pytest.raises(EmulatorError, match="would not compile on Metal") as failure:
        run(emulator, source, np.zeros(64, np.float32), 64, header=header)
    assert problem in str(failure.value)
    assert "<probe body>:1:" in str(failure.value) or "<header>:1:" in str(failure.value)


def test_planted_mistakes_compile_with_gxx_alone(emulator, tmp_path):
    """What the strictness check adds: g++ on the same translation unit accepts the mistakes."""
    from emulator.harness import CXX, CXXFLAGS, HERE, translation_unit
    from emulator.signature import signature

    body = "float* p = &y0[0]; const float& v = x[0]; thread float& w = y0[1]; p[0] = v + w;"
    x = mx.zeros((64,), mx.float32)
    sig = signature("probe", ["x"], ["y0"], body, [x], [mx.float32], (), False)
    unit = tmp_path / "unit.cpp"
    unit.write_text(translation_unit(sig, "", body, "<probe body>"))
    done = subprocess.run(
        [CXX, *CXXFLAGS, f"-I{HERE}", "-fsyntax-only", str(unit)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    with pytest.raises(EmulatorError, match="would not compile on Metal"):
        run(emulator, body, np.zeros(64, np.float32), 64)


# ---- adversarial arithmetic: summation orders and FMA ------------------------------------------

# Lane values whose float32 sum depends on the order of the additions.
ORDER_SENSITIVE = (np.random.default_rng(3).standard_normal(32) * np.logspace(-6, 6, 32)).astype(
    np.float32
)

SUMS = """
    uint i = thread_position_in_grid.x;
    y0[i] = simd_sum(x[i]);
    y1[i] = simd_prefix_exclusive_sum(x[i]);
    y2[i] = simd_prefix_inclusive_sum(x[i]);
"""


def test_random_order_changes_the_bits_of_simd_sums_within_rounding(emulator):
    randomized = emulator.variant(order="random")
    runs = [run(randomized, SUMS, ORDER_SENSITIVE, 32, outputs=3) for _ in range(8)]
    exact = np.cumsum(ORDER_SENSITIVE.astype(np.float64))
    scale = np.abs(ORDER_SENSITIVE).astype(np.float64).sum()
    tolerance = 32 * np.finfo(np.float32).eps * scale
    for total, exclusive, inclusive in runs:
        assert np.all(total == total[0])  # one result for all lanes, whatever the order
        np.testing.assert_allclose(total[0], exact[-1], rtol=0, atol=tolerance)
        np.testing.assert_allclose(inclusive, exact, rtol=0, atol=tolerance)
        np.testing.assert_allclose(exclusive[1:], exact[:-1], rtol=0, atol=tolerance)
        assert exclusive[0] == 0
    for output in range(3):
        assert len({r[output].tobytes() for r in runs}) > 1, f"output {output} never changed"
    fixed = emulator.variant(order="fixed")
    assert (
        len({run(fixed, SUMS, ORDER_SENSITIVE, 32, outputs=3)[0].tobytes() for _ in range(4)}) == 1
    )


def test_fma_build_fuses_multiply_add(emulator):
    """a * b + c with a = b = 1 + 2^-12, c = -(1 + 2^-11): the product rounds to 1 + 2^-11 (the
    2^-24 term is a tie to even), so separately rounded it gives 0, fused 2^-24."""
    a = np.float32(1 + 2.0**-12)
    x = np.array([a, a, -(1 + 2.0**-11)] + [0] * 29, np.float32)
    source = "if (thread_position_in_grid.x == 0) { y0[0] = x[0] * x[1] + x[2]; }"
    assert run(emulator.variant(fma=False), source, x, 32)[0][0] == 0.0
    if "-mfma" in fma_flags() or platform.machine() in ("arm64", "aarch64"):
        assert run(emulator.variant(fma=True), source, x, 32)[0][0] == np.float32(2.0**-24)


# ---- selection (metal/select.h): NaN and -inf rows still give a valid index --------------------

SIMD_ARGMAX = """
    uint i = thread_position_in_grid.x;
    float value = x[i];
    uint index = i;
    simd_argmax(value, index);
    y0[i] = index;
"""
THREADGROUP_ARGMAX = """
    uint i = thread_position_in_grid.x;
    threadgroup float values[4];
    threadgroup uint indices[4];
    float value = x[i];
    uint index = i;
    threadgroup_argmax<4>(
        value, index, values, indices, simdgroup_index_in_threadgroup, thread_index_in_simdgroup);
    y0[i] = index;
"""
# The kernels' pattern: no candidate yet, then each thread's entries t, t + 32, ... (128 here).
ROW_ARGMAX = """
    uint t = thread_position_in_grid.x;
    float best = -INFINITY;
    uint best_index = NO_INDEX;
    for (uint v = t; v < 128; v += 32) {
      if (beats(x[v], v, best, best_index)) {
        best = x[v];
        best_index = v;
      }
    }
    simd_argmax(best, best_index);
    y0[t] = best_index;
"""

NAN, INF = np.float32(np.nan), np.float32(np.inf)


def metal_argmax(values: np.ndarray) -> int:
    """The lowest index of the largest number; the lowest index if there is none (all NaN)."""
    numbers = ~np.isnan(values)
    if not numbers.any():
        return 0
    return int(np.flatnonzero(values == values[numbers].max())[0])


def row(fill, **at) -> np.ndarray:
    x = np.full(128, fill, np.float32)
    for index, value in at.items():
        x[int(index.removeprefix("i"))] = value
    return x


@pytest.mark.parametrize(
    ("x", "want"),
    [
        (row(NAN), 0),
        (row(-INF), 0),
        (row(NAN, i77=-INF), 77),
        (row(NAN, i90=-INF, i40=-INF), 40),
        (row(-INF, i0=NAN, i5=NAN, i64=1.0, i3=1.0), 3),
        (row(0.0, i33=NAN, i100=INF), 100),
    ],
    ids=["all NaN", "all -inf", "NaN and one -inf", "NaN and two -inf", "NaN ignored", "inf"],
)
@pytest.mark.parametrize("pattern", ["simd", "threadgroup", "row"])
def test_argmax_gives_the_lowest_index_of_the_best_never_the_sentinel(emulator, pattern, x, want):
    """NaN ranks below every number (Metal's argmax ignores it) but never leaves "no candidate":
    an all-NaN or all -inf input gives the lowest index taking part, on every thread."""
    from gemma_mlx.kernels.spec import metal_source

    if pattern == "simd":
        source, threads, taking_part = SIMD_ARGMAX, 32, x[:32]
    elif pattern == "threadgroup":
        source, threads, taking_part = THREADGROUP_ARGMAX, 128, x
    else:
        source, threads, taking_part = ROW_ARGMAX, 32, x
    assert metal_argmax(x) == want
    got = run(emulator, source, x, threads, header=metal_source("select.h"), output_dtype=mx.uint32)
    expected = np.full(threads, metal_argmax(taking_part), np.uint32)
    np.testing.assert_array_equal(got[0][:threads], expected)
