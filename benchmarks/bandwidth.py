"""Memory bandwidth: Apple M-series specifications as data, and a probe for other machines.

A decode step reads every active weight once, so `bandwidth / bytes per token` bounds decode
speed (the roofline). On a Mac the bound is the chip's specified unified-memory bandwidth, from
the table below (each row names its source). Elsewhere, `probe` measures a
STREAM-style copy: one thread (MLX's CPU ops run on one thread), bytes read plus bytes written per
second. It is a probe, not a specification, and is labelled as such wherever it is used.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass

import numpy as np

LLMCHECK = "https://llmcheck.net/blog/apple-silicon-memory-bandwidth-llm"
PEPELAC = "pepelac.news (M5 Pro/Max announcement coverage)"
LILAC = "lilaclabs.ai (M3 Ultra)"
ORVA = "orva.online (M5)"


@dataclass(frozen=True)
class ChipBandwidth:
    chip: str  # as in "Apple M4 Max", without "Apple "
    gbs: float  # specified memory bandwidth, GB/s (1e9 bytes)
    source: str
    gpu_cores: int | None = None  # set where binned variants of the chip differ in bandwidth


M_SERIES: tuple[ChipBandwidth, ...] = (
    ChipBandwidth("M1", 68, LLMCHECK),
    ChipBandwidth("M1 Pro", 200, LLMCHECK),
    ChipBandwidth("M1 Max", 400, LLMCHECK),
    ChipBandwidth("M1 Ultra", 800, LLMCHECK),
    ChipBandwidth("M2", 100, LLMCHECK),
    ChipBandwidth("M2 Pro", 200, LLMCHECK),
    ChipBandwidth("M2 Max", 400, LLMCHECK),
    ChipBandwidth("M2 Ultra", 800, LLMCHECK),
    ChipBandwidth("M3", 100, LLMCHECK),
    ChipBandwidth("M3 Pro", 150, LLMCHECK),
    ChipBandwidth("M3 Max", 300, LLMCHECK, gpu_cores=30),
    ChipBandwidth("M3 Max", 400, LLMCHECK, gpu_cores=40),
    ChipBandwidth("M3 Ultra", 819, LILAC),
    ChipBandwidth("M4", 120, LLMCHECK),
    ChipBandwidth("M4 Pro", 273, LLMCHECK),
    ChipBandwidth("M4 Max", 410, LLMCHECK, gpu_cores=32),
    ChipBandwidth("M4 Max", 546, LLMCHECK, gpu_cores=40),
    ChipBandwidth("M5", 153, ORVA),
    ChipBandwidth("M5 Pro", 307, PEPELAC),
    ChipBandwidth("M5 Max", 614, PEPELAC),
)


@dataclass(frozen=True)
class Bandwidth:
    """The bandwidth a result is compared with, and where that number comes from."""

    gbs: float
    kind: str  # "spec" (published) or "probe" (measured here)
    source: str

    def as_dict(self) -> dict:
        return asdict(self)


def chip_model(name: str) -> str:
    """'Apple M4 Max' -> 'M4 Max' (the key of the table)."""
    return re.sub(r"^Apple\s+", "", name.strip())


def apple_bandwidth(chip: str, gpu_cores: int | None = None) -> Bandwidth | None:
    """The specified bandwidth of an Apple chip; None for a chip the table does not list.

    Binned chips (M3 Max, M4 Max) need the GPU core count; without it the full chip is assumed
    and the source says so.
    """
    rows = [r for r in M_SERIES if r.chip == chip_model(chip)]
    if not rows:
        return None
    exact = [r for r in rows if r.gpu_cores is None or r.gpu_cores == gpu_cores]
    if exact:
        row = exact[0]
        return Bandwidth(row.gbs, "spec", row.source)
    row = max(rows, key=lambda r: r.gbs)
    note = (
        "GPU core count unknown: full chip assumed"
        if gpu_cores is None
        else (f"no entry for {gpu_cores} GPU cores: full chip assumed")
    )
    return Bandwidth(row.gbs, "spec", f"{row.source} ({note})")


def probe(megabytes: int = 256, repeats: int = 5) -> Bandwidth:
    """Single-thread copy bandwidth of this machine, best of `repeats` (about a second)."""
    src = np.ones(megabytes * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return Bandwidth(
        round(2 * src.nbytes / best / 1e9, 1),
        "probe",
        f"single-thread copy probe of {megabytes} MiB (numpy), read + write bytes / s",
    )
