"""The Q6_K kernels (`metal/q6k_rows.metal`, `metal/q6k_matmul.metal`) run by the CPU emulator with
the launches of `gemma_mlx.kernels.q6k`, against the composed reference; the reference against
gguf-py's own Q6_K decoder, bit for bit."""

from __future__ import annotations

import warnings

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants
from test_kernels_fallback import broken_source

from gemma_mlx.kernels import q6k
from gemma_mlx.kernels.backend import KernelFallbackWarning, use_kernel_factory

CASES = 120
DTYPES = (mx.float32, mx.bfloat16, mx.float16)
# The widths of the released Gemma 4 sizes (E2B, E4B, 26B-A4B, 12B, 31B): 6 to 21 blocks a row.
PRODUCTION_WIDTHS = (1536, 2560, 2816, 3840, 5376)
VOCAB = 262_144


def random_blocks(
    rng: np.random.Generator, rows: int, columns: int, decades: tuple[int, int] = (-5, -2)
) -> np.ndarray:
    """Random Q6_K rows: random codes and sub-block scales (both signs), d of either sign with
    a magnitude in 10 ** `decades` (weights up to 127 * 32 * d: real tables have d ~ 1e-4)."""
    n = rows * columns // q6k.BLOCK_WEIGHTS
    raw = rng.integers(0, 256, size=(n, q6k.BLOCK_BYTES), dtype=np.uint8)
    d = rng.choice([-1, 1], n) * 10.0 ** rng.uniform(*decades, n)
    raw[:, 208:210] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def exact_rows(raw: np.ndarray) -> np.ndarray:
    return quants.dequantize(raw, T.Q6_K)


def test_reference_decodes_like_gguf_py_bit_for_bit():
    """Over eight decades of d, float16 subnormals included."""
    raw = random_blocks(np.random.default_rng(0), 37, 768, decades=(-7, 1))
    ours = np.asarray(q6k.decode(mx.array(raw)))
    expected = exact_rows(raw)
    assert ours.dtype == expected.dtype == np.float32
    np.testing.assert_array_equal(ours.view(np.uint32), expected.view(np.uint32))
    # Chunked: several row chunks of a wide table.
    chunked = np.asarray(q6k.dequantize(mx.array(np.concatenate([raw] * 4))))
    np.testing.assert_array_equal(
        chunked.view(np.uint32), np.concatenate([expected] * 4).view(np.uint32)
    )


def product_tolerance(x: np.ndarray, table: np.ndarray, dtype: mx.Dtype) -> np.ndarray:
    """float32 summation in another order (1e-6 of sum |x||w|), plus the output's rounding."""
    exact = x.astype(np.float64) @ table.T.astype(np.float64)
    eps = {mx.float32: 2**-24, mx.float16: 2**-11, mx.bfloat16: 2**-8}[dtype]
    return 1e-6 * (np.abs(x) @ np.abs(table).T) + 2 * eps * np.abs(exact)


def kernel_case(rng: np.random.Generator, i: int):
    """Tables whose row count is no multiple of the threadgroup's 4 rows, odd and even block
    counts (the two half-SIMD-groups), 1 to 8 rows of x (each a kernel instantiation: 4 of the 8
    keep the emulator's compilations few), every dtype, both output dtypes."""
    dtype = DTYPES[i % 3]
    columns = (256, 512, 768, 1280)[(i // 3) % 4]
    rows = int(rng.integers(1, 40))
    M = (1, 2, 3, 8)[(i // 12) % 4]
    out_dtype = mx.float32 if i % 2 else dtype
    raw = random_blocks(rng, rows, columns)
    x = mx.array(rng.standard_normal((M, columns)).astype(np.float32)).astype(dtype)
    return raw, x, out_dtype


def test_matmul_kernel_matches_reference(kernels):
    rng = np.random.default_rng(1)
    before = kernels.launches
    for i in range(CASES):
        raw, x, out_dtype = kernel_case(rng, i)
        blocks = mx.array(raw)
        got = q6k.matmul(x, blocks, out_dtype)
        want = q6k.matmul_reference(x, blocks, out_dtype)
        assert got.dtype == out_dtype and got.shape == want.shape
        x32 = np.asarray(x.astype(mx.float32))
        exact = x32.astype(np.float64) @ exact_rows(raw).T.astype(np.float64)
        error = np.abs(np.asarray(got.astype(mx.float32)) - exact)
        assert (error <= product_tolerance(x32, exact_rows(raw), out_dtype)).all(), f"case {i}"
    assert kernels.launches - before == CASES


def test_rows_kernel_matches_reference(kernels):
    """Exact: each weight is computed exactly in float32 and rounded once. Fewer than 8 ids are
    passed as `constant` (MLX's small-input rule), more as `device`."""
    rng = np.random.default_rng(2)
    before = kernels.launches
    for i in range(CASES):
        dtype = DTYPES[i % 3]
        columns = (256, 768, 1280, 4096)[(i // 3) % 4]
        rows = int(rng.integers(1, 30))
        raw = random_blocks(rng, rows, columns)
        ids = rng.integers(0, rows, int(rng.integers(1, 13)))
        ids = mx.array(ids.astype(np.int32 if i % 2 else np.uint32))
        got = q6k.rows(mx.array(raw), ids, dtype)
        want = mx.array(exact_rows(raw)[np.asarray(ids)]).astype(dtype)
        assert got.dtype == dtype
        assert mx.array_equal(got, want).item(), f"case {i}"
    assert kernels.launches - before == CASES


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_production_widths(kernels, dtype):
    """The released widths (6 to 21 blocks a row) at a few rows, 4 rows of x (a verify window)."""
    rng = np.random.default_rng(3)
    for columns in PRODUCTION_WIDTHS:
        raw = random_blocks(rng, 9, columns)
        x = mx.array(rng.standard_normal((4, columns)).astype(np.float32)).astype(dtype)
        got = np.asarray(q6k.matmul(x, mx.array(raw), mx.float32))
        x32 = np.asarray(x.astype(mx.float32))
        exact = x32.astype(np.float64) @ exact_rows(raw).T.astype(np.float64)
        assert (np.abs(got - exact) <= product_tolerance(x32, exact_rows(raw), mx.float32)).all()
        ids = mx.array([8, 0, 3])
        want = mx.array(exact_rows(raw)[[8, 0, 3]]).astype(dtype)
        assert mx.array_equal(q6k.rows(mx.array(raw), ids, dtype), want).item()


def test_whole_vocabulary(kernels):
    """A 262,144-row head (65,536 threadgroups; the emulator runs all 8.4M threads, ~20 s, so one
    width of 1 block and one dtype: x's dtype changes no index)."""
    rng = np.random.default_rng(7)
    dtype = mx.bfloat16
    raw = random_blocks(rng, VOCAB, 256)
    x = mx.array(rng.standard_normal((1, 256)).astype(np.float32)).astype(dtype)
    got = np.asarray(q6k.matmul(x, mx.array(raw), mx.float32))
    x32 = np.asarray(x.astype(mx.float32))
    table = np.asarray(q6k.decode(mx.array(raw)))  # gguf-py's decoder, bit for bit (above)
    exact = x32.astype(np.float64) @ table.T.astype(np.float64)
    assert got.shape == (1, VOCAB)
    assert (np.abs(got - exact) <= product_tolerance(x32, table, mx.float32)).all()
    ids = mx.array([VOCAB - 1, 0, 131_072])
    want = mx.array(table[[VOCAB - 1, 0, 131_072]]).astype(dtype)
    assert mx.array_equal(q6k.rows(mx.array(raw), ids, dtype), want).item()


def test_launches_per_call(kernels):
    """Up to 8 rows of x per launch; past 64 rows, and for empty inputs, the reference."""
    rng = np.random.default_rng(4)
    blocks = mx.array(random_blocks(rng, 5, 256))
    for M, launches in ((1, 1), (8, 1), (9, 2), (64, 8), (65, 0), (0, 0)):
        x = mx.array(rng.standard_normal((M, 256)).astype(np.float32))
        before = kernels.launches
        got = q6k.matmul(x, blocks, mx.float32)
        assert got.shape == (M, 5)
        assert kernels.launches - before == launches, M
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(q6k.matmul_reference(x, blocks, mx.float32)), atol=1e-4
        )
    before = kernels.launches
    assert q6k.rows(blocks, mx.zeros((0,), mx.int32), mx.float32).shape == (0, 256)
    assert q6k.rows(blocks, mx.array([[1, 2], [3, 4]]), mx.float32).shape == (2, 2, 256)
    assert kernels.launches - before == 1


def test_reference_decodes_the_table_once_per_product(monkeypatch):
    """Without Metal all rows of x go to one reference call, which decodes the table once (it
    was once per 8 rows: a 64-token prefill decoded a 262,144-row head 8 times)."""
    decoded = []
    decode = q6k.decode
    monkeypatch.setattr(
        q6k, "decode", lambda blocks: decoded.append(blocks.shape) or decode(blocks)
    )
    raw = random_blocks(np.random.default_rng(10), 5, 256)
    x = mx.array(np.random.default_rng(11).standard_normal((64, 256)).astype(np.float32))
    got = np.asarray(q6k.matmul(x, mx.array(raw), mx.float32))
    assert decoded == [(5, 210)]
    exact = np.asarray(x, np.float64) @ exact_rows(raw).T.astype(np.float64)
    assert (
        np.abs(got - exact) <= product_tolerance(np.asarray(x), exact_rows(raw), mx.float32)
    ).all()


def test_bad_arguments_name_the_operation():
    blocks = mx.zeros((4, 210), mx.uint8)
    with pytest.raises(ValueError, match=r"q6k\.matmul: x has 128 columns, the table 256"):
        q6k.matmul(mx.zeros((1, 128)), blocks, mx.float32)
    with pytest.raises(ValueError, match=r"q6k\.rows: expected Q6_K blocks"):
        q6k.rows(mx.zeros((4, 256)), mx.array([0]), mx.float32)
    with pytest.raises(ValueError, match="ids must be integers"):
        q6k.rows(blocks, mx.array([0.0]), mx.float32)


def test_self_check_tolerates_summation_order(emulator):
    """On Metal the lanes' sum may run in any order and multiply-adds may fuse: the self-check
    accepts that (no fallback) and the result stays within float32 summation error."""
    rng = np.random.default_rng(5)
    raw = random_blocks(rng, 50, 2816)
    x = mx.array(rng.standard_normal((3, 2816)).astype(np.float32)).astype(mx.bfloat16)
    adversarial = emulator.variant(order="random", fma=True)
    with use_kernel_factory(adversarial.metal_kernel, mode="auto"), warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        before = adversarial.launches
        got = np.asarray(q6k.matmul(x, mx.array(raw), mx.float32))
        q6k.matmul(x, mx.array(raw), mx.float32)
        assert adversarial.launches - before == 3  # the self-check once, then one per call
    x32 = np.asarray(x.astype(mx.float32))
    exact = x32.astype(np.float64) @ exact_rows(raw).T.astype(np.float64)
    assert (np.abs(got - exact) <= product_tolerance(x32, exact_rows(raw), mx.float32)).all()


@pytest.mark.parametrize("operation", ["matmul", "rows"])
def test_broken_kernel_warns_once_and_falls_back(emulator, operation):
    rng = np.random.default_rng(6)
    blocks = mx.array(random_blocks(rng, 6, 512))
    x = mx.array(rng.standard_normal((2, 512)).astype(np.float32))
    ids = mx.array([5, 0, 2])

    def call():
        if operation == "matmul":
            return q6k.matmul(x, blocks, mx.float32), q6k.matmul_reference(x, blocks, mx.float32)
        return q6k.rows(blocks, ids, mx.float32), q6k.rows_reference(blocks, ids, mx.float32)

    with (
        use_kernel_factory(broken_source(emulator), mode="auto"),
        pytest.warns(KernelFallbackWarning, match=f"q6k.{operation}") as caught,
    ):
        results = [call(), call()]
    assert len(caught) == 1
    for got, want in results:
        assert mx.array_equal(got, want).item()
