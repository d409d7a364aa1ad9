"""The conversion driver: source -> tensors one at a time -> shards -> verified MLX directory."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from gemma_mlx.convert.mlx_format import QuantizedTensor
from gemma_mlx.convert.report import Report
from gemma_mlx.convert.tensors import Converted, TensorRecord
from gemma_mlx.convert.writer import DEFAULT_SHARD_BYTES, ShardWriter, staged_output, write_json
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from gemma_mlx.errors import GemmaMLXError

CACHE_LIMIT_BYTES = 1 << 28
# One unit of work: converts one source tensor into one or more output tensors.
ConvertFn = Callable[[], list[tuple[str, Converted, TensorRecord]]]


@dataclass
class Job:
    label: str  # the source tensor's name, for progress and errors
    source_bytes: int
    run: ConvertFn


@dataclass
class Plan:
    """Everything a source contributes: config.json, the tensor jobs, and the side files."""

    source_format: str
    config: dict[str, Any]
    jobs: list[Job]
    write_extra_files: Callable[[Path], None]
    generation_config: dict[str, Any] = field(default_factory=dict)


def peak_rss_bytes() -> int:
    """This process's peak resident memory. On Linux from /proc (VmHWM): `ru_maxrss` survives
    fork + exec, so a converter started by a large process would report its parent's size."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def progress_bar(console: Console, enabled: bool) -> Progress:
    """Bytes read from the source, and tensors done."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.fields[done]}/{task.fields[count]} tensors"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


def write_plan(
    plan: Plan,
    out_dir: Path,
    report: Report,
    progress: bool = True,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Report:
    """Run every job, stream the results into shards, write config and side files, verify."""
    start = time.perf_counter()
    console = Console(stderr=True)
    writer = ShardWriter(out_dir, shard_bytes)
    quantized: dict[str, dict[str, int]] = {}
    total = sum(job.source_bytes for job in plan.jobs)
    with progress_bar(console, progress) as bar:
        task = bar.add_task("converting", total=total, done=0, count=len(plan.jobs))
        for done, job in enumerate(plan.jobs, start=1):
            for name, converted, record in job.run():
                for key, array in converted.arrays(name).items():
                    writer.add(key, array)
                if isinstance(converted.value, QuantizedTensor):
                    quantized[name.removesuffix(".weight")] = {
                        "group_size": converted.value.group_size,
                        "bits": converted.value.bits,
                    }
                report.records.append(record)
            bar.update(task, advance=job.source_bytes, done=done)
    writer.close()

    config = dict(plan.config)
    if quantized:
        default = max(quantized.values(), key=list(quantized.values()).count)
        config["quantization"] = {**default, "mode": "affine", **dict(sorted(quantized.items()))}
        config["quantization_config"] = config["quantization"]
    write_json(out_dir / "config.json", config)
    if plan.generation_config:
        write_json(out_dir / "generation_config.json", plan.generation_config)
    plan.write_extra_files(out_dir)
    verify(out_dir)
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def lazy_model(config: dict[str, Any]):
    """The model config.json describes; its parameters stay lazy, so nothing is allocated."""
    from gemma_mlx.models import get_model_classes

    model_class, args_class = get_model_classes(config)
    return model_class(args_class.from_dict(config))


def check_against_config(
    config: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    origin: dict[str, Path],
    source: Path,
) -> None:
    """Fail before converting anything if a tensor is missing, unexpected or of the wrong shape."""
    from gemma_mlx.loading import check_names_and_shapes

    standins = {name: mx.zeros(shape) for name, shape in shapes.items()}  # lazy: never evaluated
    check_names_and_shapes(lazy_model(config), standins, origin, source)


def verify(out_dir: Path) -> None:
    """Every tensor the config implies is present with its shape (reads no weight data)."""
    from gemma_mlx.loading import build_and_check

    try:
        build_and_check(out_dir)
    except GemmaMLXError as e:
        raise GemmaMLXError(f"the converted model failed verification: {e}") from e


def run_conversion(
    make_plan: Callable[[], Plan],
    source: Path,
    out: Path,
    *,
    force: bool = False,
    progress: bool = True,
    report_path: Path | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Report:
    """Build the plan, convert into a staging directory beside `out`, move it into place."""
    start = time.perf_counter()
    # MLX keeps freed buffers for reuse; a converter touches each tensor once, so that cache would
    # only grow the resident set.
    previous_cache_limit = mx.set_cache_limit(CACHE_LIMIT_BYTES)
    try:
        plan = make_plan()
        report = Report(source=str(source), source_format=plan.source_format, output=str(out))
        with staged_output(Path(out), force=force) as staging:
            write_plan(plan, staging, report, progress, shard_bytes)
    finally:
        mx.set_cache_limit(previous_cache_limit)
    report.seconds = time.perf_counter() - start
    if report_path is not None:
        report.save(report_path)
    return report
