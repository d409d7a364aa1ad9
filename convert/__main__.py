"""`python -m gemma_mlx.convert SRC -o OUT` / `gemma-mlx-convert`: a QAT checkpoint into MLX.

Errors end with one line on stderr: exit 2 for bad input (arguments, a damaged or unsupported
source, an output that may not be written, a full disk), exit 1 for anything unexpected (rerun with
--verbose for the traceback), 130 for Ctrl-C and 128 + N for SIGTERM/SIGHUP.
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback
from pathlib import Path

from gemma_mlx.convert import FORMATS, convert
from gemma_mlx.convert.safetensors_source import DEFAULT_KEEP, RECIPES
from rich.console import Console

from gemma_mlx.errors import GemmaMLXError
from gemma_mlx.outputs import Terminated

PROG = "gemma-mlx-convert"
EXIT_UNEXPECTED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {one_line(message)}\n")


def one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def shard_size_gb(value: str) -> float:
    size = float(value)  # argparse turns its ValueError into "invalid shard_size_gb value"
    if not math.isfinite(size) or size <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of GB, got {value!r}")
    return size


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Convert a Gemma QAT checkpoint (Q4_0/K-quant GGUF, compressed-tensors W4A16, or "
        "unquantized QAT safetensors) into an MLX directory, keeping the trained quantization grid.",
    )
    p.add_argument("src", type=Path, help="a .gguf file or a Hugging Face model directory")
    p.add_argument(
        "-o", "--out", "--mlx-path", dest="out", type=Path, required=True, help="output directory"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace OUT if it is an empty directory or one gemma-mlx-convert wrote (and the "
        "--report file if it exists)",
    )
    p.add_argument(
        "--format", dest="source_format", choices=FORMATS, help="source format (default: detected)"
    )
    p.add_argument(
        "--report", dest="report_path", type=Path, help="write the per-tensor report as JSON"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument(
        "--shard-size-gb", type=shard_size_gb, default=0.5, help="maximum shard size (default 0.5)"
    )
    p.add_argument(
        "--verbose", action="store_true", help="print the traceback of an unexpected error"
    )
    gguf = p.add_argument_group("GGUF sources")
    gguf.add_argument(
        "--k-scales", dest="k_scale_dtype", choices=("float32", "float16"), default="float32",
        help="Q4_K/Q5_K scales: float32 is exact, float16 is smaller and rounds the scale (reported)",
    )  # fmt: skip
    gguf.add_argument(
        "--requant-bits", type=int, choices=(4, 5, 6, 8),
        help="requantize Q6_K to this many bits, affine group 32 (default: Q6_K is kept exactly as "
        "its GGUF blocks); also the bits for Q2_K, Q3_K and IQ* types (default 8)",
    )  # fmt: skip
    gguf.add_argument(
        "--mlx-lm-compatible", action="store_true",
        help="write only what mlx-lm can load: Q6_K requantized (to --requant-bits, default 8)",
    )  # fmt: skip
    gguf.add_argument(
        "--mmproj", type=Path, metavar="MMPROJ.gguf",
        help="llama.cpp's mmproj file of the model (Gemma 4 vision/audio towers): converted with "
        "it, so the output takes images and audio",
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
    options = vars(args).copy()
    verbose = options.pop("verbose")
    options["shard_bytes"] = max(1, round(options.pop("shard_size_gb") * 2**30))
    options["keep"] = tuple(options["keep"])
    src, out = options.pop("src"), options.pop("out")
    try:
        report = convert(src, out, **options)
    except (GemmaMLXError, OSError) as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Terminated as e:
        print(f"{PROG}: terminated ({e}); no partial output was left behind", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no partial output was left behind", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if verbose:
            traceback.print_exc()
        print(
            f"{PROG}: unexpected error: {type(e).__name__}: {one_line(e)} "
            "(rerun with --verbose for the traceback)",
            file=sys.stderr,
        )
        return EXIT_UNEXPECTED
    report.print_summary(Console(stderr=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
