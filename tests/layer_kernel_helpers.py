"""Shared pieces of the fused layer kernels' tests (tests/test_kernels_{projection,residual,heads,
attention,layers}.py): the kernel path as a Mac runs it, random operands at production shapes,
exact float64 products and the spacing of each dtype."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from gemma_mlx.kernels.backend import KernelFallbackWarning, use_kernel_factory
from gemma_mlx.kernels.operands import Matrix
from gemma_mlx.models import gemma4

DTYPES = [mx.float32, mx.bfloat16, mx.float16]
MANTISSA_BITS = {mx.float32: 23, mx.bfloat16: 7, mx.float16: 10}


def self_checked(emulator, call: Callable[[], object]) -> tuple[object, int]:
    """`call()` on the kernel path in auto mode, as on a Mac: each kernel instantiation's
    self-check on first use, a fallback failing the test. Returns the result and the launches."""
    with use_kernel_factory(emulator.metal_kernel, mode="auto"), warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        before = emulator.launches
        result = call()
        mx.eval(result)
        return result, emulator.launches - before


def launched(emulator, call: Callable[[], object]) -> tuple[object, int]:
    """`call()` on the kernel path without self-checks; the result and the launches."""
    with use_kernel_factory(emulator.metal_kernel, mode="on"):
        before = emulator.launches
        result = call()
        mx.eval(result)
        return result, emulator.launches - before


def host(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def ulp(values: np.ndarray, dtype: mx.Dtype) -> np.ndarray:
    """The spacing of `dtype` at |values| (its smallest normal spacing below that)."""
    bits = MANTISSA_BITS[dtype]
    smallest = {mx.float32: -126, mx.bfloat16: -126, mx.float16: -14}[dtype]
    exponent = np.floor(np.log2(np.maximum(np.abs(values), 2.0**smallest)))
    return 2.0 ** (exponent - bits)


def random_matrix(
    rows: int, columns: int, bits: int, group: int, dtype: mx.Dtype, key: mx.array
) -> Matrix:
    """A dense matrix (bits 0) or MLX's affine packing with random codes, scales, biases."""
    a, b, c = mx.random.split(key, 3)
    if not bits:
        return Matrix((mx.random.normal((rows, columns), key=a) * 0.05).astype(dtype))
    codes = mx.random.randint(0, 256, (rows, columns * bits // 8), mx.uint8, key=a)
    groups = (rows, columns // group)
    return Matrix(
        codes.view(mx.uint32),
        mx.random.uniform(0.002, 0.02, groups, key=b).astype(dtype),
        mx.random.uniform(-0.05, 0.05, groups, key=c).astype(dtype),
        group,
        bits,
    )


def dequantized(m: Matrix) -> np.ndarray:
    """The matrix's values in float64: scale * code + bias per group, exactly."""
    if not m.quantized:
        return host(m.weight)
    words = np.array(m.weight).astype(np.uint64)
    per_word = 32 // m.bits
    shifts = np.arange(per_word, dtype=np.uint64) * np.uint64(m.bits)
    codes = (words[..., None] >> shifts) & np.uint64((1 << m.bits) - 1)
    codes = codes.reshape(m.rows, -1).astype(np.float64)
    scales = np.repeat(host(m.scales), m.group_size, axis=1)
    biases = np.repeat(host(m.biases), m.group_size, axis=1)
    return scales * codes + biases


def exact_product(x: mx.array, m: Matrix) -> tuple[np.ndarray, np.ndarray]:
    """(x . row, sum |x| |row|) of every row, in float64."""
    w, v = dequantized(m), host(x).reshape(-1)
    return w @ v, np.abs(w) @ np.abs(v)


def assert_rounded_product(got: mx.array, x: mx.array, m: Matrix, where: str) -> None:
    """`got` is x . row rounded to the dtype, up to one unit in its last place and float32
    summation over the row (1e-5 of sum |x| |row|)."""
    exact, magnitude = exact_product(x, m)
    error = np.abs(host(got).reshape(-1) - exact)
    bound = ulp(exact, got.dtype) + 1e-5 * magnitude
    worst = int(np.argmax(error / bound))
    assert (error <= bound).all(), (
        f"{where}: row {worst} is {host(got).reshape(-1)[worst]!r}, exactly {exact[worst]!r}"
    )


def tiny_args(**overrides) -> gemma4.ModelArgs:
    """A two-layer Gemma 4 (a sliding then a full layer) with every per-layer feature the fused
    operations touch: MoE block, per-layer inputs, layer scalar."""
    config = {
        "model_type": "gemma4_text",
        "vocab_size": 128,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "global_head_dim": 32,
        "rms_norm_eps": 1e-6,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
        "max_position_embeddings": 1024,
        "enable_moe_block": True,
        "num_experts": 8,
        "top_k_experts": 2,
        "moe_intermediate_size": 32,
        "hidden_size_per_layer_input": 16,
        "vocab_size_per_layer_input": 128,
    }
    return gemma4.ModelArgs.from_dict(config | overrides)
