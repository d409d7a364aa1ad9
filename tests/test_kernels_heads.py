"""The attention-heads kernel (`metal/head_norm_rope.metal`) run by the CPU emulator with the
launches of `gemma_mlx.kernels.heads`: the heads of every Gemma 4 layer kind (sliding with the
default RoPE, full with the proportional partial RoPE and k_eq_v, KV-shared with queries only)
and of Gemma 3 (linear RoPE, no V norm), from position 0 to past 4096, through the self-check a
Mac runs, in float32, bfloat16 and float16, against the reference; the reference against the
model's own code, bit for bit."""

from __future__ import annotations

import mlx.core as mx
import pytest
from layer_kernel_helpers import DTYPES, launched, self_checked, tiny_args
from mlx.utils import tree_map

from gemma_mlx.kernels import heads
from gemma_mlx.kernels.operands import Norm, Rotary
from gemma_mlx.models import gemma4
from gemma_mlx.models.base import make_rope

DEFAULT = {"rope_type": "default", "rope_theta": 10_000.0}
PROPORTIONAL = {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}
LINEAR = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}

# name -> (head dim, query heads, KV heads (0: KV-shared), separate values, V norm, RoPE)
CASES = {
    "E2B sliding layer": (256, 8, 1, True, True, DEFAULT),
    "E2B full layer": (512, 8, 1, True, True, PROPORTIONAL),
    "31B full layer, k_eq_v": (512, 32, 4, False, True, PROPORTIONAL),
    "26B-A4B sliding layer": (256, 16, 8, True, True, DEFAULT),
    "E4B KV-shared full layer": (512, 8, 0, False, False, PROPORTIONAL),
    "Gemma 3 full layer (linear RoPE, no V norm)": (256, 4, 1, True, False, LINEAR),
}
POSITIONS = [0, 4095, 130_000]


def operands(case: str, dtype: mx.Dtype, position: int):
    D, HQ, HK, separate_v, v_norm, rope = CASES[case]
    keys = mx.random.split(mx.random.key(HQ * D + HK), 5)

    def heads_of(count: int, key: mx.array) -> mx.array:
        return (mx.random.normal((1, 1, count * D), key=key) * 3).astype(dtype)

    def norm(key: mx.array) -> Norm:
        return Norm(mx.random.uniform(0.5, 1.5, (D,), key=key).astype(dtype), 1e-6)

    rotary = Rotary.of(make_rope(rope, D, "test"))
    if not HK:
        return heads_of(HQ, keys[0]), None, None, norm(keys[3]), None, None, rotary, position
    return (
        heads_of(HQ, keys[0]),
        heads_of(HK, keys[1]),
        heads_of(HK, keys[2]) if separate_v else None,
        norm(keys[3]),
        norm(keys[4]),
        Norm(None, 1e-6) if v_norm else None,
        rotary,
        position,
    )


def present(result) -> tuple[mx.array, ...]:
    return tuple(a for a in result if a is not None)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_heads_self_checked(emulator, case, dtype, position):
    args = operands(case, dtype, position)
    got, launches = self_checked(emulator, lambda: heads.attention_heads(*args))
    assert launches == 2  # the self-check's launch, then the call's
    want = heads.heads_reference(*args)
    assert [a is None for a in got] == [a is None for a in want]
    for a, b in zip(present(got), present(want), strict=True):
        assert a.shape == b.shape and a.dtype == dtype
    assert heads.tolerance_mismatch(got, want, dtype, position) is None, case


def test_adversarial_rounding(emulator):
    args = operands("31B full layer, k_eq_v", mx.float32, 4095)
    got, _ = launched(
        emulator.variant(order="random", fma=True), lambda: heads.attention_heads(*args)
    )
    assert heads.tolerance_mismatch(got, heads.heads_reference(*args), mx.float32, 4095) is None


def test_rotation_has_teeth():
    """A rotation by the wrong angle (the next position) is far outside the tolerance."""
    args = operands("E2B full layer", mx.bfloat16, 4095)
    want = heads.heads_reference(*args)
    wrong = heads.heads_reference(*args[:-1], 4096)
    assert heads.tolerance_mismatch(wrong, want, mx.bfloat16, 4095) is not None


def test_uncovered_operands_take_the_reference(emulator):
    q, k, v, q_norm, k_norm, v_norm, rotary, _ = operands("E2B sliding layer", mx.float32, 0)
    two_tokens = mx.concatenate([q, q], axis=1)
    for args in (
        (two_tokens, None, None, q_norm, None, None, rotary, 3),
        (q, k, v, q_norm, k_norm, v_norm, rotary, mx.array(3)),  # positions of a batch
        (q.astype(mx.bfloat16), k, v, q_norm, k_norm, v_norm, rotary, 3),
    ):
        got, launches = launched(emulator, lambda args=args: heads.attention_heads(*args))
        assert launches == 0
        for a, b in zip(present(got), present(heads.heads_reference(*args)), strict=True):
            assert mx.array_equal(a, b).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", [0, 1], ids=["sliding", "full"])
def test_reference_equals_the_attention_layer(dtype, layer):
    """The attention's composed heads (`_queries`, `_keys_values`, RoPE) written out, against the
    reference on the same modules and projections."""
    args = tiny_args(attention_k_eq_v=True, num_global_key_value_heads=1)
    attention = gemma4.Attention(args, layer)
    attention.update(
        tree_map(lambda p: mx.random.uniform(0.5, 1.5, p.shape), attention.parameters())
    )
    attention.set_dtype(dtype)
    x = mx.random.normal((1, 1, args.hidden_size)).astype(dtype)
    q = attention._queries(x).transpose(0, 2, 1, 3)
    k, v = attention._keys_values(x)
    composed = (
        attention.rope(q, 77),
        attention.rope(k.transpose(0, 2, 1, 3), 77),
        v.transpose(0, 2, 1, 3),
    )
    v_proj = None if attention.k_eq_v else attention.v_proj(x)
    fused = heads.heads_reference(
        attention.q_proj(x),
        attention.k_proj(x),
        v_proj,
        Norm.of(attention.q_norm),
        Norm.of(attention.k_norm),
        Norm.of(attention.v_norm),
        Rotary.of(attention.rope),
        77,
    )
    for a, b in zip(composed, fused, strict=True):
        assert mx.array_equal(a, b).item()
