"""Shared fixtures: tiny random reference checkpoints written once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import gemma_mlx  # noqa: F401  (preloads OpenBLAS before anything imports MLX)

# The compute dtypes of the Mac-dtype lane: float32 (what the CPU backend loads by default) and
# the half precisions a Mac computes in. `load(path, dtype=...)` picks them on the CPU too.
MAC_DTYPES = ("bfloat16", "float16")
DTYPES = ("float32", *MAC_DTYPES)


@pytest.fixture(scope="module", params=DTYPES)
def dtype(request) -> str:
    """Each test that takes it runs once per compute dtype (module scope: one model per dtype).
    A module that needs only the half precisions (its float32 twin runs elsewhere) narrows it:
    `pytestmark = pytest.mark.parametrize("dtype", MAC_DTYPES, indirect=True, scope="module")`."""
    return request.param


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


@pytest.fixture(scope="session")
def emulator(pytestconfig, tmp_path_factory):
    """The Metal-on-CPU emulator (tests/emulator); its builds persist in pytest's cache
    (a temporary directory when the cache plugin is off)."""
    from emulator import shared_emulator

    cache = getattr(pytestconfig, "cache", None)
    builds = cache.mkdir("metal-emulator") if cache else tmp_path_factory.mktemp("metal-emulator")
    return shared_emulator(builds)


@pytest.fixture
def kernels(emulator):
    """The kernel path on the emulator with no self-check, so what runs is the kernel itself."""
    from gemma_mlx.kernels.backend import use_kernel_factory

    with use_kernel_factory(emulator.metal_kernel, mode="on"):
        yield emulator
