"""What machine a result comes from: chip, cores, memory, MLX version and backend, BLAS, bandwidth.

On macOS the chip name comes from sysctl (`Apple M4 Max`) and the GPU core count from
system_profiler (binned M3/M4 Max differ in bandwidth); on Linux the CPU model from /proc/cpuinfo;
on CUDA the GPU name from MLX. `label` names the results file, so runs on the same kind of machine
append to the same file.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import gemma_mlx  # noqa: F401  (preloads OpenBLAS before MLX)

# isort: split
import mlx.core as mx

from benchmarks.bandwidth import Bandwidth, apple_bandwidth, probe
from gemma_mlx import _platform


@dataclass
class Machine:
    label: str
    os: str
    chip: str
    cpu_cores: int
    performance_cores: int | None
    efficiency_cores: int | None
    gpu: str | None
    gpu_cores: int | None
    memory_gb: float
    mlx_version: str
    backend: str  # "metal", "cuda" or "cpu"
    blas: str
    bandwidth: Bandwidth | None

    def as_dict(self) -> dict:
        out = asdict(self)
        out["bandwidth"] = None if self.bandwidth is None else self.bandwidth.as_dict()
        return out


def _run(*command: str) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _sysctl_int(key: str) -> int | None:
    value = _run("sysctl", "-n", key)
    return int(value) if value.isdigit() else None


def backend() -> str:
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "cpu"


def linux_cpu_model(cpuinfo: str) -> str:
    """The `model name` of /proc/cpuinfo (x86) or its `Hardware`/`CPU part` line (Arm)."""
    for key in ("model name", "Hardware", "Processor"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def gpu_core_count(system_profiler_text: str) -> int | None:
    """'Total Number of Cores: 40' in `system_profiler SPDisplaysDataType` output."""
    match = re.search(r"Total Number of Cores:\s*(\d+)", system_profiler_text)
    return int(match.group(1)) if match else None


def _memory_bytes() -> int:
    if sys.platform == "darwin":
        return _sysctl_int("hw.memsize") or 0
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def slug(*parts: str) -> str:
    text = "-".join(p for p in parts if p)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def describe(measure_bandwidth: bool = True) -> Machine:
    """This machine. `measure_bandwidth=False` skips the probe on machines without a table entry."""
    kind = backend()
    gpu = gpu_cores = perf = eff = None
    if sys.platform == "darwin":
        chip = _run("sysctl", "-n", "machdep.cpu.brand_string") or platform.processor()
        perf, eff = (
            _sysctl_int("hw.perflevel0.physicalcpu"),
            _sysctl_int("hw.perflevel1.physicalcpu"),
        )
        gpu = chip
        gpu_cores = gpu_core_count(_run("system_profiler", "SPDisplaysDataType"))
    else:
        cpuinfo = Path("/proc/cpuinfo")
        chip = linux_cpu_model(cpuinfo.read_text() if cpuinfo.is_file() else "")
        if kind == "cuda":
            gpu = mx.device_info().get("device_name")
    memory = _memory_bytes()
    cores = os.cpu_count() or 1

    bandwidth = apple_bandwidth(chip, gpu_cores) if sys.platform == "darwin" else None
    if bandwidth is None and kind == "cpu" and measure_bandwidth:
        bandwidth = probe()
    if sys.platform == "darwin":
        label = slug(chip, f"{gpu_cores}gpu" if gpu_cores else "", f"{round(memory / 2**30)}gb")
    else:
        label = slug(platform.system(), chip, gpu or "", f"{cores}c", f"{round(memory / 2**30)}gb")
    return Machine(
        label=label,
        os=f"{platform.system()} {platform.release()} {platform.machine()}",
        chip=chip,
        cpu_cores=cores,
        performance_cores=perf,
        efficiency_cores=eff,
        gpu=gpu,
        gpu_cores=gpu_cores,
        memory_gb=round(memory / 1e9, 1),
        mlx_version=mx.__version__,
        backend=kind,
        blas=re.sub(
            r"/\S*/", "", _platform.describe_blas()
        ),  # the library's name, not where it lies
        bandwidth=bandwidth,
    )
