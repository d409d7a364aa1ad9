"""The element-wise chains of Gemma's layers, compiled into one kernel each: GeGLU and the final
logit softcap. At batch 1 a decoded token is launch-bound on small models, and these run once per
layer (GeGLU) or once per token over the vocabulary. They live beside the kernels because the
fused projection kernels apply them in their epilogue, with these as their reference.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn


@partial(mx.compile, shapeless=True)
def geglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.gelu_approx(gate) * up


@partial(mx.compile, shapeless=True)
def _tanh_cap(x: mx.array, cap: float) -> mx.array:
    return mx.tanh(x / cap) * cap


def softcap(x: mx.array, cap: float | None) -> mx.array:
    return x if cap is None else _tanh_cap(x, cap)
