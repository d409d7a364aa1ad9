"""What quantizing the KV cache costs in fidelity, on the real built-in Gemma 3 270M.

    python -m benchmarks.kv_quality [--context 4096] [--positions 512] [--greedy 64]

Held-out text: the Python Language Reference that ships with CPython (`pydoc_data.topics`,
the "specialnames" topic (the data model) and on, in a fixed order: no model here was tuned on it). The first
`--context` tokens are prefilled, far past the 512-token sliding window, so the full-attention
layers (the ones `kv_bits` quantizes) hold thousands of positions; then the next `--positions`
tokens are teacher-forced in chunks of 64, and each quantized cache's logits are compared per
position with the unquantized cache's: mean KL(unquantized || quantized) over the whole
vocabulary, top-20 KLD, top-1 agreement. Then each continues greedily for `--greedy` tokens
from the same point, compared with the unquantized continuation; decode speed is reported as
measured (a loaded machine blurs it). Results go to benchmarks/results/kv-quality-<machine>.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import gemma_mlx  # noqa: F401  (preloads OpenBLAS before MLX)

# isort: split
import pydoc_data.topics

import mlx.core as mx
import numpy as np

from benchmarks.gguf_exactness import TOP, compare
from benchmarks.machine import describe
from gemma_mlx.cache import KVQuantization, quantize_caches
from gemma_mlx.decode import prefill
from gemma_mlx.hub import resolve_model
from gemma_mlx.loading import load

RESULTS = Path(__file__).parent / "results"
CHUNK = 64
FIRST_TOPIC = "specialnames"
VARIANTS = {
    "8-bit g64": KVQuantization(8, 64),
    "8-bit g32": KVQuantization(8, 32),
    "4-bit g64": KVQuantization(4, 64),
    "4-bit g32": KVQuantization(4, 32),
}


def held_out_text() -> str:
    topics = pydoc_data.topics.topics
    names = sorted(topics)
    names = names[names.index(FIRST_TOPIC) :] + names[: names.index(FIRST_TOPIC)]
    return "\n\n".join(topics[name] for name in names)


def teacher_forced(model, cache: list, ids: list[int]) -> np.ndarray:
    """Float64 logits [len(ids), V] of `ids` fed after what `cache` holds, CHUNK at a time."""
    parts = []
    for start in range(0, len(ids), CHUNK):
        logits = model(mx.array([ids[start : start + CHUNK]]), cache=cache)[0]
        parts.append(np.array(logits.astype(mx.float32), np.float64))
    return np.concatenate(parts)


def greedy(model, cache: list, first: int, n: int) -> tuple[list[int], float]:
    """`n` greedy tokens after `first`, and the decode speed in tokens per second."""
    tokens, token = [], first
    start = time.perf_counter()
    for _ in range(n):
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
        token = int(mx.argmax(logits).item())
        tokens.append(token)
    return tokens, n / (time.perf_counter() - start)


def run_variant(model, ids, context, positions, n_greedy, quantization):
    cache = quantize_caches(model.make_cache(), quantization)
    prefill(model, cache, ids[:context], 512)
    logits = teacher_forced(model, cache, ids[context : context + positions])
    kv_bytes = sum(c.nbytes for c in cache)
    tokens, speed = greedy(model, cache, ids[context + positions], n_greedy)
    return logits, kv_bytes, tokens, speed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kv_quality", description=__doc__)
    p.add_argument("--context", type=int, default=4096, help="tokens before the measured ones")
    p.add_argument("--positions", type=int, default=512, help="teacher-forced positions")
    p.add_argument("--greedy", type=int, default=64, help="greedy tokens compared")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}"
    )
    p.add_argument("--output", type=Path, help="markdown file (default: under results/)")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if unknown := [v for v in variants if v not in VARIANTS]:
        p.error(f"--variants: unknown {unknown[0]!r}")
    model, tokenizer = load(resolve_model(None))  # the built-in 270M
    ids = tokenizer.encode(held_out_text())
    needed = args.context + args.positions + 1
    if len(ids) < needed:
        p.error(f"the text has {len(ids)} tokens, fewer than {needed}")
    ids = ids[:needed]
    print(f"{len(ids)} tokens of held-out text", flush=True)
    start = time.perf_counter()
    reference, ref_bytes, ref_tokens, ref_speed = run_variant(
        model, ids, args.context, args.positions, args.greedy, None
    )
    print(f"unquantized: {time.perf_counter() - start:.0f} s", flush=True)
    rows = [("unquantized", "-", "-", "100.00%", "1.00", f"{args.greedy}/{args.greedy}",
             f"{ref_speed:.1f}")]  # fmt: skip
    for name in variants:
        start = time.perf_counter()
        logits, kv_bytes, tokens, speed = run_variant(
            model, ids, args.context, args.positions, args.greedy, VARIANTS[name]
        )
        kld, kld_top, top1 = compare(reference, logits)
        same = next(
            (i for i, (a, b) in enumerate(zip(ref_tokens, tokens, strict=True)) if a != b), None
        )
        agree = f"{args.greedy}/{args.greedy}" if same is None else f"first {same} same"
        row = (name, f"{kld.mean():.2e}", f"{kld_top.mean():.2e}", f"{100 * top1.mean():.2f}%",
               f"{kv_bytes / ref_bytes:.2f}", agree, f"{speed:.1f}")  # fmt: skip
        rows.append(row)
        print(" | ".join(row), f"({time.perf_counter() - start:.0f} s)", flush=True)
    machine = describe(measure_bandwidth=False).label
    header = (
        f"# KV-cache quantization fidelity: Gemma 3 270M (built-in), float32, {machine}\n\n"
        f"`python -m benchmarks.kv_quality --context {args.context} --positions "
        f"{args.positions} --greedy {args.greedy}`: {args.context} tokens prefilled, the next "
        f"{args.positions} teacher-forced against the unquantized cache; KV bytes are all "
        "layers' caches (sliding layers unquantized) relative to the unquantized ones; greedy: "
        f"{args.greedy} tokens from the same point. Quantization from position 0 "
        "(`quantized_kv_start=0`), full-attention layers; keys per channel over blocks of g "
        "positions, values per position in groups of g along the head dimension.\n\n"
        f"| KV cache | mean KLD | top-{TOP} KLD | top-1 | KV bytes | greedy | decode tok/s |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    text = header + "".join("| " + " | ".join(r) + " |\n" for r in rows)
    output = args.output or RESULTS / f"kv-quality-{machine}.md"
    output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
