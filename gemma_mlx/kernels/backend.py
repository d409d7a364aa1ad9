"""Which path an operation takes: its Metal kernels, or the composed-MLX reference.

- No Metal (the CPU and CUDA backends): the reference, always.
- On Metal, `GEMMA_MLX_KERNELS` decides:
  - unset or `auto`: the kernels, after a self-check against the reference on random inputs of
    the caller's shapes, once per kernel instantiation (dtypes and template arguments);
  - `on`: the kernels without the self-check;
  - `check`: both paths on every call, compared (debugging; needs evaluated inputs, so not
    inside `mx.compile`);
  - `off`: the reference.
- A kernel that fails to build or its self-check logs one `KernelFallbackWarning` and its
  operation uses the reference from then on. The self-check is the operation's own acceptance
  test (`accepts`); by default the kernel must give the reference's result (`mismatch`), where
  the result is unique; where float32 summation order may move it, `accepts` tests correctness.

Tests put the CPU emulator in Metal's place with `use_kernel_factory`; `trace.py` puts stand-ins
there to count the launches of the kernel path without running it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

import mlx.core as mx

from .spec import KernelFactory, Kernels

ENV = "GEMMA_MLX_KERNELS"
MODES = ("auto", "on", "off", "check")

Out = TypeVar("Out")

# Self-check inputs come from this key, not the global generator, whose stream the caller owns.
CHECK_KEY = mx.random.key(20250)


class KernelFallbackWarning(RuntimeWarning):
    """A Metal kernel failed to build or to match its reference; the reference runs instead."""


def kernel_mode() -> str:
    if _forced_mode is not None:
        return _forced_mode
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of off, on, check (unset means auto)")
    return value


_injected: Kernels | None = None
_forced_mode: str | None = None
_metal: Kernels | None = None


def active_kernels() -> Kernels | None:
    """The kernel builder in use: an injected one, Metal's, or None (no Metal)."""
    global _metal
    if _injected is not None:
        return _injected
    if not mx.metal.is_available():
        return None
    if _metal is None:
        _metal = Kernels(mx.fast.metal_kernel)
    return _metal


@contextmanager
def use_kernel_factory(factory: KernelFactory, mode: str | None = None) -> Iterator[Kernels]:
    """Run kernels through `factory` (`mx.fast.metal_kernel`'s signature) as if Metal were present,
    in `mode` (default: the environment's); every operation starts over (no self-check done, no
    fallback taken) and does again after."""
    global _injected, _forced_mode
    if mode is not None and mode not in MODES:
        raise ValueError(f"kernel mode {mode!r}: expected one of {', '.join(MODES)}")
    previous = _injected, _forced_mode
    _injected, _forced_mode = Kernels(factory), mode
    KernelOp.reset_all()
    try:
        yield _injected
    finally:
        _injected, _forced_mode = previous
        KernelOp.reset_all()


def mismatch(kernel_out, reference_out) -> str | None:
    """Why two results differ (integers exactly, floats to 1e-5 relative), or None."""
    kernel_out = kernel_out if isinstance(kernel_out, tuple) else (kernel_out,)
    reference_out = reference_out if isinstance(reference_out, tuple) else (reference_out,)
    for i, (a, b) in enumerate(zip(kernel_out, reference_out, strict=True)):
        if a.shape != b.shape:
            return f"output {i} has shape {a.shape}, the reference {b.shape}"
        if mx.issubdtype(b.dtype, mx.floating):
            same = mx.allclose(a.astype(mx.float32), b.astype(mx.float32), rtol=1e-5, atol=1e-7)
        else:
            same = mx.array_equal(a, b)
        if not same.item():
            return f"output {i} differs from the reference"
    return None


class KernelOp(Generic[Out]):
    """An operation with a kernel path and a reference path, chosen per call (see module doc).

    `kernel(kernels, *args)` launches the kernels; `reference(*args)` composes MLX ops;
    `instance(*args)` names the kernel instantiation a call needs (self-checked once each);
    `check_args(*args)` makes random valid inputs of the same instantiation for the self-check;
    `accepts(kernel_out, args)` says why the kernel's (evaluated) result for `args` is wrong, or
    None (default: it differs from the reference's, see `mismatch`).
    """

    _all: list[KernelOp] = []  # noqa: RUF012 (registry of every operation, for reset_all)

    def __init__(
        self,
        name: str,
        kernel: Callable[..., Out],
        reference: Callable[..., Out],
        instance: Callable[..., Hashable],
        check_args: Callable[..., tuple],
        accepts: Callable[[Out, tuple], str | None] | None = None,
    ):
        self.name = name
        self.kernel = kernel
        self.reference = reference
        self.instance = instance
        self.check_args = check_args
        self.accepts = accepts or self._matches_reference
        self.reset()
        KernelOp._all.append(self)

    def reset(self) -> None:
        self._checked: set[Hashable] = set()
        self._failed = False

    @classmethod
    def reset_all(cls) -> None:
        for op in cls._all:
            op.reset()

    def __call__(self, *args) -> Out:
        kernels = active_kernels()
        mode = kernel_mode()
        if kernels is None or mode == "off" or self._failed:
            return self.reference(*args)
        if mode == "on":
            return self.kernel(kernels, *args)
        if mode == "check":
            return self._checked_call(kernels, args)
        key = self.instance(*args)
        if key not in self._checked:
            if not self._self_check(kernels, self.check_args(*args)):
                return self.reference(*args)
            self._checked.add(key)
        return self.kernel(kernels, *args)

    def _matches_reference(self, got: Out, args: tuple) -> str | None:
        return mismatch(got, self.reference(*args))

    def _self_check(self, kernels: Kernels, args: tuple) -> bool:
        try:
            got = self.kernel(kernels, *args)
            mx.eval(got)
            problem = self.accepts(got, args)
        except Exception as e:  # a Metal compile error surfaces here, at evaluation
            problem = f"failed to build or run ({type(e).__name__}: {e})"
        if problem:
            self._fall_back(problem)
        return problem is None

    def _checked_call(self, kernels: Kernels, args: tuple) -> Out:
        want = self.reference(*args)
        self._self_check(kernels, args)
        return want

    def _fall_back(self, problem: str) -> None:
        self._failed = True
        warnings.warn(
            f"gemma_mlx: the Metal kernel for `{self.name}` {problem}; using the composed MLX "
            f"path instead ({ENV}=off skips the kernels)",
            KernelFallbackWarning,
            stacklevel=4,
        )
