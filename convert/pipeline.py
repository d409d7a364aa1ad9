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
from gemma_mlx.convert.tensors import Converted, GGUFBlocks, TensorRecord
from gemma_mlx.convert.writer import DEFAULT_SHARD_BYTES, ShardWriter, write_json
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from gemma_mlx.errors import ConfigError, GemmaMLXError, WeightsError
from gemma_mlx.loading import reported_as
from gemma_mlx.models import q6k
from gemma_mlx.outputs import (
    check_free_space,
    check_target,
    staged_directory,
    write_file_atomically,
)

CACHE_LIMIT_BYTES = 1 << 28
# Free space wanted beyond the tensors: tokenizer files (~35 MB for a 262k vocabulary), configs.
SIDE_FILES_ALLOWANCE = 64 << 20
# One unit of work: converts one source tensor into one or more output tensors.
ConvertFn = Callable[[], list[tuple[str, Converted, TensorRecord]]]


@dataclass
class Job:
    label: str  # the source tensor's name, for progress and errors
    source_bytes: int
    output_bytes: int  # what `run` will write (known before converting: the free-space check)
    run: ConvertFn


@dataclass
class Plan:
    """Everything a source contributes: config.json, the tensor jobs, and the side files."""

    source_format: str
    config: dict[str, Any]
    jobs: list[Job]
    write_extra_files: Callable[[Path], None]  # tokenizer files, chat template
    generation_config: dict[str, Any] = field(default_factory=dict)

    @property
    def output_bytes(self) -> int:
        return sum(job.output_bytes for job in self.jobs)


def reading_source(source: Path) -> contextlib.AbstractContextManager[None]:
    """The boundary around interpreting a source's bytes: a damaged file surfaces as whatever
    Python error its garbage causes in the parsers (gguf-py's, JSON's, ours); those become one
    `WeightsError` naming the file."""
    return reported_as(WeightsError, f"{source}: damaged or not a supported checkpoint")


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
    """Write the side files, run every job, stream the results into shards, write the config,
    verify. The side files come first: a tokenizer that cannot be built fails before any tensor
    is converted."""
    start = time.perf_counter()
    needed = plan.output_bytes + SIDE_FILES_ALLOWANCE
    check_free_space(out_dir.parent, needed, "the converted model")  # the filesystem of OUT
    plan.write_extra_files(out_dir)
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
                elif isinstance(converted.value, GGUFBlocks):
                    quantized[name.removesuffix(".weight")] = dict(q6k.ENTRY)
                report.records.append(record)
            bar.update(task, advance=job.source_bytes, done=done)
    writer.close()

    config = dict(plan.config)
    if quantized:
        config["quantization"] = quantization_config(quantized)
        config["quantization_config"] = config["quantization"]
    write_json(out_dir / "config.json", config)
    if plan.generation_config:
        write_json(out_dir / "generation_config.json", plan.generation_config)
    verify(out_dir)
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def quantization_config(modules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """config.json's "quantization" (mlx-lm's format): the most common affine layout as the
    default, and every module's own entry (Q6_K blocks: `gemma_mlx.models.q6k.ENTRY`)."""
    affine = [entry for entry in modules.values() if "mode" not in entry]
    default = max(affine, key=affine.count) if affine else {"group_size": 32, "bits": 8}
    return {**default, "mode": "affine", **dict(sorted(modules.items()))}


def lazy_model(config: dict[str, Any], media: bool = False):
    """The model config.json describes (with its vision/audio towers when `media`); its
    parameters stay lazy, so nothing is allocated."""
    from gemma_mlx.models import get_model_classes

    model_class, args_class = get_model_classes(config, media=media)
    return model_class(args_class.from_dict(config))


def check_against_config(
    config: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    origin: dict[str, Path],
    source: Path,
    media: bool = False,
) -> None:
    """Fail before converting anything if a tensor is missing, unexpected or of the wrong shape."""
    from gemma_mlx.loading import check_names_and_shapes

    standins = {name: mx.zeros(shape) for name, shape in shapes.items()}  # lazy: never evaluated
    check_names_and_shapes(lazy_model(config, media), standins, origin, source)


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
    """Check the outputs, build the plan, convert into a staging directory beside `out`, commit it,
    then write the report. Everything that can be checked before reading the source is."""
    start = time.perf_counter()
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise ConfigError(f"shard size: expected a positive number of bytes, got {shard_bytes!r}")
    sources = (source,)
    check_target(out, directory=True, force=force, sources=sources)
    if report_path is not None:
        if report_path.absolute().is_relative_to(out.absolute()):
            raise ConfigError(f"--report {report_path}: must not lie inside OUT ({out})")
        check_target(report_path, directory=False, force=force, sources=sources)
    # MLX keeps freed buffers for reuse; a converter touches each tensor once, so that cache would
    # only grow the resident set.
    previous_cache_limit = mx.set_cache_limit(CACHE_LIMIT_BYTES)
    try:
        plan = make_plan()
        report = Report(source=str(source), source_format=plan.source_format, output=str(out))
        with staged_directory(out, force=force, sources=sources) as staging:
            write_plan(plan, staging, report, progress, shard_bytes)
    finally:
        mx.set_cache_limit(previous_cache_limit)
    report.seconds = time.perf_counter() - start
    if report_path is not None:
        write_file_atomically(report_path, report.save, force=force, sources=sources)
    return report
