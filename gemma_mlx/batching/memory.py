"""How much memory a batch can take: each sequence's KV caches at their largest, and one pass.

The scheduler admits a request only when the most the running sequences and it can ever hold
together (every cache at its final capacity: prompt, every token it may generate and a verify's
drafts, in the steps the caches grow by; plus the activations of one pass over all of them)
fits the budget, so many long requests queue instead of exhausting memory.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from gemma_mlx.cache import KVCache, RotatingKVCache
from gemma_mlx.loading import physical_memory

# Fraction of the machine's memory (less the weights) the default KV budget takes.
DEFAULT_BUDGET_FRACTION = 0.5


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _itemsize(model: Any) -> int:
    """Bytes of one cached value: the dtype the model computes in (its embedding's, or the
    scales' of a quantized embedding)."""
    embed = model.model.embed_tokens
    weight = embed.weight
    if mx.issubdtype(weight.dtype, mx.floating):
        return weight.dtype.size
    if "scales" not in embed:  # GGUF Q6_K blocks (models.q6k): the dtype its lookups return
        return embed.compute_dtype.size
    return embed.scales.dtype.size


def sequence_kv_bytes(model: Any, total_tokens: int, max_trim: int, chunk: int) -> int:
    """The most bytes the caches of one sequence can hold: `total_tokens` positions (prompt plus
    generated), `max_trim` extra for a verify's drafts, fed at most `chunk` at a time."""
    args = model.args
    per_value = _itemsize(model)
    positions = total_tokens + max_trim
    total = 0
    for layer in range(args.first_kv_shared_layer):
        width = 2 * args.n_kv_heads(layer) * args.layer_head_dim(layer) * per_value
        if args.is_sliding(layer):
            step = RotatingKVCache.step
            kept = min(positions, args.sliding_window - 1 + max_trim)
            slots = _round_up(kept + max(chunk, step), step)
        else:
            slots = _round_up(positions + chunk, KVCache.step)
        total += width * slots
    return total


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
    """Half of the machine's memory left beside the weights."""
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return max(0, int(DEFAULT_BUDGET_FRACTION * (physical_memory() - weights)))
