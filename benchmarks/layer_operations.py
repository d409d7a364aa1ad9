"""A decode step's fused layer operations at the released sizes' shapes, on zero-leaf operands.

`benchmarks.kernel_census` counts their kernels (composed MLX against `gemma_mlx.kernels`) and
the geometry of their launches. Operands are what one decoded token hands each operation at a
context of CONTEXT positions: bfloat16 activations and QAT weights (affine 4-bit, group 32,
bfloat16 scales and biases; the MoE router dense), shapes from `benchmarks.configs.GEMMA4`.
Nothing is evaluated.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from benchmarks.configs import GEMMA4
from benchmarks.graph import zero_leaf
from gemma_mlx.kernels.attention import decode_attention
from gemma_mlx.kernels.heads import attention_heads
from gemma_mlx.kernels.operands import Matrix, Norm, Rotary
from gemma_mlx.kernels.projection import project, project_geglu
from gemma_mlx.kernels.residual import moe_residual, residual
from gemma_mlx.models import gemma4
from gemma_mlx.models.base import make_rope

CONTEXT = 4096
BITS, GROUP = 4, 32
DTYPE = mx.bfloat16

Operation = Callable[[], object]


def matrix(rows: int, columns: int, quantized: bool = True) -> Matrix:
    if not quantized:
        return Matrix(zero_leaf((rows, columns), DTYPE))
    groups = (rows, columns // GROUP)
    return Matrix(
        zero_leaf((rows, columns * BITS // 32), mx.uint32),
        zero_leaf(groups, DTYPE),
        zero_leaf(groups, DTYPE),
        GROUP,
        BITS,
    )


def norm(size: int, eps: float, **kwargs) -> Norm:
    return Norm(zero_leaf((size,), DTYPE), eps, **kwargs)


def row(width: int) -> mx.array:
    return zero_leaf((1, 1, width), DTYPE)


def attention_operations(args: gemma4.ModelArgs, layer: int) -> dict[str, Operation]:
    """The attention half of `layer` (owning its KV) for one decoded token."""
    H, eps = args.hidden_size, args.rms_norm_eps
    D, HQ, HK = args.layer_head_dim(layer), args.num_attention_heads, args.n_kv_heads(layer)
    kind = "sliding" if args.is_sliding(layer) else "full"
    k_eq_v = args.k_eq_v(layer)
    matrices = [matrix(HQ * D, H), matrix(HK * D, H)] + ([] if k_eq_v else [matrix(HK * D, H)])
    rotary = Rotary.of(make_rope(args.rope_parameters[args.layer_types[layer]], D, "census"))
    mx.eval(rotary.freqs)  # computed when the model is built, not per step
    v = None if k_eq_v else row(HK * D)
    cache = zero_leaf((1, HK, CONTEXT + 256, D), DTYPE)[..., :CONTEXT, :]  # a KVCache's slice
    operations = {
        f"input norm + q/k{'' if k_eq_v else '/v'} projections ({kind} layer)": lambda: project(
            row(H), matrices, norm(H, eps)
        ),
        f"attention heads: q/k norms + RoPE, v norm ({kind} layer)": lambda: attention_heads(
            row(HQ * D),
            row(HK * D),
            v,
            norm(D, eps),
            norm(D, eps),
            Norm(None, eps),
            rotary,
            CONTEXT,
        ),
    }
    if kind == "full":
        operations[f"attention over {CONTEXT} positions ({D}-wide heads)"] = lambda: (
            decode_attention(zero_leaf((1, HQ, 1, D), DTYPE), cache, cache, 1.0)
        )
    return operations


def feed_forward_operations(args: gemma4.ModelArgs, layer: int) -> dict[str, Operation]:
    """The residual steps and projections after attention in `layer`."""
    H, eps = args.hidden_size, args.rms_norm_eps
    width = args.mlp_width(layer)
    inputs = [norm(H, eps)] + ([norm(H, eps)] if args.enable_moe_block else [])
    operations = {
        f"residual after attention + {len(inputs)} input norm(s)": lambda: residual(
            row(H), row(H), norm(H, eps), None, inputs
        ),
        "MLP gate/up projections + GeGLU": lambda: project_geglu(
            row(H), matrix(width, H), matrix(width, H)
        ),
        "residual + layer scalar (layer end)": lambda: residual(
            row(H), row(H), norm(H, eps), zero_leaf((1,), DTYPE)
        ),
    }
    if args.hidden_size_per_layer_input:
        P = args.hidden_size_per_layer_input
        operations["per-layer-input gate + GeGLU"] = lambda: project_geglu(
            row(H), matrix(P, H), row(P)
        )
    if args.enable_moe_block:
        router = norm(H, eps, scale=H**-0.5)
        operations["router norm + logits (float32)"] = lambda: project(
            row(H), [matrix(args.num_experts, H, quantized=False)], router, mx.float32
        )
        k = args.top_k_experts
        operations["residual after the MoE block + layer scalar (layer end)"] = lambda: (
            moe_residual(
                row(H),
                row(H),
                zero_leaf((1, k, H), DTYPE),
                zero_leaf((1, 1, k), mx.float32),
                norm(H, eps),
                norm(H, eps),
                norm(H, eps),
                zero_leaf((1,), DTYPE),
            )
        )
    return operations


def arrays(result: object) -> tuple[mx.array, ...]:
    """An operation's outputs as a flat tuple of arrays."""
    if isinstance(result, mx.array):
        return (result,)
    if result is None:
        return ()
    return tuple(a for part in result for a in arrays(part))


def operations(size: str) -> dict[str, Operation]:
    """Every fused operation of one decoded token of `size`: its first (sliding) layer and its
    last (full) layer's attention, its first layer's feed-forward part; each returns its
    outputs as a flat tuple of arrays."""
    args = gemma4.ModelArgs.from_dict(GEMMA4[size])
    last = args.num_hidden_layers - 1
    found = (
        attention_operations(args, 0)
        | attention_operations(args, last)
        | feed_forward_operations(args, 0)
    )
    return {name: (lambda call=call: arrays(call())) for name, call in found.items()}
