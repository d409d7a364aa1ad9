"""Peak memory and KV-cache bytes of a long prompt on the built-in Gemma 3 270M, with and
without a quantized KV cache.

    python -m benchmarks.kv_memory [--tokens 32768] [--kv-bits 8] [--chunk 512]

The prompt is `--tokens` tokens of the Python Language Reference (`benchmarks.kv_quality`'s
text), prefilled in chunks of `--chunk` (no logits), once with the unquantized caches and once
with `--kv-bits` on the full-attention layers (groups of `--kv-group-size`, from position 0).
Reported per run:
MLX's peak memory during the prefill (weights included, and without them), the caches' bytes
(`nbytes`: all layers, and the full-attention layers alone) and the prefill time.
"""

from __future__ import annotations

import argparse
import time

import gemma_mlx  # noqa: F401  (preloads OpenBLAS before MLX)

# isort: split
import mlx.core as mx
from mlx.utils import tree_flatten

from benchmarks.kv_quality import held_out_text
from gemma_mlx.cache import (
    DEFAULT_KV_GROUP_SIZE,
    KVQuantization,
    RotatingKVCache,
    quantize_caches,
)
from gemma_mlx.decode import prefill
from gemma_mlx.hub import resolve_model
from gemma_mlx.loading import load

GB = 1e9


def measure(model, ids: list[int], chunk: int, quantization: KVQuantization | None) -> dict:
    mx.clear_cache()
    mx.reset_peak_memory()
    cache = quantize_caches(model.make_cache(), quantization)
    start = time.perf_counter()
    prefill(model, cache, ids, chunk)
    seconds = time.perf_counter() - start
    full = sum(c.nbytes for c in cache if not isinstance(c, RotatingKVCache))
    return {
        "peak": mx.get_peak_memory(),
        "kv": sum(c.nbytes for c in cache),
        "full": full,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kv_memory", description=__doc__)
    p.add_argument("--tokens", type=int, default=32768, help="prompt length (default 32768)")
    p.add_argument("--kv-bits", type=int, default=8, choices=(4, 8))
    p.add_argument("--kv-group-size", type=int, default=DEFAULT_KV_GROUP_SIZE, choices=(32, 64))
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk (default 512)")
    args = p.parse_args(argv)
    model, tokenizer = load(resolve_model(None))
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    ids = tokenizer.encode(held_out_text())
    if len(ids) < args.tokens:
        p.error(f"the text has {len(ids)} tokens, fewer than {args.tokens}")
    ids = ids[: args.tokens]
    runs = {
        "unquantized": measure(model, ids, args.chunk, None),
        f"{args.kv_bits}-bit g{args.kv_group_size}": measure(
            model, ids, args.chunk, KVQuantization(args.kv_bits, args.kv_group_size)
        ),
    }
    base = runs["unquantized"]
    print(
        f"`python -m benchmarks.kv_memory --tokens {args.tokens} --kv-bits {args.kv_bits} "
        f"--kv-group-size {args.kv_group_size} --chunk {args.chunk}` (float32, weights "
        f"{weights / GB:.2f} GB)\n\n"
        "| KV cache | peak GB | peak less weights GB | KV GB (all layers) | KV ratio | "
        "full-layer KV GB | full-layer ratio | prefill s |\n|---|---|---|---|---|---|---|---|"
    )
    for name, r in runs.items():
        print(
            f"| {name} | {r['peak'] / GB:.3f} | {(r['peak'] - weights) / GB:.3f} | "
            f"{r['kv'] / GB:.4f} | {r['kv'] / base['kv']:.3f} | {r['full'] / GB:.4f} | "
            f"{r['full'] / base['full']:.3f} | {r['seconds']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
