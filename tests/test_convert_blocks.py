"""Every exact GGUF type converts to MLX arrays that dequantize bit for bit like gguf-py does."""

from __future__ import annotations

import numpy as np
import pytest
from gemma_mlx.convert.blocks import EXACT_LAYOUTS
from gemma_mlx.convert.mlx_format import dequantize, pack, unpack
from gemma_mlx.convert.tensors import gguf_tensor
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter, quants
from gguf_reference import finish

# Byte offsets of the float16 fields (d, and m/dmin) in each block layout.
HALF_FIELDS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
}


def random_blocks(qtype: T, rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """Random quantized rows with finite, signed, varied float16 scales (the rest random bits)."""
    layout = EXACT_LAYOUTS[qtype]
    n_blocks = rows * columns // layout.block_size
    raw = rng.integers(0, 256, size=(n_blocks, layout.type_size), dtype=np.uint8)
    for offset in HALF_FIELDS[qtype]:
        half = (rng.standard_normal(n_blocks) * 10.0 ** rng.integers(-4, 1, n_blocks)).astype(
            np.float16
        )
        raw[:, offset : offset + 2] = half.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_matches_mlx_layout(bits):
    """Our packing is MLX's: mx.dequantize with scale 1, bias 0 returns the packed integers."""
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 2**bits, size=(3, 128), dtype=np.uint8)
    from gemma_mlx.convert.mlx_format import QuantizedTensor

    ones = np.ones((3, 4), np.float32)
    t = QuantizedTensor(pack(q, bits), ones, np.zeros_like(ones), bits, 32)
    np.testing.assert_array_equal(dequantize(t), q.astype(np.float32))
    np.testing.assert_array_equal(unpack(t.weight, bits), q)


@pytest.mark.parametrize("qtype", list(EXACT_LAYOUTS), ids=lambda t: t.name)
def test_exact_types_are_bit_exact(qtype, tmp_path):
    rng = np.random.default_rng(int(qtype))
    rows, columns = 6, 512
    raw = random_blocks(qtype, rows, columns, rng)
    path = tmp_path / "t.gguf"
    writer = GGUFWriter(path, "gemma3")
    writer.add_tensor("w", raw, raw_dtype=qtype)
    finish(writer)
    tensor = GGUFReader(path).tensors[0]

    converted, record = gguf_tensor("w", tensor.tensor_type, tensor.data, columns)
    expected = quants.dequantize(tensor.data, qtype)
    ours = dequantize(converted.value)
    assert ours.dtype == expected.dtype == np.float32
    # Bit for bit, except that gguf-py's d * 0 keeps the sign of d (-0.0) where MLX gives +0.0.
    np.testing.assert_array_equal(ours, expected)
    nonzero = expected != 0
    np.testing.assert_array_equal(ours[nonzero].view(np.uint32), expected[nonzero].view(np.uint32))
    assert record.exact and record.max_abs_error == 0.0
    assert converted.value.bits == EXACT_LAYOUTS[qtype].bits


def test_k_quant_float16_scales_are_reported_inexact(tmp_path):
    rng = np.random.default_rng(0)
    raw = random_blocks(T.Q4_K, 4, 256, rng)
    converted, record = gguf_tensor("w", T.Q4_K, raw, 256, k_scale_dtype="float16")
    assert converted.value.scales.dtype == np.float16
    expected = quants.dequantize(raw, T.Q4_K)
    assert record.max_abs_error == pytest.approx(
        np.abs(dequantize(converted.value) - expected).max()
    )
    assert 0 < record.max_abs_error < 1e-2 * np.abs(expected).max()


def test_q6_k_is_requantized_with_its_error_reported():
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(4, 210), dtype=np.uint8)  # Q6_K: d (float16) is the last field
    raw[:, 208:210] = np.full(4, 0.01, np.float16).view(np.uint8).reshape(-1, 2)
    converted, record = gguf_tensor("w", T.Q6_K, raw, 256, requant_bits=8)
    expected = quants.dequantize(raw, T.Q6_K)
    error = np.abs(dequantize(converted.value) - expected)
    assert converted.value.bits == 8 and not record.exact
    assert record.max_abs_error == pytest.approx(error.max())
    assert record.mean_abs_error == pytest.approx(error.mean(), rel=1e-6)


def test_q6_k_weight_keeps_its_blocks_exactly():
    """By default a 2-D Q6_K tensor is written as its bytes, measured exact against gguf-py; an
    expert stack (3-D, no layer runs blocks) and `requant_bits` requantize."""
    from gemma_mlx.convert.tensors import GGUFBlocks, gguf_output_nbytes

    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, size=(4, 420), dtype=np.uint8)
    for block in raw.reshape(-1, 210):
        block[208:210] = np.float16(rng.uniform(-0.01, 0.01)).reshape(1).view(np.uint8)
    converted, record = gguf_tensor("w", T.Q6_K, raw, 512)
    assert isinstance(converted.value, GGUFBlocks)
    np.testing.assert_array_equal(converted.value.data, raw)
    assert record.exact and record.bits_per_weight == 6.5625 and record.target == "GGUF Q6_K blocks"
    assert converted.arrays("w.weight") == {"w.weight": converted.value.data}
    stacked, record = gguf_tensor("e", T.Q6_K, raw.reshape(2, 2, 420), 512)
    assert stacked.value.bits == 8 and not record.exact
    assert gguf_output_nbytes(T.Q6_K, 2048, raw.nbytes) == raw.nbytes
    assert gguf_output_nbytes(T.Q6_K, 2048, raw.nbytes, requant_bits=4) == 2048 // 2 + 2048 // 8
    assert gguf_output_nbytes(T.Q6_K, 2048, raw.nbytes, dequantize_all=True) == 2048 * 4
