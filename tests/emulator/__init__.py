"""Metal kernels on the CPU for CI: see harness.py."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from .harness import Emulator, EmulatorError

__all__ = ["Emulator", "EmulatorError", "shared_emulator"]


@cache
def shared_emulator(build_dir: Path) -> Emulator:
    """One emulator per build directory for the whole test session (its builds are reused)."""
    return Emulator(build_dir)
