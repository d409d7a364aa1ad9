"""Refuse a context that would not fit in memory, before any of it is computed.

A long prompt on a small machine otherwise runs until the KV cache outgrows the memory and the
machine swaps (or, on a Mac, the GPU pages), minutes later. `check_context` estimates what a
generation will add, the KV cache at the longest the sequence can get (a sliding layer holds at
most its window; `gemma_mlx.batching.memory` counts it the way the caches grow) and the
activations of one prefill chunk, and compares it with what the machine can give now
(`gemma_mlx.machine_memory`). The error names the numbers and what to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gemma_mlx import machine_memory
from gemma_mlx.batching.memory import pass_activation_bytes, sequence_kv_bytes
from gemma_mlx.cache import KVQuantization
from gemma_mlx.decode import default_prefill_step_size
from gemma_mlx.errors import GemmaMLXError

GB = 1e9
MAX_TRIM = 32  # the extra positions a rotating cache keeps for a speculative rollback
OPTIONS = (
    "use a quantized KV cache (--kv-bits 8 or 4), a smaller context (a shorter prompt, fewer "
    "--max-tokens, or --max-kv-size N), or a smaller model"
)


class MemoryLimitError(GemmaMLXError, MemoryError):
    """A context whose KV cache and activations would not fit in the memory left."""


def context_bytes(
    model: Any,
    total_tokens: int,
    prefill_step_size: int | None = None,
    max_kv_size: int | None = None,
    quantization: KVQuantization | None = None,
) -> tuple[int, int]:
    """(KV cache bytes at `total_tokens` positions, activation bytes of one prefill chunk);
    with `max_kv_size`, full layers hold at most that many positions (and the rollback margin),
    unquantized (rotating caches are not quantized); else `quantization` (`kv_bits`) applies."""
    chunk = min(prefill_step_size or default_prefill_step_size(), max(total_tokens, 1))
    if max_kv_size is None:
        kept = total_tokens
    else:
        kept, quantization = min(total_tokens, max_kv_size + MAX_TRIM), None
    kv = sequence_kv_bytes(model, kept, 0, chunk, quantization)
    return kv, pass_activation_bytes(model, chunk, 1, kept)


def check_context(
    model: Any,
    total_tokens: int,
    cache: Sequence[Any] = (),
    prefill_step_size: int | None = None,
    max_kv_size: int | None = None,
    quantization: KVQuantization | None = None,
) -> None:
    """Raise `MemoryLimitError` when a sequence of `total_tokens` (prompt and generated tokens)
    would need more memory than is available; `cache`, already allocated, counts as held. Models
    without a Gemma config (`model.args.first_kv_shared_layer`) are not checked."""
    if not hasattr(getattr(model, "args", None), "first_kv_shared_layer"):
        return
    kv, activations = context_bytes(
        model, total_tokens, prefill_step_size, max_kv_size, quantization
    )
    held = sum(getattr(c, "nbytes", 0) for c in cache)
    needed = max(0, kv - held) + activations
    available = machine_memory.available_memory()
    if needed > available:
        raise MemoryLimitError(
            f"a context of {total_tokens} tokens needs about {needed / GB:.2f} GB more memory "
            f"(KV cache {kv / GB:.2f} GB, {held / GB:.2f} GB of it held already; activations "
            f"{activations / GB:.2f} GB), and this machine can give {available / GB:.2f} GB "
            f"beside what is loaded: {OPTIONS}"
        )
