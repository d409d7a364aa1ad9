"""Converters from Gemma QAT checkpoints (GGUF, compressed-tensors, QAT safetensors) to MLX.

`convert(src, out)` detects the source format, converts tensor by tensor into a staging directory
beside `out`, verifies the result and moves it into place. Quantized grids are kept exactly where
MLX can represent them; `Report` says, per tensor, what was exact and what was not.
"""

from __future__ import annotations

from pathlib import Path

from gemma_mlx.convert.pipeline import Plan, reading_source, run_conversion, write_plan
from gemma_mlx.convert.report import Report
from gemma_mlx.convert.writer import DEFAULT_SHARD_BYTES

from gemma_mlx.errors import ConfigError, WeightsError
from gemma_mlx.outputs import OutputExistsError

FORMATS = ("gguf", "compressed-tensors", "safetensors")
# Raised whenever the same source converts into different output, so that caches keyed by it
# (`gemma_mlx.hub.converted_gguf`) convert again. 2: Q6_K kept as its GGUF blocks (was requantized).
# 3: a GGUF's mmproj (vision/audio towers) is converted with it (was silently left out).
FORMAT_VERSION = 3

__all__ = [
    "FORMATS",
    "FORMAT_VERSION",
    "OutputExistsError",
    "Report",
    "convert",
    "convert_gguf",
    "detect_source_format",
]


def detect_source_format(src: Path) -> str:
    src = Path(src)
    if src.is_file() and src.suffix.lower() == ".gguf":
        return "gguf"
    if src.is_dir():
        from gemma_mlx.convert.safetensors_source import detect_format

        from gemma_mlx.loading import read_config

        return detect_format(read_config(src), src)
    if not src.exists():
        raise WeightsError(f"{src}: no such file or directory")
    raise ConfigError(f"{src}: not a .gguf file or a model directory with config.json")


def make_plan(src: Path, source_format: str | None = None, **options) -> Plan:
    """The conversion plan for `src`; options: k_scale_dtype, requant_bits, dequantize,
    mlx_lm_compatible, mmproj (GGUF); recipe, group_size, keep, quantize_drafter (safetensors)."""
    with reading_source(src):
        return _make_plan(src, source_format, **options)


def _make_plan(src: Path, source_format: str | None, **options) -> Plan:
    source_format = source_format or detect_source_format(src)
    if source_format == "gguf":
        from gemma_mlx.convert.gguf_source import gguf_plan

        names = ("k_scale_dtype", "requant_bits", "dequantize", "mlx_lm_compatible", "mmproj")
        return gguf_plan(Path(src), **{k: v for k, v in options.items() if k in names})
    if source_format in ("compressed-tensors", "safetensors"):
        from gemma_mlx.convert.safetensors_source import safetensors_plan

        if options.get("mmproj") is not None:
            raise ConfigError(
                f"--mmproj {options['mmproj']}: only for a GGUF source (a Hugging Face directory "
                "holds its towers)"
            )
        names = ("recipe", "group_size", "keep", "quantize_drafter")
        plan = safetensors_plan(Path(src), **{k: v for k, v in options.items() if k in names})
        if plan.source_format != source_format:
            raise ConfigError(
                f"{src}: --format {source_format} given, but the checkpoint is {plan.source_format}"
            )
        return plan
    raise ConfigError(f"--format {source_format!r}: choose one of {', '.join(FORMATS)}")


def convert(
    src: str | Path,
    out: str | Path,
    *,
    source_format: str | None = None,
    force: bool = False,
    progress: bool = True,
    report_path: str | Path | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    **options,
) -> Report:
    """Convert `src` (a .gguf file or a Hugging Face directory) into the MLX directory `out`."""
    return run_conversion(
        lambda: make_plan(Path(src), source_format, **options),
        Path(src),
        Path(out),
        force=force,
        progress=progress,
        report_path=None if report_path is None else Path(report_path),
        shard_bytes=shard_bytes,
    )


def convert_gguf(src: str | Path, out_dir: str | Path, progress: bool = True, **options) -> Report:
    """Convert a GGUF file into the existing, empty directory `out_dir` (the caller stages it)."""
    plan = make_plan(Path(src), "gguf", **options)
    report = Report(source=str(src), source_format="gguf", output=str(out_dir))
    return write_plan(plan, Path(out_dir), report, progress)
