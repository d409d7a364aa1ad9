"""How far a converted GGUF's logits are from its exact float32 dequantization, over held-out text.

    python -m benchmarks.gguf_exactness [--gguf FILE] [--tokens 512] [--dtype float32]
        [--quantized] [--variants exact,requant8]

The GGUF (default: the built-in Gemma 3 270M) is converted three ways: `exact` (the default
conversion: exact grids, Q6_K kept as its blocks), `requant8` (`--requant-bits 8`: Q6_K requantized
to 8-bit affine, the mlx-lm-compatible output) and `--dequantize` (float32 weights: the
reference, computed in float32). Each variant is loaded in `--dtype`, quantized as stored
(`--quantized`, what a Mac runs) or expanded to dense weights (the CPU default), and
teacher-forced over `benchmarks/prompt.txt` (not a training prompt of anything here) in chunks
that share the KV cache. Per position, against the reference:

- KLD: KL(reference || variant) over the full vocabulary;
- top-20 KLD: the same over the reference's 20 most likely tokens, both renormalized;
- top-1: whether the argmax agrees.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gemma_mlx  # noqa: F401  (preloads OpenBLAS before MLX)

# isort: split
import mlx.core as mx
import numpy as np
from gemma_mlx.convert import convert

from gemma_mlx.builtin import builtin_gguf
from gemma_mlx.loading import load, load_model

TEXT = Path(__file__).parent / "prompt.txt"
VARIANTS = {"exact": {}, "requant8": {"requant_bits": 8}}
TOP = 20
CHUNK = 64


@dataclass
class Divergence:
    kld: float  # mean over positions
    kld_top: float
    top1: float  # fraction of positions whose argmax agrees
    positions: int

    def __str__(self) -> str:
        return (
            f"KLD {self.kld:.3g}, top-{TOP} KLD {self.kld_top:.3g}, top-1 {100 * self.top1:.2f}% "
            f"over {self.positions} positions"
        )


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def compare(reference: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position: full KLD, top-TOP KLD and argmax agreement of logits [T, V] (float64)."""
    p, q = log_softmax(reference), log_softmax(other)
    kld = (np.exp(p) * (p - q)).sum(-1)
    top = np.argsort(-reference, axis=-1)[:, :TOP]
    pt = log_softmax(np.take_along_axis(reference, top, -1))
    qt = log_softmax(np.take_along_axis(other, top, -1))
    kld_top = (np.exp(pt) * (pt - qt)).sum(-1)
    return kld, kld_top, reference.argmax(-1) == other.argmax(-1)


def divergence(reference, model, ids: list[int], chunk: int = CHUNK) -> Divergence:
    """Teacher-forced logits of both models over `ids`, `chunk` positions at a time."""
    caches = reference.make_cache(), model.make_cache()
    parts = []
    for start in range(0, len(ids), chunk):
        tokens = mx.array([ids[start : start + chunk]])
        want, got = (
            np.array(m(tokens, cache=c)[0].astype(mx.float32), np.float64)
            for m, c in zip((reference, model), caches, strict=True)
        )
        parts.append(compare(want, got))
    kld, kld_top, top1 = (np.concatenate(p) for p in zip(*parts, strict=True))
    return Divergence(float(kld.mean()), float(kld_top.mean()), float(top1.mean()), len(kld))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gguf_exactness", description=__doc__)
    p.add_argument("--gguf", type=Path, help="GGUF file (default: the built-in Gemma 3 270M)")
    p.add_argument("--tokens", type=int, default=512, help="held-out tokens (default 512)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--quantized", action="store_true", help="keep weights quantized (as a Mac)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    args = p.parse_args(argv)
    gguf = args.gguf or builtin_gguf()
    variants = [v for v in args.variants.split(",") if v]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, options in [("f32", {"dequantize": True})] + [(v, VARIANTS[v]) for v in variants]:
            start = time.perf_counter()
            report = convert(gguf, root / name, progress=False, **options)
            print(
                f"{name}: converted in {time.perf_counter() - start:.0f} s, "
                f"{report.bits_per_weight:.2f} bits/weight, {len(report.inexact)} tensors inexact",
                flush=True,
            )
        reference, tokenizer = load(root / "f32", dtype="float32", dequantize=False)
        ids = tokenizer.encode(TEXT.read_text())[: args.tokens]
        for name in variants:
            model = load_model(root / name, dtype=args.dtype, dequantize=not args.quantized)
            start = time.perf_counter()
            result = divergence(reference, model, ids)
            print(
                f"{name} ({args.dtype}, {'quantized' if args.quantized else 'dense'}): {result} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
            del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
