"""How much memory this machine can give a model now, and the Mac's wired-memory limit.

On a Mac, Metal reports the working set it recommends (`max_recommended_working_set_size`, about
two thirds to three quarters of the unified memory); past it the GPU pages and slows down many
times over, so that, less what MLX holds already, is what a model and its caches may take. Elsewhere
it is the RAM the kernel says is available (`MemAvailable`: free memory plus reclaimable caches),
plus MLX's own buffer cache, which MLX reuses before asking for more.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx

MEMINFO = Path("/proc/meminfo")


def recommended_working_set() -> int | None:
    """Metal's recommended working set in bytes; None off Metal."""
    if not mx.metal.is_available():
        return None
    size = mx.metal.device_info().get("max_recommended_working_set_size")
    return int(size) if size else None


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _mem_available() -> int | None:
    """/proc/meminfo's MemAvailable in bytes (None where there is no such file)."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory() -> int:
    """Bytes this process can still allocate for model weights, caches and activations."""
    recommended = recommended_working_set()
    if recommended is not None:
        return max(0, recommended - mx.get_active_memory())
    available = _mem_available()
    if available is None:  # no /proc (macOS without Metal): what the machine has, less MLX's
        available = max(0, physical_memory() - mx.get_active_memory())
    return available + mx.get_cache_memory()


def raise_wired_limit() -> None:
    """On a Mac, let Metal keep up to the recommended working set wired (resident), as mlx-lm
    does while it generates: a model near that size is otherwise paged between steps. No-op
    elsewhere."""
    recommended = recommended_working_set()
    if recommended is not None:
        mx.set_wired_limit(recommended)
