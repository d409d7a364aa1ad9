"""KV-cache memory of one sequence at long contexts (the KV table of `benchmarks.cost_model`).

Bytes the caches hold at a context of N positions, bf16, per Gemma 4 size:
- mlx-lm: full-attention layers every position, sliding layers a ring of `sliding_window`
  (its `--kv-bits` fails on Gemma 4's mixed caches, so unquantized is what it can run);
- gemma_mlx by default (no `kv_bits`): the same full layers, sliding layers their window plus the
  32 positions kept for speculative rollback;
- gemma_mlx with `kv_bits` 8 or 4 (the default group of 32, from position 0): full layers hold
  bits/8 bytes per value plus a bf16 scale and bias per group.
KV-shared layers (E2B/E4B) hold nothing of their own. Buffer headroom (up to 256 positions per
layer) is left out.
"""

from __future__ import annotations

from benchmarks.configs import GEMMA4
from gemma_mlx.cache import DEFAULT_KV_GROUP_SIZE, DEFAULT_MAX_TRIM, KVQuantization
from gemma_mlx.models.gemma4 import ModelArgs

CONTEXTS = (8192, 32768, 131072)
BF16 = 2


def held_bytes(
    args: ModelArgs,
    context: int,
    sliding_extra: int,
    quantization: KVQuantization | None = None,
) -> int:
    """Bytes one sequence's caches hold at `context` positions: sliding layers keep
    `window + sliding_extra` at most; full layers are quantized from `quantization.start` on."""
    total = 0
    for layer in range(args.first_kv_shared_layer):
        values = 2 * args.n_kv_heads(layer) * args.layer_head_dim(layer)  # keys and values
        if args.is_sliding(layer):
            total += values * BF16 * min(context, args.sliding_window + sliding_extra)
        elif quantization is None:
            total += values * BF16 * context
        else:
            dense = min(context, quantization.start)
            per_position = values * quantization.bits // 8
            per_position += 2 * (values // quantization.group_size) * BF16
            unsettled = min(context - dense, DEFAULT_MAX_TRIM + quantization.group_size)
            total += values * BF16 * dense + per_position * (context - dense)
            total += values // 2 * BF16 * unsettled  # the newest keys, also as computed
    return total


def kv_cache_lines(sizes: list[str]) -> list[str]:
    """Markdown: GB one sequence's KV caches hold at each of CONTEXTS, per size of GEMMA4."""
    variants = {
        "mlx-lm": lambda a, n: held_bytes(a, n, 0),
        "ours default": lambda a, n: held_bytes(a, n, DEFAULT_MAX_TRIM - 1),
        "ours kv_bits 8": lambda a, n: held_bytes(a, n, DEFAULT_MAX_TRIM - 1, KVQuantization(8)),
        "ours kv_bits 4": lambda a, n: held_bytes(a, n, DEFAULT_MAX_TRIM - 1, KVQuantization(4)),
    }
    lines = [
        "## KV cache GB of one sequence at long contexts",
        "",
        "What the caches hold (bf16; `benchmarks.kv_cost`): mlx-lm's unquantized cache (its "
        "`--kv-bits` fails on Gemma 4's mixed sliding/full caches), ours by default (no "
        f"`kv_bits`), and ours with `kv_bits` 8 and 4 (group {DEFAULT_KV_GROUP_SIZE}, "
        "full-attention layers only; sliding layers unquantized).",
        "",
        "| model | context | " + " | ".join(variants) + " | kv_bits 8 / mlx-lm |",
        "|---|---|" + "---|" * (len(variants) + 1),
    ]
    for size in sizes:
        args = ModelArgs.from_dict(GEMMA4[size])
        for n in CONTEXTS:
            held = [f(args, n) for f in variants.values()]
            cells = " | ".join(f"{b / 1e9:.2f}" for b in held)
            lines.append(f"| {size.upper()} | {n // 1024}k | {cells} | {held[2] / held[0]:.2f} |")
    lines.append("")
    return lines
