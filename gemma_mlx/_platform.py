"""What the machine under MLX is, decided once, before `mlx.core` is imported.

MLX's Linux CPU wheel links the reference (netlib) BLAS: float32 GEMMs run at ~3 GFLOP/s.
A `cblas_sgemm` loaded with global symbol scope *before* MLX is imported takes the place of
the bundled one. Ours is `_blas_route` (a small C extension) bound to OpenBLAS: products with
one row or column, which is every weight product of decoding, run as OpenBLAS's sgemv (~4x the
bytes per second of its sgemm there), those of 2-8 rows (a speculative verify) by its own
kernel that streams the weights once, the rest as OpenBLAS's sgemm (~30x the reference BLAS for
prefill). This module must therefore be imported by `gemma_mlx/__init__.py` ahead of anything
that imports MLX.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BLAS_ENV = "GEMMA_MLX_BLAS"  # a path to an OpenBLAS library, or "off"
ROUTE_ENV = "GEMMA_MLX_ROUTE"  # "off": every product through sgemm (MLX's own behaviour)
_OFF = {"off", "none", "0", "false"}
THREAD_TIMEOUT_ENV = "OPENBLAS_THREAD_TIMEOUT"
THREAD_TIMEOUT = "10"  # 2^10 cycles (OpenBLAS takes 4-30)

# Debian's libopenblas0-pthread, used when the scipy-openblas32 wheel is missing.
_SYSTEM_OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
)
# scipy-openblas32 (a dependency on Linux) prefixes its symbols; Debian's does not.
_SYMBOL_PREFIXES = ("scipy_", "")

blas_in_use: str = "mlx default"
few_row_routing: bool = os.environ.get(ROUTE_ENV, "").lower() not in _OFF  # the process's setting
_router: ctypes.CDLL | None = None


def _openblas_candidates() -> list[str]:
    wanted = os.environ.get(BLAS_ENV, "")
    if wanted:
        return [] if wanted.lower() in _OFF else [wanted]
    candidates = []
    if importlib.util.find_spec("scipy_openblas32") is not None:
        import scipy_openblas32

        lib_dir, name = scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library()
        candidates.append(str(Path(lib_dir) / f"lib{name}.so"))
    return [*candidates, *_SYSTEM_OPENBLAS]


def _router_path() -> str | None:
    spec = importlib.util.find_spec("gemma_mlx._blas_route")
    return spec.origin if spec is not None else None


def _blas_functions(lib: ctypes.CDLL) -> tuple[str, list[int | None]] | None:
    """(symbol prefix, addresses of sgemm, sgemv, set_num_threads, get_num_threads) in an
    OpenBLAS (None for a missing thread function), or None."""
    for prefix in _SYMBOL_PREFIXES:
        names = (
            "cblas_sgemm",
            "cblas_sgemv",
            "openblas_set_num_threads",
            "openblas_get_num_threads",
        )
        found = [getattr(lib, prefix + name, None) for name in names]
        if found[0] is None or found[1] is None:
            continue
        return prefix, [None if f is None else ctypes.cast(f, ctypes.c_void_p).value for f in found]
    return None


@contextmanager
def _short_thread_timeout() -> Iterator[None]:
    """OpenBLAS loaded inside the block lets its idle threads sleep after ~2^THREAD_TIMEOUT
    cycles instead of its 2^28 (~0.1 s): decoding alternates products with MLX's own work, and
    a thread spinning for the next product takes a core from it (on 2 cores, tokens/s of the
    tiny E2B-like model went up ~1.5x at batch 1 and ~1.15x at batch 16). OpenBLAS reads the
    variable as it loads (`import scipy_openblas32` loads it); a setting of the caller's is
    kept, and the environment is left as it was."""
    if THREAD_TIMEOUT_ENV in os.environ:
        yield
        return
    os.environ[THREAD_TIMEOUT_ENV] = THREAD_TIMEOUT
    try:
        yield
    finally:
        del os.environ[THREAD_TIMEOUT_ENV]


def preload_blas() -> str:
    """Put a fast `cblas_sgemm` in the global symbol scope on Linux; return what is in use."""
    if not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return blas_in_use
    with _short_thread_timeout():
        return _preload_blas()


def _preload_blas() -> str:
    global blas_in_use, _router
    router_path = _router_path()
    # With the router, OpenBLAS stays out of the global scope: its own unprefixed cblas_sgemm
    # (Debian's) would otherwise come first and MLX would bypass the router.
    mode = ctypes.RTLD_LOCAL if router_path is not None else ctypes.RTLD_GLOBAL
    for path in _openblas_candidates():
        if not Path(path).exists():
            continue
        try:
            lib = ctypes.CDLL(path, mode=mode)
        except OSError:
            continue
        found = _blas_functions(lib)
        if found is None:
            continue
        prefix, functions = found
        if router_path is not None:
            _router = ctypes.CDLL(router_path, mode=ctypes.RTLD_GLOBAL)
            _router.gemma_blas_bind(*map(ctypes.c_void_p, functions), int(few_row_routing))
            products = (
                "products of 1-8 rows routed" if few_row_routing else f"routing off ({ROUTE_ENV})"
            )
            blas_in_use = f"OpenBLAS ({path}; {products})"
            return blas_in_use
        if not prefix:  # no router built: MLX binds to the library's own cblas_sgemm
            blas_in_use = f"OpenBLAS ({path})"
            return blas_in_use
    return blas_in_use


preload_blas()


@contextmanager
def few_row_routing_set(on: bool) -> Iterator[bool]:
    """Few-row products routed (or not) inside the block, the process's setting after it;
    yields False where there is no router. For comparisons that run engines in turn."""
    if _router is None:
        yield False
        return
    _router.gemma_blas_set_routing(int(on))
    try:
        yield True
    finally:
        _router.gemma_blas_set_routing(int(few_row_routing))


def blas_product_counts() -> tuple[int, int, int] | None:
    """Products since start-up run (as sgemv, by the few-row kernel, as sgemm); None without
    the router."""
    if _router is None:
        return None
    counts = (ctypes.c_int64 * 3)()
    _router.gemma_blas_counts(counts)
    return counts[0], counts[1], counts[2]


def describe_blas() -> str:
    """What `--verbose` prints: the BLAS MLX's float32 products run on, and how to get a fast one."""
    if blas_in_use.startswith("OpenBLAS"):
        return blas_in_use
    if not sys.platform.startswith("linux"):
        return "Accelerate (macOS)" if sys.platform == "darwin" else blas_in_use
    if os.environ.get(BLAS_ENV, "").lower() in _OFF:
        return f"MLX's bundled reference BLAS ({BLAS_ENV}=off)"
    return (
        "MLX's bundled reference BLAS (slow float32 products: reinstall gemma-mlx where a C "
        "compiler is present, which builds gemma_mlx/_blas_route.c for the scipy-openblas32 "
        "wheel, or install Debian's libopenblas0-pthread)"
    )
