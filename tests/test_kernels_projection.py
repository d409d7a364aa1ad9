"""The projection kernels (`metal/projection.metal`, `metal/projection_geglu.metal`) run by the CPU
emulator with the launches of `gemma_mlx.kernels.projection`, at production shapes in float32,
bfloat16 and float16: the products against exact float64 ones (the kernel rounds only its
float32 sums and the result), the input norm, the GeGLU and the router's float32 logits through
the self-check a Mac runs, against the reference with float32 sums; the references against the
model layers' own code, bit for bit."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from layer_kernel_helpers import (
    DTYPES,
    assert_rounded_product,
    host,
    launched,
    random_matrix,
    self_checked,
    tiny_args,
)
from mlx.utils import tree_map

from gemma_mlx.kernels import projection
from gemma_mlx.kernels.activations import geglu
from gemma_mlx.kernels.operands import Matrix, Norm
from gemma_mlx.kernels.tolerance import normwise_mismatch
from gemma_mlx.models import gemma4

# name -> (K, rows of each matrix, bits, group)
PRODUCTS = {
    "E2B q/k/v, 4-bit g32": (1536, (2048, 256, 256), 4, 32),
    "26B-A4B width, 4-bit g32 (a partial last block of the row)": (2816, (512, 256, 256), 4, 32),
    "26B-A4B router, dense": (2816, (128,), 0, 0),
    "8-bit g64, row counts off the 4-row groups": (1536, (250, 6, 1), 8, 64),
    "2-bit g128": (1024, (300, 40), 2, 128),
}


def operands(case: str, dtype: mx.Dtype, seed: int = 0):
    K, rows, bits, group = PRODUCTS[case]
    keys = mx.random.split(mx.random.key(seed), len(rows) + 1)
    x = (mx.random.normal((1, 1, K), key=keys[0]) * 2).astype(dtype)
    matrices = [
        random_matrix(n, K, bits, group, dtype, k) for n, k in zip(rows, keys[1:], strict=True)
    ]
    return x, matrices


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(PRODUCTS))
def test_products_are_the_exact_ones_rounded(emulator, case, dtype):
    x, matrices = operands(case, dtype)
    got, launches = launched(emulator, lambda: projection.project(x, matrices))
    assert launches == 1
    for i, (y, m) in enumerate(zip(got, matrices, strict=True)):
        assert y.shape == (1, 1, m.rows) and y.dtype == dtype
        assert_rounded_product(y, x, m, f"{case}, {dtype}, matrix {i}")


def test_adversarial_summation_orders(emulator):
    """Random SIMD-group sum orders and fused multiply-adds stay within the same bounds."""
    x, matrices = operands("E2B q/k/v, 4-bit g32", mx.float32)
    got, _ = launched(
        emulator.variant(order="random", fma=True), lambda: projection.project(x, matrices)
    )
    for y, m in zip(got, matrices, strict=True):
        assert_rounded_product(y, x, m, "random orders, fma")


def input_norm(K: int, dtype: mx.Dtype, **kwargs) -> Norm:
    weight = mx.random.uniform(0.5, 1.5, (K,), key=mx.random.key(7)).astype(dtype)
    return Norm(weight, 1e-6, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_input_norm_and_qkv_self_checked(emulator, dtype):
    """E2B's input RMSNorm and q/k/v projections: one launch after its self-check."""
    x, matrices = operands("E2B q/k/v, 4-bit g32", dtype, seed=1)
    norm = input_norm(x.shape[-1], dtype)
    got, launches = self_checked(emulator, lambda: projection.project(x, matrices, norm))
    assert launches == 2  # the self-check's launch, then the call's
    want = projection.project_reference(x, matrices, norm, float32_sums=True)
    assert normwise_mismatch(got, want, dtype) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_router_logits_self_checked(emulator, dtype):
    """26B-A4B's router: its norm (weight times 1/sqrt(hidden)), dense logits, float32 out."""
    x, matrices = operands("26B-A4B router, dense", dtype, seed=2)
    norm = input_norm(x.shape[-1], dtype, scale=x.shape[-1] ** -0.5)

    def call():
        return projection.project(x, matrices, norm, out_dtype=mx.float32)

    (got,), launches = self_checked(emulator, call)
    assert launches == 2 and got.dtype == mx.float32
    (want,) = projection.project_reference(x, matrices, norm, mx.float32, float32_sums=True)
    assert normwise_mismatch(got, want, dtype) is None


# name -> (K, rows, bits, group, up: "matrix" or "vector")
GEGLU = {
    "E2B MLP, 4-bit": (1536, 6144, 4, 32, "matrix"),
    "26B-A4B MLP, 4-bit (a partial last block)": (2816, 2112, 4, 32, "matrix"),
    "E2B per-layer-input gate, 4-bit": (1536, 256, 4, 32, "vector"),
    "dense gate and up": (640, 2048, 0, 0, "matrix"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(GEGLU))
def test_geglu_self_checked(emulator, case, dtype):
    K, N, bits, group, up_kind = GEGLU[case]
    keys = mx.random.split(mx.random.key(3), 3)
    x = mx.random.normal((1, 1, K), key=keys[0]).astype(dtype)
    gate = random_matrix(N, K, bits, group, dtype, keys[1])
    if up_kind == "matrix":
        up = random_matrix(N, K, bits, group, dtype, keys[2])
    else:
        up = mx.random.normal((1, 1, N), key=keys[2]).astype(dtype)
    got, launches = self_checked(emulator, lambda: projection.project_geglu(x, gate, up))
    assert launches == 2 and got.shape == (1, 1, N) and got.dtype == dtype
    want = projection.geglu_reference(x, gate, up, float32_sums=True)
    assert normwise_mismatch(got, want, dtype) is None, case
    if dtype != mx.float32:  # the GeGLU rounds as MLX's compiled one: on equal products, equal
        assert np.mean(host(got) == host(want)) > 0.95, case


@pytest.mark.parametrize(
    "make",
    [
        lambda: (mx.zeros((1, 2, 64)), [random_matrix(8, 64, 4, 32, mx.float32, mx.random.key(0))]),
        lambda: (mx.zeros((1, 1, 24)), [random_matrix(8, 24, 0, 0, mx.float32, mx.random.key(0))]),
        lambda: (
            mx.zeros((1, 1, 64)),
            [
                random_matrix(8, 64, 4, 32, mx.float32, mx.random.key(0)),
                random_matrix(8, 64, 8, 32, mx.float32, mx.random.key(1)),
            ],
        ),
        lambda: (
            mx.zeros((1, 1, 64), mx.bfloat16),
            [random_matrix(8, 64, 0, 0, mx.float32, mx.random.key(0))],
        ),
    ],
    ids=["two rows", "K not in 16-value runs", "mixed quantizations", "mixed dtypes"],
)
def test_uncovered_operands_take_the_reference(emulator, make):
    x, matrices = make()
    got, launches = launched(emulator, lambda: projection.project(x, matrices))
    assert launches == 0
    for a, b in zip(got, projection.project_reference(x, matrices), strict=True):
        assert mx.array_equal(a, b).item()


def test_too_many_matrices_is_an_error():
    m = random_matrix(4, 16, 0, 0, mx.float32, mx.random.key(0))
    with pytest.raises(ValueError, match="1 to 3 matrices"):
        projection.project(mx.zeros((1, 1, 16)), [m] * 4)


# --- the references are the model layers' own code -------------------------------------------


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "4-bit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_references_equal_the_layers(dtype, quantized):
    """What the model computed before the fused operations, written out, against their
    references on the same modules: equal bit for bit."""
    args = tiny_args()
    mx.random.seed(4)
    layer = gemma4.DecoderLayer(args, 0)
    layer.update(tree_map(lambda p: mx.random.uniform(0.5, 1.5, p.shape), layer.parameters()))
    if quantized:
        nn.quantize(
            layer,
            32,
            4,
            class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 32 == 0,
        )
    layer.set_dtype(dtype)
    x = mx.random.normal((1, 1, args.hidden_size)).astype(dtype)
    attn, mlp, router = layer.self_attn, layer.mlp, layer.router

    normed = layer.input_layernorm(x)
    composed = [attn.q_proj(normed), attn.k_proj(normed)]
    fused = projection.project_reference(
        x, [Matrix.of(attn.q_proj), Matrix.of(attn.k_proj)], Norm.of(layer.input_layernorm)
    )
    composed.append(geglu(mlp.gate_proj(x), mlp.up_proj(x)))
    fused += (projection.geglu_reference(x, Matrix.of(mlp.gate_proj), Matrix.of(mlp.up_proj)),)
    scaled = router.scale * router.root_size
    composed.append(router.proj(mx.fast.rms_norm(x, scaled, router.eps)).astype(mx.float32))
    fused += projection.project_reference(
        x,
        [Matrix.of(router.proj)],
        Norm(router.scale, router.eps, scale=router.root_size),
        mx.float32,
    )
    for a, b in zip(composed, fused, strict=True):
        assert mx.array_equal(a, b).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_normwise_tolerance_catches_rows_out_of_place(dtype):
    """The tolerance the self-checks use tells rows one place off from rounding."""
    x, matrices = operands("E2B q/k/v, 4-bit g32", dtype)
    (want,) = projection.project_reference(x, matrices[:1], float32_sums=True)
    assert normwise_mismatch(mx.roll(want, 1, axis=-1), want, dtype) is not None
    assert normwise_mismatch(want, want, dtype) is None
