"""The element-wise chains of Gemma's layers, compiled into one kernel each: GeGLU and the final
logit softcap. At batch 1 a decoded token is launch-bound on small models, and these run once per
layer (GeGLU) or once per token over the vocabulary. They live beside the kernels because the
fused projection kernels apply them in their epilogue, with these as their reference.

`rms_norm` and `rope` too, off the GPU: MLX's CPU backend composes `mx.fast.rms_norm` from 11
operations (a square, a sum and nine element-wise ones, each a task of its own) and
`mx.fast.rope` at per-row positions from 30; compiled they are three and thirteen, with the same
values bit for bit. Gemma 4 runs five to seven norms and two RoPEs per layer. On Metal (and
CUDA) each is one kernel already and runs as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from math import pi, sqrt

import mlx.core as mx

_GELU_SCALE = sqrt(2 / pi)


@partial(mx.compile, shapeless=True)
def geglu(gate: mx.array, up: mx.array) -> mx.array:
    """`nn.gelu_approx(gate) * up` with the cube as two products: MLX's CPU backend computes
    `x ** 3` with a scalar powf per element, which made the whole chain 2.7x slower."""
    cube = gate * gate * gate
    return 0.5 * gate * (1 + mx.tanh(_GELU_SCALE * (gate + 0.044715 * cube))) * up


@partial(mx.compile, shapeless=True)
def _tanh_cap(x: mx.array, cap: float) -> mx.array:
    return mx.tanh(x / cap) * cap


def softcap(x: mx.array, cap: float | None) -> mx.array:
    return x if cap is None else _tanh_cap(x, cap)


@partial(mx.compile, shapeless=True)
def _compiled_rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, weight, eps)


_as_on_gpu = False


def _composed_here() -> bool:
    """Whether MLX composes its fast operations where the arrays go: its CPU backend."""
    return mx.default_device() == mx.cpu and not _as_on_gpu


@contextmanager
def as_on_gpu() -> Iterator[None]:
    """Run the fast operations as a GPU runs them (uncompiled), wherever the arrays go: for
    counting what a step launches on Metal from a CPU trace (`benchmarks.graph`)."""
    global _as_on_gpu
    previous, _as_on_gpu = _as_on_gpu, True
    try:
        yield
    finally:
        _as_on_gpu = previous


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """`mx.fast.rms_norm`, compiled where it is composed (the CPU)."""
    if _composed_here():
        return _compiled_rms_norm(x, weight, eps)
    return mx.fast.rms_norm(x, weight, eps)


def _rope(x, dims, base, scale, offset, freqs):
    return mx.fast.rope(
        x, dims, traditional=False, base=base, scale=scale, offset=offset, freqs=freqs
    )


_compiled_rope = mx.compile(_rope)


def rope(
    x: mx.array,
    dims: int,
    base: float | None,
    scale: float,
    offset: int | mx.array,
    freqs: mx.array | None,
) -> mx.array:
    """`mx.fast.rope` (rotate-half layout), compiled on the CPU for rows at their own positions
    (`offset` an array; a batched decode step's one-position rows, whose few shapes the compile
    cache keeps; an int offset would be a new compile per position)."""
    if _composed_here() and isinstance(offset, mx.array) and x.shape[-2] == 1:
        return _compiled_rope(x, dims, base, scale, offset, freqs)
    return _rope(x, dims, base, scale, offset, freqs)
