"""How much memory a batch can take: each sequence's KV caches at their largest, and one pass.

The scheduler admits a request only when the most the running sequences and it can ever hold
together (every cache at its final capacity: prompt, every token it may generate and a verify's
drafts, in the steps the caches grow by; plus the activations of one pass over all of them)
fits the budget, so many long requests queue instead of exhausting memory.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from gemma_mlx import machine_memory
from gemma_mlx.cache import KVCache, KVQuantization, QuantizedKVCache, RotatingKVCache

# Fraction of the memory left beside the weights that the default KV budget takes.
DEFAULT_BUDGET_FRACTION = 0.5


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _itemsize(model: Any) -> int:
    """Bytes of one cached value: the dtype the model computes in (its embedding's, or the
    scales' of a quantized embedding; a pipeline stage's `dtype`)."""
    if hasattr(model, "kv_layers"):  # gemma_mlx.distributed.PipelineModel
        return model.dtype.size
    embed = model.model.embed_tokens
    weight = embed.weight
    if mx.issubdtype(weight.dtype, mx.floating):
        return weight.dtype.size
    if "scales" not in embed:  # GGUF Q6_K blocks (models.q6k): the dtype its lookups return
        return embed.compute_dtype.size
    return embed.scales.dtype.size


def sequence_kv_bytes(
    model: Any,
    total_tokens: int,
    max_trim: int,
    chunk: int,
    quantization: KVQuantization | None = None,
) -> int:
    """The most bytes the caches of one sequence can hold: `total_tokens` positions (prompt plus
    generated), `max_trim` extra for a verify's drafts, fed at most `chunk` at a time; with
    `quantization`, full-attention layers hold packed values plus a scale and bias per group
    from position `quantization.start` on, and the newest keys also as computed."""
    args = model.args
    per_value = _itemsize(model)
    positions = total_tokens + max_trim
    total = 0
    for layer, values in _cached_layers(model):
        if args.is_sliding(layer):
            step = RotatingKVCache.step
            kept = min(positions, args.sliding_window - 1 + max_trim)
            total += values * per_value * _round_up(kept + max(chunk, step), step)
        elif quantization is None:
            total += values * per_value * _round_up(positions + chunk, KVCache.step)
        else:
            dense = min(positions + chunk, quantization.start)
            quantized = positions + chunk - dense
            packed = values * quantization.bits // 8
            groups = 2 * (values // quantization.group_size) * per_value
            total += values * per_value * (_round_up(dense, KVCache.step) if dense else 0)
            total += (packed + groups) * _round_up(quantized, QuantizedKVCache.step)
            # Keys still as computed: the rollback room, the block in progress, a chunk.
            unsettled = min(quantized, max_trim + quantization.group_size + chunk)
            total += values // 2 * per_value * unsettled
    return total


def pooled_kv_bytes(model: Any, slots: int, positions: int, max_trim: int) -> int:
    """The bytes of a `gemma_mlx.pooled_cache.CachePool` of `slots` sequences, the longest
    reaching `positions`: every slot as long as the longest in full-attention layers, a ring of
    window + `max_trim` positions in sliding-window layers."""
    args = model.args
    total = 0
    for layer, values in _cached_layers(model):
        if args.is_sliding(layer):
            total += values * (args.sliding_window + max_trim)
        else:
            total += values * _round_up(positions, KVCache.step)
    return slots * _itemsize(model) * total


def _cached_layers(model: Any) -> list[tuple[int, int]]:
    """(layer, values cached per position) of every layer that holds a cache."""
    args = model.args
    layers = getattr(model, "kv_layers", range(args.first_kv_shared_layer))
    return [(i, 2 * args.n_kv_heads(i) * args.layer_head_dim(i)) for i in layers]


def pass_activation_bytes(model: Any, rows: int, kept_rows: int, keys: int) -> int:
    """A bound on the activations of one batched pass of `rows` rows, `kept_rows` of them with
    logits, attending at most `keys` positions: a few hidden-size and MLP-width tensors per row,
    one layer's attention scores, and the logits (with their softcap and log-softmax)."""
    args = model.args
    width = max(args.mlp_width(i) for i in range(args.num_hidden_layers))
    if args.enable_moe_block:
        width += args.top_k_experts * args.moe_intermediate_size
    heads = args.num_attention_heads
    head_dim = max(args.layer_head_dim(i) for i in range(args.num_hidden_layers))
    ple = args.num_hidden_layers * args.hidden_size_per_layer_input
    per_row = 8 * args.hidden_size + 4 * width + 4 * heads * head_dim + 3 * ple
    scores = 3 * heads * rows * keys
    logits = 4 * kept_rows * args.vocab_size
    return 4 * (rows * per_row + scores + logits)


def default_budget(model: Any) -> int:
    """Half of the memory the machine can give beside `model`'s weights, loaded already (on a
    Mac, Metal's recommended working set; `gemma_mlx.machine_memory`)."""
    return max(0, int(DEFAULT_BUDGET_FRACTION * machine_memory.available_memory()))
