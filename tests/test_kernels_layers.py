"""The fused layer kernels inside the model: a decode step of every tiny variant (Gemma 4 E2B, E4B,
12B, 26B-A4B, 31B-like, Gemma 3) with the kernel path run by the CPU emulator as on a Mac
(self-checked, a fallback failing the test) gives transformers' logits as closely as the
composed path does (tests/test_model_parity.py's tolerance), and launches each fused kernel; the
same in bfloat16 with 4-bit weights against the composed path. And for every kernel the source
the emulator compiles is the one MLX generates, which passes the strictness check."""

from __future__ import annotations

import warnings
from collections import Counter

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from emulator.harness import check_address_spaces
from hf_reference import VARIANTS, VOCAB, WINDOW, reference_logits
from layer_kernel_helpers import DTYPES, random_matrix
from test_kernels_source import trace

from gemma_mlx.kernels import attention, heads, projection, residual
from gemma_mlx.kernels.backend import KernelFallbackWarning, use_kernel_factory
from gemma_mlx.kernels.operands import Matrix, Norm, Rotary
from gemma_mlx.loading import load_model
from gemma_mlx.models.base import make_rope

PROMPT_LENGTH = 3 * WINDOW + 6  # past the sliding window, as test_model_parity's prompt
LAYER_KERNELS = {
    "projection",
    "projection_geglu",
    "residual_norm",
    "head_norm_rope",
    "attention_chunks",  # the tiny heads (16 and 32 wide) are not MLX's either
    "attention_combine",
}


def on_kernels(emulator, call):
    """`call()` with the kernels run by the emulator in auto mode (self-checked, as on a Mac),
    a fallback warning failing the test; the result and the launches by kernel name."""
    launches: Counter[str] = Counter()

    def factory(**kwargs):
        kernel = emulator.metal_kernel(**kwargs)

        def launch(**call_args):
            launches[kwargs["name"]] += 1
            return kernel(**call_args)

        return launch

    with use_kernel_factory(factory, mode="auto"), warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        result = call()
        mx.eval(result)
    return result, launches


def decode_last(model: nn.Module, tokens: list[int]):
    """The model after a prefill of all but the last token (composed): a call that decodes it."""
    cache = model.make_cache()
    mx.eval(model(mx.array([tokens[:-1]]), cache))
    return lambda: model(mx.array([tokens[-1:]]), cache)[0, -1]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_step_on_the_kernels_matches_transformers(emulator, reference_checkpoints, variant):
    directory, torch_model = reference_checkpoints(variant)
    tokens = np.random.default_rng(1).integers(1, VOCAB, PROMPT_LENGTH).tolist()
    expected = reference_logits(torch_model, tokens)[-1]
    model = load_model(directory)
    composed = np.array(decode_last(model, tokens)())
    got, launches = on_kernels(emulator, decode_last(model, tokens))
    ours = np.array(got)
    assert np.abs(ours - expected).max() <= 1e-4  # test_model_parity's last-position bound
    assert np.abs(ours - composed).max() <= 1e-4
    assert expected.std() > 0.1
    assert set(launches) >= LAYER_KERNELS, variant
    assert ("moe_residual" in launches) == (variant == "26b-a4b")
    layers = len(model.layers)
    assert launches["head_norm_rope"] >= layers and launches["projection"] >= layers


@pytest.mark.parametrize("variant", ["e2b", "12b", "31b", "gemma3"])
def test_decode_step_in_bfloat16_with_4_bit_weights(emulator, reference_checkpoints, variant):
    """The Mac's setting: bfloat16 activations and 4-bit weights, so the quantized kernels run.
    Both paths carry bfloat16's rounding through the layers (the prefill's cache included); the
    kernels' logits are about as far from the same weights computed in float32 as the composed
    path's (which sums quantized products in bfloat16 on the CPU), normwise. That rounding moves
    these tiny models' logits by ~10%, more than their top-2 margins at some prompts, so the two
    paths' greedy tokens may differ there (each path's error is noise of the same size: over
    E2B, E4B, 12B, 31B and Gemma 3 at four prompts the kernels' was 0.68-1.25x the composed
    path's). 26B-A4B cannot run here in bfloat16: its 24-wide experts do not quantize at group 32
    and MLX's CPU gather_mm takes only float32."""
    directory, _ = reference_checkpoints(variant)
    tokens = np.random.default_rng(2).integers(1, VOCAB, PROMPT_LENGTH).tolist()

    def model_in(dtype: mx.Dtype) -> nn.Module:
        model = load_model(directory)
        nn.quantize(model, 32, 4, class_predicate=lambda _, m: _quantizable(m))
        model.set_dtype(mx.bfloat16)  # the same bfloat16 weights, scales and biases for all
        model.set_dtype(dtype)
        return model

    exact = np.array(decode_last(model_in(mx.float32), tokens)())
    model = model_in(mx.bfloat16)
    composed = np.array(decode_last(model, tokens)().astype(mx.float32))
    got, launches = on_kernels(emulator, decode_last(model, tokens))
    ours = np.array(got.astype(mx.float32))
    assert set(launches) >= LAYER_KERNELS
    ours_error, composed_error = (
        np.linalg.norm(a - exact) / np.linalg.norm(exact) for a in (ours, composed)
    )
    assert ours_error <= 1.5 * composed_error, (ours_error, composed_error)


def _quantizable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and module.weight.shape[-1] % 32 == 0


# --- the generated source: MLX's own, and strict ----------------------------------------------


def source_cases(dtype: mx.Dtype) -> dict:
    """name -> (operation, traced input arrays): one call per kernel and instantiation kind,
    with inputs small enough to reach the kernel as `constant` where the model passes such."""
    key = mx.random.key(0)
    m4 = random_matrix(48, 64, 4, 32, dtype, key)
    dense = random_matrix(6, 64, 0, 0, dtype, key)
    w = mx.ones((64,), dtype)

    def quantized_projection(x, weight, scales, biases, norm_w):
        m = Matrix(weight, scales, biases, 32, 4)
        return projection.project(x, [m, m, m], Norm(norm_w, 1e-6))

    def router(x, weight, norm_w):
        norm = Norm(norm_w, 1e-6, scale=0.125)
        return projection.project(x, [Matrix(weight)], norm, mx.float32)

    def geglu(x, weight, scales, biases):
        m = Matrix(weight, scales, biases, 32, 4)
        return projection.project_geglu(x, m, m)

    def gate(x, weight, up):  # 6 entries: `up` passed as constant
        return projection.project_geglu(x, Matrix(weight), up)

    def residual_norms(r, a, w):
        return residual.residual(r, a, Norm(w, 1e-6), None, [Norm(w, 1e-6)] * 2)

    def residual_end(r, a, w, scalar):
        return residual.residual(r, a, Norm(w, 1e-6), scalar)

    def moe_end(h, y, weights, w, scalar):
        norm = Norm(w, 1e-6)
        return residual.moe_residual(h, h, y, weights, norm, norm, norm, scalar)

    def heads_of(width: int, kv: int, rope: dict):
        rotary = Rotary.of(make_rope(rope, width, "source"))
        mx.eval(rotary.freqs)

        def call(q, k, v, q_w):
            norm = Norm(q_w, 1e-6)
            if not kv:
                return heads.attention_heads(q, None, None, norm, None, None, rotary, 9)[0]
            return heads.attention_heads(q, k, v, norm, norm, Norm(None, 1e-6), rotary, 9)

        return call

    def attention_of(q, k, v):
        return attention.decode_attention(q, k, v, 1.0)

    x = mx.ones((1, 1, 64), dtype)
    proportional = {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}
    return {
        "projection, 4-bit, input norm": (
            quantized_projection,
            [x, m4.weight, m4.scales, m4.biases, w],
        ),
        "projection, dense router to float32": (router, [x, dense.weight, w]),
        "projection_geglu, 4-bit": (geglu, [x, m4.weight, m4.scales, m4.biases]),
        "projection_geglu, dense gate, vector up": (gate, [x, dense.weight, mx.ones((6,), dtype)]),
        "residual_norm, two norms": (residual_norms, [x, x, w]),
        "residual_norm, layer scalar": (residual_end, [x, x, w, mx.ones((1,), dtype)]),
        "moe_residual, 4 experts": (
            moe_end,
            [x, mx.ones((1, 4, 64), dtype), mx.ones((1, 4), mx.float32), w, mx.ones((1,), dtype)],
        ),
        "head_norm_rope, 256 wide": (
            heads_of(256, 1, {"rope_type": "default", "rope_theta": 1e4}),
            [mx.ones(s, dtype) for s in ((1, 1, 512), (1, 1, 256), (1, 1, 256), (256,))],
        ),
        "head_norm_rope, 512 wide proportional, queries only": (
            heads_of(512, 0, proportional),
            [mx.ones((1, 1, 1024), dtype), x, x, mx.ones((512,), dtype)],
        ),
        "attention_chunks and attention_combine": (
            attention_of,
            [mx.ones(s, dtype) for s in ((1, 2, 1, 512), (1, 1, 9, 512), (1, 1, 9, 512))],
        ),
    }


def flat(result: object) -> list[mx.array]:
    """An operation's outputs as a flat list of arrays (what `mx.export_function` takes)."""
    if isinstance(result, mx.array):
        return [result]
    return [a for part in result if part is not None for a in flat(part)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulator_source_equals_mlx_source_and_is_strict(dtype):
    for name, (operation, arrays) in source_cases(dtype).items():
        printed, launches = trace(lambda *a, op=operation: flat(op(*a)), arrays)
        assert launches, f"{name}: no kernel launched (the operation took its reference path)"
        assert [n for n, _ in printed] == [k.name for k in launches], name
        for (kernel, theirs), launched in zip(printed, launches, strict=True):
            assert launched.source == theirs, f"{name}: {kernel}'s source differs from MLX's"
            check_address_spaces(launched.sig, launched.header, launched.body, kernel)
