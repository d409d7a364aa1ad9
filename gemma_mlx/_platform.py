"""What the machine under MLX is, decided once, before `mlx.core` is imported.

MLX's Linux CPU wheel links the reference (netlib) BLAS: float32 GEMMs run at ~3 GFLOP/s.
Loading an OpenBLAS with global symbol scope *before* MLX is imported makes MLX's
`cblas_sgemm` resolve to it (~30x faster prefill). This module must therefore be imported
by `gemma_mlx/__init__.py` ahead of anything that imports MLX.
"""

from __future__ import annotations

import ctypes
import os
import sys
import sysconfig
from pathlib import Path

# Candidates in order of preference. Debian's pthread build measured fastest here;
# cmeel-openblas (a PyPI wheel with plain symbol names) is the fallback on a fresh machine.
_SYSTEM_OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
)
_WHEEL_OPENBLAS = Path("cmeel.prefix") / "lib" / "libopenblas.so.0"

BLAS_ENV = "GEMMA_MLX_BLAS"  # a path to a BLAS library, or "off"

blas_in_use: str = "mlx default"


def _openblas_candidates() -> list[str]:
    wanted = os.environ.get(BLAS_ENV, "")
    if wanted:
        return [] if wanted.lower() in {"off", "none", "0"} else [wanted]
    site = Path(sysconfig.get_paths()["purelib"])
    return [*_SYSTEM_OPENBLAS, str(site / _WHEEL_OPENBLAS)]


def preload_blas() -> str:
    """Load an OpenBLAS into the global symbol scope on Linux; return what is in use."""
    global blas_in_use
    if not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return blas_in_use
    for path in _openblas_candidates():
        if not Path(path).exists():
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        blas_in_use = f"OpenBLAS ({path})"
        break
    return blas_in_use


preload_blas()


def describe_blas() -> str:
    """What `--verbose` prints: the BLAS MLX's float32 products run on, and how to get a fast one."""
    if blas_in_use.startswith("OpenBLAS"):
        return blas_in_use
    if not sys.platform.startswith("linux"):
        return "Accelerate (macOS)" if sys.platform == "darwin" else blas_in_use
    if os.environ.get(BLAS_ENV, "").lower() in {"off", "none", "0"}:
        return f"MLX's bundled reference BLAS ({BLAS_ENV}=off)"
    return (
        "MLX's bundled reference BLAS (slow float32 products: install Debian's "
        "libopenblas0-pthread or `pip install cmeel-openblas`)"
    )
