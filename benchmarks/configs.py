"""Gemma 4 text configs as data: the five released sizes, and tiny shapes of the same structure.

The real configs are the sizes table of docs/architecture.md (E2B/E4B/26B-A4B/31B from Google's
code, the 12B from third-party copies of its config.json). Every key is written out,
because mlx-lm's `gemma4_text.ModelArgs` defaults (PLE 256, 20 KV-shared layers, double-wide MLP)
would silently turn on E2B features for a config that omits them.

A tiny config keeps what makes its size class different (PLE and KV sharing, double-wide MLP,
k_eq_v full layers with their own KV-head count, the MoE block) at about 1/12 of the width and two
periods of the layer pattern, so CI can run every structure in seconds.
"""

from __future__ import annotations

from typing import Any

SLIDING, FULL = "sliding_attention", "full_attention"
VOCAB = 262144
TINY_VOCAB = 4096
TINY_WINDOW = 128


def layer_types(num_layers: int, period: int) -> list[str]:
    """`period - 1` sliding layers then one full layer, repeated; the last layer is full."""
    return [FULL if (i + 1) % period == 0 else SLIDING for i in range(num_layers)]


def _gemma4(
    *,
    hidden: int,
    layers: int,
    period: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    window: int,
    full_kv_heads: int | None = None,
    ple: int = 0,
    kv_shared: int = 0,
    double_wide: bool = False,
    experts: tuple[int, int, int] | None = None,  # (num_experts, top_k, expert width)
    max_positions: int = 262144,
    vocab: int = VOCAB,
    head_dim: int = 256,
    global_head_dim: int = 512,
) -> dict[str, Any]:
    num_experts, top_k, expert_width = experts or (0, 0, 0)
    return {
        "model_type": "gemma4_text",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "layer_types": layer_types(layers, period),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_global_key_value_heads": full_kv_heads,
        "attention_k_eq_v": full_kv_heads is not None,
        "head_dim": head_dim,
        "global_head_dim": global_head_dim,
        "intermediate_size": intermediate,
        "use_double_wide_mlp": double_wide,
        "hidden_size_per_layer_input": ple,
        "vocab_size_per_layer_input": vocab if ple else 0,
        "num_kv_shared_layers": kv_shared,
        "enable_moe_block": experts is not None,
        "num_experts": num_experts or None,
        "top_k_experts": top_k or None,
        "moe_intermediate_size": expert_width or None,
        "sliding_window": window,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-6,
        "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True,
        "rope_parameters": {
            SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
            FULL: {
                "rope_type": "proportional",
                "partial_rotary_factor": 0.25,
                "rope_theta": 1_000_000.0,
            },
        },
    }


# The released sizes (text decoder only).
GEMMA4: dict[str, dict[str, Any]] = {
    "e2b": _gemma4(
        hidden=1536, layers=35, period=5, heads=8, kv_heads=1, intermediate=6144, window=512,
        ple=256, kv_shared=20, double_wide=True, max_positions=131072,
    ),
    "e4b": _gemma4(
        hidden=2560, layers=42, period=6, heads=8, kv_heads=2, intermediate=10240, window=512,
        ple=256, kv_shared=18, max_positions=131072,
    ),
    "12b": _gemma4(
        hidden=3840, layers=48, period=6, heads=16, kv_heads=8, full_kv_heads=1,
        intermediate=15360, window=1024,
    ),
    "26b-a4b": _gemma4(
        hidden=2816, layers=30, period=6, heads=16, kv_heads=8, full_kv_heads=2,
        intermediate=2112, window=1024, experts=(128, 8, 704),
    ),
    "31b": _gemma4(
        hidden=5376, layers=60, period=6, heads=32, kv_heads=16, full_kv_heads=4,
        intermediate=21504, window=1024,
    ),
}  # fmt: skip

# Structure of each tiny config: (hidden, KV-shared layers, experts) beside the real period.
_TINY: dict[str, dict[str, Any]] = {
    "e2b": {"hidden": 128, "kv_shared": 5},
    "e4b": {"hidden": 192, "kv_shared": 5},
    "12b": {"hidden": 320},
    "26b-a4b": {"hidden": 256, "experts": (32, 4, 64)},
    "31b": {"hidden": 448},
}


def tiny_config(size: str) -> dict[str, Any]:
    """A small random-weight config with the structure of the released `size`."""
    if size not in GEMMA4:
        raise KeyError(f"unknown Gemma 4 size {size!r} (known: {', '.join(GEMMA4)})")
    real, shape = GEMMA4[size], _TINY[size]
    hidden = shape["hidden"]
    period = real["layer_types"].index(FULL) + 1
    heads = 4
    return _gemma4(
        hidden=hidden,
        layers=2 * period,
        period=period,
        heads=heads,
        kv_heads=max(1, real["num_key_value_heads"] * heads // real["num_attention_heads"]),
        full_kv_heads=1 if real["attention_k_eq_v"] else None,
        intermediate=real["intermediate_size"] * hidden // real["hidden_size"] // 32 * 32,
        window=TINY_WINDOW,
        ple=32 if real["hidden_size_per_layer_input"] else 0,
        kv_shared=shape.get("kv_shared", 0),
        double_wide=real["use_double_wide_mlp"],
        experts=shape.get("experts"),
        max_positions=real["max_position_embeddings"],
        vocab=TINY_VOCAB,
        head_dim=64,
        global_head_dim=128,
    )
