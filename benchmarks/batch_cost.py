"""Weight bytes per generated token when B sequences share each decode step (the batch table of
`benchmarks.cost_model`).

A batched step reads every dense weight once for all B sequences, one embedding row (and PLE
row) per sequence, and of each MoE expert stack the experts that at least one of the B tokens is
routed to: with routing spread evenly over E experts, top-k each, E (1 - (1 - k/E)^B) of them on
average. So dense models divide their weight traffic by B, while MoE models read more experts as
B grows (26B-A4B: 8 of 128 experts for one token, 51 for 8 tokens). KV traffic is per sequence
and does not shrink.
"""

from __future__ import annotations

from benchmarks.roofline import WeightBytes

BATCHES = (1, 2, 4, 8, 16)


def experts_read(num_experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts B tokens are routed to (top-k of E each, spread evenly)."""
    if not num_experts:
        return 0.0
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def bytes_per_token(weights: WeightBytes, num_experts: int, top_k: int, batch: int) -> float:
    """Weight bytes one step of `batch` sequences reads, per generated token."""
    stacks = weights.experts * num_experts / top_k if top_k else 0.0  # all experts' bytes
    routed = stacks * experts_read(num_experts, top_k, batch) / num_experts if top_k else 0.0
    return (weights.dense + routed + weights.embedding_rows * batch) / batch


def batch_lines(sizes: dict[str, tuple[WeightBytes, int, int]]) -> list[str]:
    """Markdown: per size (weights per token, num_experts, top_k), GB per token at each batch."""
    lines = [
        "## Weight bytes per generated token in a batch",
        "",
        "B sequences decoding together read the dense weights once per step, an embedding row "
        "each, and the experts any of their tokens is routed to (E (1 - (1 - k/E)^B) on average "
        "for even routing); GB per generated token (KV, per sequence, comes on top). "
        "`gemma_mlx.batching` runs such steps.",
        "",
        "| model | " + " | ".join(f"batch {b}" for b in BATCHES) + " | batch 16 / batch 1 |",
        "|---|" + "---|" * (len(BATCHES) + 1),
    ]
    for size, (weights, num_experts, top_k) in sizes.items():
        per = [bytes_per_token(weights, num_experts, top_k, b) for b in BATCHES]
        cells = " | ".join(f"{v / 1e9:.3f}" for v in per)
        lines.append(f"| {size.upper()} | {cells} | {per[-1] / per[0]:.3f} |")
    lines.append("")
    return lines
