"""Conversion time and peak memory: the built-in 270M GGUF, and synthetic multi-GB checkpoints.

The converter streams tensor by tensor, so its peak resident memory must stay under
2 GB + the largest single tensor whatever the model's size. Each conversion runs in its own
process (`python -m gemma_mlx.convert ... --report`), which records its own peak RSS.

    python -m benchmarks.convert_memory [--size-gb 6] [--work DIR]

Results are appended to `benchmarks/results/convert-<machine>.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress

from benchmarks.store import RESULTS_DIR, append

BOUND_FIXED = 2 * 10**9  # the memory bound: 2 GB + the largest tensor


def synthetic_config(size_gb: float) -> dict:
    """A Gemma 4 text config whose bf16 checkpoint is about `size_gb` GB, 262k vocabulary."""
    hidden, ffn = 3072, 12288
    per_layer = 2 * (hidden * 2048 + 2 * hidden * 512 + 2048 * hidden + 3 * hidden * ffn)
    embed = 2 * 262144 * hidden
    layers = max(2, round((size_gb * 1e9 - embed) / per_layer))
    return {
        "model_type": "gemma4_text",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "global_head_dim": 256,
        "vocab_size": 262144,
        "rms_norm_eps": 1e-6,
        "sliding_window": 512,
        "layer_types": ["sliding_attention"] * (layers - 1) + ["full_attention"],
        "max_position_embeddings": 8192,
        "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }


def write_synthetic(directory: Path, size_gb: float, console: Console) -> None:
    """A random bf16 checkpoint, written shard by shard (never whole in memory)."""
    import mlx.core as mx
    from gemma_mlx.convert.pipeline import lazy_model
    from gemma_mlx.convert.writer import ShardWriter, write_json
    from mlx.utils import tree_flatten

    from benchmarks.tiny_model import write_byte_tokenizer

    config = synthetic_config(size_gb)
    directory.mkdir(parents=True)
    write_json(directory / "config.json", config)
    write_byte_tokenizer(directory / "tokenizer.json", config["vocab_size"])  # required by convert
    shapes = [(k, v.shape) for k, v in tree_flatten(lazy_model(config).parameters())]
    writer = ShardWriter(directory, 1 << 30)
    with Progress(console=console) as bar:
        task = bar.add_task("writing synthetic checkpoint", total=len(shapes))
        for name, shape in shapes:
            value = mx.random.normal(shape, scale=0.02) if len(shape) > 1 else mx.ones(shape)
            writer.add(name, value.astype(mx.bfloat16))
            mx.eval(writer.pending[name])
            bar.advance(task)
    writer.close()


def convert(src: Path, out: Path) -> dict:
    report_path = out.with_suffix(".report.json")
    start = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "gemma_mlx.convert",
        str(src),
        "-o",
        str(out),
        "--report",
        str(report_path),
    ]
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    report = json.loads(report_path.read_text())
    largest = max(int(np.prod(t["shape"])) * t["bits_per_weight"] / 8 for t in report["tensors"])
    source_bytes = sum(
        f.stat().st_size for f in ([src] if src.is_file() else src.glob("*.safetensors"))
    )
    return {
        "source": src.name,
        "source_format": report["source_format"],
        "source_gb": source_bytes / 1e9,
        "output_gb": report["total_bytes"] / 1e9,
        "bits_per_weight": report["bits_per_weight"],
        "wall_seconds": round(wall, 1),
        "peak_rss_gb": report["peak_rss_bytes"] / 1e9,
        "largest_tensor_gb": largest / 1e9,
        "bound_gb": (BOUND_FIXED + largest) / 1e9,
        "within_bound": report["peak_rss_bytes"] <= BOUND_FIXED + largest,
        "exact_tensors": report["exact_tensors"],
        "inexact_tensors": report["inexact_tensors"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=6.0, help="synthetic checkpoint size")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)
    console = Console()
    from gemma_mlx.builtin import builtin_gguf

    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        scratch = Path(scratch)
        rows = [convert(builtin_gguf(), scratch / "gguf-270m")]
        synthetic = scratch / f"synthetic-{args.size_gb:g}gb"
        write_synthetic(synthetic, args.size_gb, console)
        rows.append(convert(synthetic, scratch / "synthetic-out"))
    machine = f"{platform.system().lower()}-{platform.machine()}"
    for row in rows:
        row |= {
            "benchmark": "convert_memory",
            "machine": machine,
            "date": time.strftime("%Y-%m-%d"),
        }
        console.print(row)
    append(RESULTS_DIR / f"convert-{machine}.jsonl", rows)
    return 0 if all(r["within_bound"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
