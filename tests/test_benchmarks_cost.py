"""Bytes, kernels and host syncs per decoded token (`benchmarks.roofline`, `graph`, `syncs`,
`cost_model`), each checked against a count made another way."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # `benchmarks` lives beside the package

from benchmarks import cost_model
from benchmarks.configs import GEMMA4, tiny_config
from benchmarks.graph import (
    export,
    kernel_counts,
    metal_fast_ops,
    metal_fused_attention,
    reachable,
    zero_leaf,
)
from benchmarks.roofline import kv_bytes, weight_bytes_per_token
from benchmarks.syncs import blocking, count_syncs
from gemma_mlx.models import get_model_classes

SIZES = list(GEMMA4)


def reference_weight_params(c: dict) -> int:
    """Parameters one decoded token reads, written out from the config by hand (float32 model)."""
    H, L, V = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    P, nh = c["hidden_size_per_layer_input"], c["num_attention_heads"]
    first_shared = L - c["num_kv_shared_layers"]
    total = V * H if c["tie_word_embeddings"] else V * H + H  # head, or head + one embedding row
    total += H  # final norm
    if P:
        total += L * P + H * L * P + P  # one PLE row, the PLE projection and its norm
    for layer, kind in enumerate(c["layer_types"]):
        full = kind == "full_attention"
        hd = c["global_head_dim"] if full else c["head_dim"]
        n_kv = (
            c["num_global_key_value_heads"]
            if full and c["attention_k_eq_v"]
            else c["num_key_value_heads"]
        )
        total += 2 * H * nh * hd + hd  # q_proj, o_proj, q_norm
        if layer < first_shared:
            values = 0 if full and c["attention_k_eq_v"] else 1
            total += (1 + values) * H * n_kv * hd + hd  # k_proj (+ v_proj), k_norm
        width = c["intermediate_size"] * (
            2 if c["use_double_wide_mlp"] and layer >= first_shared else 1
        )
        total += 3 * H * width + 4 * H + 1  # MLP, four norms, layer scalar
        if P:
            total += 2 * H * P + H  # per-layer input gate, projection, norm
        if c["enable_moe_block"]:
            E, k = c["num_experts"], c["top_k_experts"]
            total += H * E + H + E + 3 * H  # router, its scales, three more norms
            total += 3 * H * c["moe_intermediate_size"] * k  # the routed experts only
    return total


def build(config: dict, implementation: str = "gemma_mlx") -> nn.Module:
    if implementation == "gemma_mlx":
        model_class, args_class = get_model_classes(config)
    else:
        from mlx_lm.models import gemma4_text

        model_class, args_class = gemma4_text.Model, gemma4_text.ModelArgs
    return model_class(args_class.from_dict(config))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("tied", [True, False])
def test_weight_bytes_match_the_hand_count(size, tied):
    config = tiny_config(size) | {"tie_word_embeddings": tied}
    for implementation in ("gemma_mlx", "mlx-lm"):
        counted = weight_bytes_per_token(build(config, implementation)).total
        assert counted == 4 * reference_weight_params(config), implementation


@pytest.mark.parametrize("size", ["e2b", "26b-a4b"])
def test_kv_bytes_are_what_attention_reads(size):
    """Sum the K/V that every attention call of a real decode step receives."""
    config = tiny_config(size)
    mx.random.seed(0)
    model = build(config)
    args = model.args
    cache = model.make_cache()
    context = args.sliding_window + 37  # past the window: sliding layers read only their window
    model(mx.random.randint(0, 100, (1, context - 1)), cache=cache)
    real = mx.fast.scaled_dot_product_attention
    seen = []

    def recording(q, k, v, **kwargs):
        seen.append(k.nbytes + v.nbytes)
        return real(q, k, v, **kwargs)

    mx.fast.scaled_dot_product_attention = recording
    try:
        model(mx.array([[5]]), cache=cache)
    finally:
        mx.fast.scaled_dot_product_attention = real
    assert len(seen) == args.num_hidden_layers
    assert sum(seen) == kv_bytes(args, context, mx.float32)


def test_graph_counts_every_application_of_a_compiled_function():
    """A compiled function reuses one primitive object; each call is still one kernel."""
    x = zero_leaf((4, 64), mx.float32)
    one = kernel_counts(nn.gelu_approx(x), Counter())
    three = kernel_counts(nn.gelu_approx(nn.gelu_approx(nn.gelu_approx(x))), Counter())
    assert three == Counter({k: 3 * n for k, n in one.items()})


def test_graph_stops_at_materialized_leaves_and_names_parameters():
    w = zero_leaf((32, 64), mx.float32)
    b = mx.zeros((32,)) + 1  # lazy: its producers belong to the graph
    x = mx.array(1.0) * mx.ones((1, 64))
    y = mx.softmax(x @ w.T + b, axis=-1)
    graph = export({"y": y}, {"w": w})
    labels = Counter(graph.labels[p] for p in reachable(graph, ["y"]))
    # x: Multiply of two leaves (ones is lazy: Full); b: Full + Add; y: Transpose, Matmul, Add, Softmax.
    assert labels["Softmax"] == 1 and labels["Matmul"] == 1 and labels["Transpose"] == 1
    assert "w" in graph.consumers and graph.labels[graph.consumers["w"][0]] == "Transpose"
    assert "w" not in graph.producer  # a leaf


def test_metal_attention_rules():
    def shapes(q_len, heads, kv_heads, dim):
        return (
            mx.zeros((1, heads, q_len, dim)),
            mx.zeros((1, kv_heads, 64, dim)),
            mx.zeros((1, kv_heads, 64, dim)),
        )

    assert metal_fused_attention(*shapes(1, 8, 1, 256))  # Gemma 4 sliding layer, decode
    assert not metal_fused_attention(*shapes(1, 8, 1, 512))  # full layer: no 512-wide kernel
    assert not metal_fused_attention(*shapes(1, 64, 1, 128))  # GQA factor 64 > 32
    assert not metal_fused_attention(*shapes(100, 8, 1, 256))  # prefill: unfused is faster at 256
    assert metal_fused_attention(*shapes(100, 8, 1, 128))


def test_metal_fast_ops_make_one_node_each():
    x, w = zero_leaf((1, 4, 64), mx.float32), zero_leaf((64,), mx.float32)
    with metal_fast_ops() as made:
        y = mx.fast.rms_norm(x, w, 1e-6)
    counts = kernel_counts(y, made)
    assert counts == Counter({"RMSNorm": 1})
    assert mx.fast.rms_norm(x, w, 1e-6).shape == x.shape  # the real op is back
    assert (
        sum(kernel_counts(mx.fast.rms_norm(x, w, 1e-6), Counter()).values()) > 1
    )  # CPU expands it


def test_sync_counter_counts_blocking_calls_only():
    a = mx.array([1, 2, 3]) * 2
    with count_syncs() as counts:
        mx.async_eval(a)
        a.tolist()
        mx.eval(a)
        int(a[0])
        a[1].item()
    assert counts == Counter({"async_eval": 1, "tolist": 1, "eval": 1, "__int__": 1, "item": 1})
    assert blocking(counts) == 4
    assert mx.array(7).item() == 7  # patches undone


def test_decode_loops_make_one_blocking_sync_per_token():
    for implementation, (syncs, submissions) in cost_model.measure_syncs("e2b").items():
        assert syncs == 1.0 and submissions == 1.0, implementation


@pytest.mark.parametrize("size", ["e4b", "26b-a4b"])
def test_graph_and_shape_byte_counts_agree(size):
    """Two independent counts: who reads each parameter in the traced graph, and module shapes."""
    for implementation in cost_model.IMPLEMENTATIONS:
        cost = cost_model.trace_cost(implementation, tiny_config(size), context=300)
        assert cost.weight_bytes_graph == cost.weight_bytes_shapes
        assert cost.primitives["QuantizedMatmul"] > 0 and cost.kernels < cost.total


def test_kernel_path_and_verify_window_counts():
    """Ours is traced twice more: with its Metal kernels in place (the MoE router becomes one
    kernel per MoE layer; a decoded token's layer steps fused kernels) and for a verify window,
    whose few (token, expert) pairs skip the dispatch and whose rows take the fused residual
    steps only (the other fused kernels take one row)."""
    config = tiny_config("26b-a4b")
    ours = cost_model.trace_cost("gemma_mlx", config, context=300)
    layers = config["num_hidden_layers"]
    assert ours.metal["moe_route"] == layers and "moe_route" not in ours.primitives
    assert cost_model.kernels_in(ours.metal) < ours.kernels
    assert ours.window_metal["moe_route"] == layers and "moe_dispatch" not in ours.window_metal
    one_row = {"projection", "projection_geglu", "head_norm_rope"}
    assert one_row <= set(ours.metal) and not one_row & set(ours.window_metal)
    for residual_step in ("residual_norm", "moe_residual"):  # after attention; the layer's end
        assert ours.metal[residual_step] == ours.window_metal[residual_step] == layers
    assert cost_model.kernels_in(ours.window_metal) < cost_model.kernels_in(ours.window)
    peer = cost_model.trace_cost("mlx-lm", config, context=300)
    assert peer.metal is None and cost_model.kernels_in(peer.window) > 0


def test_cost_model_writes_a_row_per_size(tmp_path):
    """Two sizes here (the table of all five is `benchmarks/cost_model.md`): a dense and an MoE."""
    out = tmp_path / "cost.md"
    sizes = ["e2b", "26b-a4b"]
    assert (
        cost_model.main(["--context", "2048", "--sizes", ",".join(sizes), "--out", str(out)]) == 0
    )
    text = out.read_text()
    for size in sizes:
        row = next(line for line in text.splitlines() if line.startswith(f"| {size.upper()} | "))
        assert row.count("/") >= 5  # ours / mlx-lm in every compared column
    assert cost_model.main(["--out", str(out)]) == 2  # no overwrite without --force
    assert cost_model.main(["--sizes", "40b", "--out", str(tmp_path / "x.md")]) == 2
