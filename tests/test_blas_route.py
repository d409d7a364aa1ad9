"""`gemma_mlx/_blas_route.c`: MLX's cblas_sgemm on Linux, few-row products past OpenBLAS's packing.

Checked against numpy in float64: every transpose, leading dimension and beta the C code
branches on, the few-row kernel's lengths that are not a multiple of its vector width and its
split across threads, output buffers full of NaN (MLX hands BLAS uninitialised memory), and MLX's
own matmuls counted as they pass through it.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from gemma_mlx import _platform

pytestmark = pytest.mark.skipif(
    _platform._router is None, reason=f"no sgemv router in this process ({_platform.blas_in_use})"
)

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
F32P = ctypes.POINTER(ctypes.c_float)


def stored(rng: np.random.Generator, rows: int, cols: int, transposed: bool, pad: int):
    """op(X) is rows x cols; returns the stored matrix (with `pad` unused columns) and op(X)."""
    shape = (cols, rows) if transposed else (rows, cols)
    data = rng.standard_normal((shape[0], shape[1] + pad)).astype(np.float32)
    view = data[:, : shape[1]]
    return data, view.T if transposed else view


def call_sgemm(m, n, k, alpha, a, ta, b, tb, beta, c) -> None:
    _platform._router.cblas_sgemm(
        ROW_MAJOR, TRANS if ta else NO_TRANS, TRANS if tb else NO_TRANS, m, n, k,
        ctypes.c_float(alpha), a.ctypes.data_as(F32P), a.shape[1],
        b.ctypes.data_as(F32P), b.shape[1], ctypes.c_float(beta),
        c.ctypes.data_as(F32P), c.shape[1],
    )  # fmt: skip


@pytest.mark.parametrize(
    "m,n", [(1, 37), (29, 1), (1, 1), (3, 5), (4, 6000), (8, 300), (8, 50000), (9, 40)]
)
def test_every_layout_matches_numpy(m: int, n: int):
    """Row and column products (sgemv), few-row ones (our kernel when B is a row-major weight;
    6000 and 50000 columns split across threads; 8 rows of a small weight go to sgemm), a 9-row
    one (sgemm), with padded leading dimensions, both transposes, alpha, and beta zero (over
    NaN) or not; k = 23 leaves a vector tail."""
    rng = np.random.default_rng(0)
    k = 23
    for ta, tb, beta in itertools.product((False, True), (False, True), (0.0, 0.5)):
        a_data, a = stored(rng, m, k, ta, pad=3)
        b_data, b = stored(rng, k, n, tb, pad=2)
        c0 = rng.standard_normal((m, n + 4)).astype(np.float32)
        c = c0.copy()
        if beta == 0.0:
            c[:] = np.nan  # BLAS must not read y when beta is 0
        call_sgemm(m, n, k, 1.5, a_data, ta, b_data, tb, beta, c)
        want = 1.5 * (a.astype(np.float64) @ b.astype(np.float64))
        if beta:
            want += beta * c0[:, :n]
        np.testing.assert_allclose(c[:, :n], want, rtol=1e-5, atol=1e-5, err_msg=f"{ta=} {tb=}")
        kept = c0[:, n:] if beta else c[:, n:]
        assert np.array_equal(c[:, n:], kept, equal_nan=True), "wrote past the row's n columns"


def product_counts(fn) -> tuple[tuple[int, ...], object]:
    """((sgemv, few-row kernel, sgemm) products `fn` ran, what it returned)."""
    before = _platform.blas_product_counts()
    result = fn()
    after = _platform.blas_product_counts()
    return tuple(b - a for a, b in zip(before, after, strict=True)), result


def test_mlx_products_reach_the_router():
    """MLX's matmuls reach the router: a row times a weight (as `nn.Linear` decodes) is one
    sgemv, 4 rows (a verify) one few-row product, 8 rows one few-row product of a large weight
    and one sgemm of a small (cache-resident) one, a 16-row prompt chunk one sgemm, each equal
    to numpy; routing off sends a row to sgemm."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 64)).astype(np.float32)
    x_mx = mx.array(x)
    small = rng.standard_normal((300, 64)).astype(np.float32)
    large = rng.standard_normal((2**20 // 64, 64)).astype(np.float32)  # 2^20 values
    cases = (
        (True, 1, small, (1, 0, 0)),
        (True, 4, small, (0, 1, 0)),
        (True, 8, small, (0, 0, 1)),
        (True, 8, large, (0, 1, 0)),
        (True, 16, small, (0, 0, 1)),
        (False, 1, small, (0, 0, 1)),
    )
    for routing, rows, w, want in cases:
        w_mx = mx.array(w)
        mx.eval(w_mx, x_mx)
        with _platform.few_row_routing_set(routing):
            counts, out = product_counts(lambda r=rows, w_mx=w_mx: np.array(x_mx[:r] @ w_mx.T))
        assert counts == want, f"{routing=} {rows=} {w.shape=}"
        np.testing.assert_allclose(out, x[:rows].astype(np.float64) @ w.T, rtol=1e-4, atol=1e-4)


def _cpu_seconds_idle_after_threaded_product(seconds: float = 0.06) -> float:
    """CPU time this process burns while idle for `seconds` just after a product big enough
    for OpenBLAS to thread it: ~`seconds` when its idle threads spin, ~0 when they sleep."""
    x = mx.random.normal((512, 512))
    mx.eval(x @ x)
    start = time.process_time()
    time.sleep(seconds)
    return time.process_time() - start


def _idle_cpu_in_a_new_process(environment: dict[str, str]) -> tuple[float, str | None]:
    """(idle CPU seconds after a threaded product, OPENBLAS_THREAD_TIMEOUT once gemma_mlx is
    imported) in a fresh process with `environment`."""
    code = (
        "import os, gemma_mlx, tests.test_blas_route as t; "
        "print(min(t._cpu_seconds_idle_after_threaded_product() for _ in range(3)), "
        f"os.environ.get({_platform.THREAD_TIMEOUT_ENV!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True,
        check=True, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    seconds, timeout = out.stdout.split()[-2:]
    return float(seconds), None if timeout == "None" else timeout


@pytest.mark.skipif(os.cpu_count() == 1, reason="OpenBLAS runs no threads of its own on 1 core")
def test_openblas_threads_sleep_between_products():
    """gemma_mlx loads OpenBLAS with a short thread timeout: after a product its threads sleep
    instead of spinning for the next one (~0.1 s by default), which would take a core from
    MLX's own threads; the environment is left as it was. A caller's own setting is kept:
    with OpenBLAS's default (OPENBLAS_THREAD_TIMEOUT=28) the threads spin, which also shows
    the check can fail."""
    unset = {k: v for k, v in os.environ.items() if k != _platform.THREAD_TIMEOUT_ENV}
    seconds, timeout = _idle_cpu_in_a_new_process(unset)
    assert seconds < 0.02 and timeout is None
    seconds, timeout = _idle_cpu_in_a_new_process(unset | {_platform.THREAD_TIMEOUT_ENV: "28"})
    assert seconds > 0.03 and timeout == "28"


def _other_threads_cpu_ns() -> int:
    """CPU nanoseconds run so far by this process's threads but the calling one."""
    me = threading.get_native_id()
    total = 0
    for task in Path("/proc/self/task").iterdir():
        if int(task.name) != me:
            with contextlib.suppress(OSError):  # a thread that just ended
                total += int((task / "schedstat").read_text().split()[0])
    return total


def _helper_cpu_ns(m: int, n: int, k: int, repeats: int = 100) -> int:
    """CPU time OpenBLAS's helper threads (any thread but this one) spend on `repeats` m x k
    by k x n products, called from this thread through the router (after a pause in which
    earlier work settles)."""
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((n, k), np.float32)
    c = np.empty((m, n), np.float32)
    time.sleep(0.05)
    before = _other_threads_cpu_ns()
    for _ in range(repeats):
        call_sgemm(m, n, k, 1.0, a, False, b, True, 0.0, c)
    spent = _other_threads_cpu_ns() - before
    want = np.einsum("mk,nk->mn", a.astype(np.float64), b)  # numpy's loops: no BLAS threads
    np.testing.assert_allclose(c, want, rtol=1e-4, atol=1e-3)
    return spent


@pytest.mark.skipif(os.cpu_count() == 1, reason="OpenBLAS runs no threads of its own on 1 core")
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux's /proc")
def test_small_sgemm_products_stay_on_the_calling_thread():
    """Products under SINGLE_THREAD_WORK multiply-adds run on the calling thread only (waking
    OpenBLAS's sleeping helper costs more than it saves there); larger ones still use the
    helper threads afterwards, so the thread count was put back. With routing off OpenBLAS
    threads the small one too, which shows the check can fail."""
    small, large = (16, 512, 128), (256, 1024, 512)  # 1 M and 134 M multiply-adds
    assert _helper_cpu_ns(*small) < 1_000_000  # 1 ms over 100 products
    assert _helper_cpu_ns(*large) > 5_000_000
    with _platform.few_row_routing_set(False):
        assert _helper_cpu_ns(*small) > 1_000_000
