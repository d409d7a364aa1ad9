"""`python -m gemma_mlx.convert SRC -o OUT` / `gemma-mlx-convert`: a QAT checkpoint into MLX."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gemma_mlx.convert import FORMATS, convert
from gemma_mlx.convert.safetensors_source import DEFAULT_KEEP, RECIPES
from rich.console import Console

from gemma_mlx.errors import GemmaMLXError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gemma-mlx-convert",
        description="Convert a Gemma QAT checkpoint (Q4_0/K-quant GGUF, compressed-tensors W4A16, or "
        "unquantized QAT safetensors) into an MLX directory, keeping the trained quantization grid.",
    )
    p.add_argument("src", type=Path, help="a .gguf file or a Hugging Face model directory")
    p.add_argument(
        "-o", "--out", "--mlx-path", dest="out", type=Path, required=True, help="output directory"
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--format", dest="source_format", choices=FORMATS, help="source format (default: detected)"
    )
    p.add_argument(
        "--report", dest="report_path", type=Path, help="write the per-tensor report as JSON"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument(
        "--shard-size-gb", type=float, default=0.5, help="maximum shard size (default 0.5)"
    )
    gguf = p.add_argument_group("GGUF sources")
    gguf.add_argument(
        "--k-scales", dest="k_scale_dtype", choices=("float32", "float16"), default="float32",
        help="Q4_K/Q5_K scales: float32 is exact, float16 is smaller and rounds the scale (reported)",
    )  # fmt: skip
    gguf.add_argument(
        "--requant-bits", type=int, choices=(4, 5, 6, 8), default=8,
        help="bits for types MLX cannot hold exactly (Q6_K, Q2_K, Q3_K, IQ*), group 32 (default 8)",
    )  # fmt: skip
    gguf.add_argument(
        "--dequantize", action="store_true",
        help="write float32 weights (the exact dequantized model: a reference, 4-8x larger)",
    )  # fmt: skip
    st = p.add_argument_group("unquantized safetensors sources")
    st.add_argument(
        "--recipe", choices=RECIPES, default="q4_0",
        help="q4_0: the symmetric grid QAT checkpoints are trained for (default); affine: min/max",
    )  # fmt: skip
    st.add_argument("--group-size", type=int, choices=(32, 64, 128), default=32)
    st.add_argument(
        "--keep", nargs="*", default=list(DEFAULT_KEEP), metavar="REGEX",
        help="tensors kept in source precision (default: embeddings, lm_head, router)",
    )  # fmt: skip
    st.add_argument(
        "--quantize-drafter",
        action="store_true",
        help="quantize MTP drafter checkpoints to 8 bits (default: kept in source precision)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    options = vars(args).copy()
    options["shard_bytes"] = int(options.pop("shard_size_gb") * 2**30)
    options["keep"] = tuple(options["keep"])
    src, out = options.pop("src"), options.pop("out")
    try:
        report = convert(src, out, **options)
    except (GemmaMLXError, OSError) as e:
        console.print(f"[red]error:[/red] {e}")
        return 1
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted:[/yellow] {out} was not written")
        return 130
    report.print_summary(console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
