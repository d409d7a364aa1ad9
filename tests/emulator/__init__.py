"""Metal kernels on the CPU for CI: see harness.py."""

from __future__ import annotations

from pathlib import Path

from .harness import Emulator, EmulatorError, options_from_environment, shared

__all__ = ["Emulator", "EmulatorError", "shared_emulator"]


def shared_emulator(build_dir: Path) -> Emulator:
    """One emulator per build directory for the whole test session (its builds are reused), with
    the switches GEMMA_MLX_EMULATOR sets (see harness.py)."""
    options = options_from_environment()
    return shared(Path(build_dir), options["order"], options["fma"])
