"""Shared fixtures: tiny random reference checkpoints written once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import gemma_mlx  # noqa: E402,F401  (preloads OpenBLAS before anything imports MLX)


@pytest.fixture(scope="session")
def reference_checkpoints(tmp_path_factory):
    """variant name -> (directory, torch model); built lazily, once per session."""
    from hf_reference import VARIANTS, save_reference

    built: dict[str, tuple[Path, object]] = {}

    def get(name: str):
        if name not in built:
            directory = tmp_path_factory.mktemp(f"ref-{name}")
            built[name] = (directory, save_reference(VARIANTS[name](), directory))
        return built[name]

    return get
