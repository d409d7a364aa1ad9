"""The source a Mac compiles, checked without a Mac.

1. Golden: for every kernel, in float32, bfloat16 and float16 and with inputs passed as `device`
   and as `constant`, the source the emulator compiles (tests/emulator/signature.py) equals byte
   for byte the source MLX itself generates. MLX builds it inside `mx.export_function` tracing
   even without Metal and prints it from C++ with `verbose=True`; we read it from file
   descriptor 1.
2. Strict: that source compiles as C++ for OpenCL with Metal's address spaces mapped to OpenCL's
   (tests/emulator/strict.py), which rejects what the emulator's g++ prelude lets through (a
   pointer or reference without an address space, a device pointer bound to a thread one).
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import pytest
from emulator.harness import check_address_spaces
from emulator.signature import Signature, signature

from gemma_mlx.kernels import drafter_head, moe, q6k, verify
from gemma_mlx.kernels.backend import active_kernels, use_kernel_factory

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
PRINTED = re.compile(r"Generated source code for `([^`]*)`:\n```\n(.*?)\n```\n", re.DOTALL)
LIBC = ctypes.CDLL(None)


@contextmanager
def stdout_fd() -> Iterator[list[str]]:
    """What C++ code writes to file descriptor 1 inside the block (one string, after it)."""
    captured: list[str] = []
    LIBC.fflush(None)
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield captured
        finally:
            LIBC.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        sink.seek(0)
        captured.append(sink.read().decode())


@dataclass(frozen=True)
class Launched:
    """One kernel launch: the arguments that make its source."""

    name: str
    sig: Signature
    header: str
    body: str

    @property
    def source(self) -> str:
        return self.sig.source(self.header, self.body)


class Recorder:
    """A kernel factory: `mx.fast.metal_kernel` with `verbose=True`, and for each launch the
    source the emulator builds for the same arguments."""

    def __init__(self):
        self.launches: list[Launched] = []

    def __call__(
        self,
        name,
        input_names,
        output_names,
        source,
        header="",
        ensure_row_contiguous=True,
        atomic_outputs=False,
    ):
        metal = mx.fast.metal_kernel(
            name=name,
            input_names=input_names,
            output_names=output_names,
            source=source,
            header=header,
            ensure_row_contiguous=ensure_row_contiguous,
            atomic_outputs=atomic_outputs,
        )

        def kernel(*, inputs, output_dtypes, template=(), **launch):
            sig = signature(
                name,
                input_names,
                output_names,
                source,
                inputs,
                output_dtypes,
                template,
                atomic_outputs,
            )
            self.launches.append(Launched(name, sig, header, source))
            return metal(
                inputs=inputs,
                output_dtypes=output_dtypes,
                template=template,
                verbose=True,
                **launch,
            )

        return kernel


def trace(
    operation: Callable[..., object], arrays: list[mx.array]
) -> tuple[list[tuple[str, str]], list[Launched]]:
    """(MLX's printed (name, source) pairs, the emulator's launches) for every kernel that
    `operation(*arrays)` launches on its kernel path, traced (never run) by `mx.export_function`."""
    recorder = Recorder()

    def traced(*args):
        out = operation(*args)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    with (
        tempfile.TemporaryDirectory() as scratch,
        use_kernel_factory(recorder, mode="on"),
        stdout_fd() as printed,
    ):
        mx.export_function(str(Path(scratch) / "traced.mlxfn"), traced, *arrays)
    return PRINTED.findall(printed[0]), recorder.launches


@functools.cache
def traced_case(case: str, dtype: str) -> tuple[list[tuple[str, str]], list[Launched]]:
    operation, arrays = CASES[case](DTYPES[dtype])
    printed, launches = trace(operation, arrays)
    assert launches, f"{case}: no kernel launched (the operation took its reference path)"
    return printed, launches


# ---- one representative call per kernel and instantiation ------------------------------------
# (name, dtype -> (operation, input arrays)); shapes are production ones where the template
# arguments depend on them, small where only the dtype and the `constant`/`device` choice do.


def route_case(tokens: int, experts: int, k: int):
    def make(dtype):
        logits = mx.zeros((tokens, experts), dtype)
        scale = mx.ones((experts,), dtype)
        return (lambda x, s: moe.route(x, s, k)), [logits, scale]

    return make


def dispatch_case(tokens: int, experts: int, k: int):
    def make(dtype):  # ids are integers whatever the model dtype
        ids = mx.zeros((tokens, k), mx.uint32)
        return (lambda i: moe.dispatch(i, experts)), [ids]

    return make


def greedy_case(drafts: int, vocab: int):
    def make(dtype):
        logits = mx.zeros((drafts + 1, vocab), dtype)
        return verify.verify_greedy, [logits, mx.zeros((drafts,), mx.int32)]

    return make


def sampling_case(drafts: int, vocab: int, draft_probs: bool):
    def make(dtype):
        target = mx.zeros((drafts + 1, vocab), dtype)
        ids = mx.zeros((drafts,), mx.int32)
        uniforms = mx.zeros((drafts + 1,), mx.float32)
        if draft_probs:
            return verify.verify_sampling, [target, mx.zeros((drafts, vocab), dtype), ids, uniforms]
        return (lambda t, d, u: verify.verify_sampling(t, None, d, u)), [target, ids, uniforms]

    return make


def head_case(centroids: int, cluster: int, width: int, top_k: int, bits: int):
    def make(dtype):
        scores = mx.zeros((1, centroids), dtype)
        z = mx.zeros((1, width), dtype)
        ordering = mx.zeros((centroids * cluster,), mx.int32)
        rows = 64  # the kernel never learns the table's length
        if bits == 0:
            weight = mx.zeros((rows, width), dtype)

            def operation(s, x, o, w):
                return drafter_head.greedy_token(s, x, o, drafter_head.HeadTable(w), top_k)

            return operation, [scores, z, ordering, weight]
        weight = mx.zeros((rows, width * bits // 32), mx.uint32)
        group = mx.zeros((rows, width // 64), dtype)

        def quantized(s, x, o, w, scales, biases):
            table = drafter_head.HeadTable(w, scales, biases, 64, bits)
            return drafter_head.greedy_token(s, x, o, table, top_k)

        return quantized, [scores, z, ordering, weight, group, group]

    return make


def q6k_rows_case(ids: int):
    def make(dtype):
        blocks = mx.zeros((64, 6 * q6k.BLOCK_BYTES), mx.uint8)
        return (lambda b, i: q6k.rows(b, i, dtype)), [blocks, mx.zeros((ids,), mx.int32)]

    return make


def q6k_matmul_case(rows: int, out_dtype: mx.Dtype | None):
    def make(dtype):
        blocks = mx.zeros((64, 6 * q6k.BLOCK_BYTES), mx.uint8)
        x = mx.zeros((rows, 1536), dtype)
        return (lambda a, b: q6k.matmul(a, b, out_dtype or dtype)), [x, blocks]

    return make


# What our kernels do not use but MLX's signature writer handles: a scalar input (`&`), shape,
# strides and ndim parameters, atomic outputs, dtype/int/bool template arguments, init_value.
PROBE = """
  uint i = thread_position_in_grid.x;
  if (i < uint(x_shape[0]) && x_strides[0] == 1 && x_ndim == 1) {
    atomic_fetch_add_explicit(&total[0], int(float(x[i]) * float(s)), memory_order_relaxed);
  }
"""


def probe_case():
    def make(dtype):
        def operation(x, s):
            kernel = active_kernels().factory(
                name="probe",
                input_names=["x", "s"],
                output_names=["total"],
                source=PROBE,
                atomic_outputs=True,
            )
            return kernel(
                inputs=[x, s],
                template=[("T", dtype), ("N", 3), ("FLAG", True)],
                grid=(32, 1, 1),
                threadgroup=(32, 1, 1),
                output_shapes=[(1,)],
                output_dtypes=[mx.int32],
                init_value=0,
            )

        return operation, [mx.zeros((16,), dtype), mx.array(2.0, dtype)]

    return make


CASES = {
    "probe: scalar, shape/strides/ndim, atomic output": probe_case(),
    "route 26B-A4B": route_case(tokens=1, experts=128, k=8),
    "route 4 experts (scale as constant)": route_case(tokens=3, experts=4, k=2),
    "dispatch 64 tokens": dispatch_case(tokens=64, experts=128, k=8),
    "greedy verify K=3 (drafts as constant)": greedy_case(drafts=3, vocab=262_144),
    "greedy verify K=8": greedy_case(drafts=8, vocab=262_144),
    "sampling verify, draft probabilities": sampling_case(3, 262_144, draft_probs=True),
    "sampling verify, one-hot drafts K=7": sampling_case(7, 262_144, draft_probs=False),
    "drafter head E2B, float table": head_case(2048, 128, 256, 32, bits=0),
    "drafter head, 4-bit table": head_case(2048, 128, 256, 32, bits=4),
    "Q6_K lookup, one token (ids as constant)": q6k_rows_case(ids=1),
    "Q6_K lookup, 16 tokens": q6k_rows_case(ids=16),
    "Q6_K head, decode (float32 logits)": q6k_matmul_case(rows=1, out_dtype=mx.float32),
    "Q6_K projection, verify window of 8": q6k_matmul_case(rows=8, out_dtype=None),
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_emulator_source_equals_mlx_source(case, dtype):
    printed, launches = traced_case(case, dtype)
    assert [name for name, _ in printed] == [k.name for k in launches]
    for (name, theirs), launched in zip(printed, launches, strict=True):
        assert launched.source == theirs, f"{name}: the emulator's source differs from MLX's"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_source_passes_the_strictness_check(case, dtype):
    for launched in traced_case(case, dtype)[1]:
        check_address_spaces(launched.sig, launched.header, launched.body, launched.name)
