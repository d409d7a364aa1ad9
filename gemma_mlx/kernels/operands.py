"""What the fused layer kernels take: an RMSNorm's weight, a linear layer's matrix, a RoPE.

Each is a small record of arrays and numbers with the composed MLX op it stands for
(`__call__`), written as the model's own modules compute it, so that a fused operation's
reference path is the model's composed code, bit for bit (the tests/test_kernels_*.py of each
operation check it against the modules). Models build them from their modules (`Norm.of`, `Matrix.of`,
`Rotary.of`) by attribute; nothing here imports the models.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import mlx.core as mx
import mlx.nn as nn

from .activations import rms_norm, rope

LINEAR_LAYERS = (nn.Linear, nn.QuantizedLinear)
# Affine widths whose codes fill whole 32-bit words lane by lane (16 values per lane).
KERNEL_BITS = (2, 4, 8)
VALUES_PER_LANE = 16


@dataclass(frozen=True)
class Norm:
    """`mx.fast.rms_norm(x, (weight + offset) * scale, eps)`: Gemma 4's norms (w), Gemma 1-3's
    (offset 1: 1 + w), the MoE router's (scale: 1 / sqrt(hidden)), the weightless V norm."""

    weight: mx.array | None
    eps: float
    offset: float = 0.0
    scale: float = 1.0

    def __call__(self, x: mx.array) -> mx.array:
        if self.weight is None:
            return rms_norm(x, None, self.eps)
        w = self.weight + self.offset if self.offset else self.weight
        if self.scale != 1.0:
            w = w * self.scale
        return rms_norm(x, w, self.eps)

    @classmethod
    def of(cls, module) -> Norm:
        """From a module with `eps`, optional `weight` and `offset` (models.base.RMSNorm)."""
        return cls(module.get("weight"), module.eps, getattr(module, "offset", 0.0))

    def constants(self, dtype: mx.Dtype) -> tuple[float, float]:
        """(offset, scale) as the kernel applies them: rounded to `dtype`, as MLX rounds a Python
        number it combines with an array of that dtype."""
        return rounded(self.offset, dtype), rounded(self.scale, dtype)

    @property
    def size(self) -> int | None:
        return None if self.weight is None else self.weight.shape[0]


@dataclass(frozen=True)
class Matrix:
    """y = x @ W.T for a linear layer's weight [out, in], or its MLX-quantized packing."""

    weight: mx.array
    scales: mx.array | None = None
    biases: mx.array | None = None
    group_size: int = 0
    bits: int = 0
    mode: str = "affine"

    def __call__(self, x: mx.array) -> mx.array:
        if self.scales is None:
            return x @ self.weight.T
        return mx.quantized_matmul(
            x,
            self.weight,
            scales=self.scales,
            biases=self.biases,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )

    def float32_product(self, x: mx.array) -> mx.array:
        """The product summed in float32, rounded to x's dtype: what MLX's Metal kernels and
        ours compute (its CPU kernel sums a half-precision quantized product in half precision,
        which is further from the exact product)."""
        if not self.quantized:
            return self(x)
        wide = Matrix(
            self.weight,
            self.scales.astype(mx.float32),
            self.biases.astype(mx.float32) if self.biases is not None else None,
            self.group_size,
            self.bits,
            self.mode,
        )
        return wide(x.astype(mx.float32)).astype(x.dtype)

    @classmethod
    def of(cls, layer: nn.Module) -> Matrix:
        """From nn.Linear or nn.QuantizedLinear without a bias (whose call is this product), or
        a layer that gives its own form (`matrix()`: GGUF Q6_K blocks, `models.q6k`)."""
        if hasattr(layer, "matrix"):
            return layer.matrix()
        if not isinstance(layer, LINEAR_LAYERS) or "bias" in layer:
            raise TypeError(f"Matrix.of: {type(layer).__name__} is not a linear layer without bias")
        if "scales" not in layer:
            return cls(layer["weight"])
        return cls(
            layer["weight"],
            layer["scales"],
            layer.get("biases"),
            layer.group_size,
            layer.bits,
            layer.mode,
        )

    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    @property
    def columns(self) -> int:
        if self.scales is None:
            return self.weight.shape[1]
        return self.weight.shape[1] * 32 // self.bits

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    @property
    def dtype(self) -> mx.Dtype:
        return self.weight.dtype if self.scales is None else self.scales.dtype

    def kernel_form(self) -> tuple | None:
        """(bits, group size) the kernels read it in, 0 bits for a dense matrix; None for what
        they do not read (another quantization mode, widths that straddle words, no biases)."""
        if not self.quantized:
            return 0, 0
        ok = (
            self.mode == "affine"
            and self.biases is not None
            and self.bits in KERNEL_BITS
            and self.group_size % VALUES_PER_LANE == 0
        )
        return (self.bits, self.group_size) if ok else None


@dataclass(frozen=True)
class Rotary:
    """`mx.fast.rope` over the first `dims` of a head, rotate-half layout: `base`, or per-pair
    wavelengths `freqs` (inf leaves a pair unrotated: Gemma 4's proportional RoPE); positions
    times `scale`."""

    dims: int
    base: float | None
    scale: float
    freqs: mx.array | None = None

    def __call__(self, x: mx.array, offset: int | mx.array) -> mx.array:
        return rope(x, self.dims, self.base, self.scale, offset, self.freqs)

    @classmethod
    def of(cls, module) -> Rotary:
        """From models.base.RoPE (`head_dim`, `base`, `scale`, `_freqs`)."""
        return cls(module.head_dim, module.base, module.scale, module._freqs)


@cache
def placeholder() -> mx.array:
    """A one-element input where a template argument switches a parameter off (data, so no
    graph node and no launch of its own)."""
    return mx.array([0], mx.uint32)


@cache
def float_constants(values: tuple[float, ...]) -> mx.array:
    """A kernel's float32 parameters, made once per distinct values (data, no graph node)."""
    return mx.array(values, mx.float32)


@cache
def rounded(value: float, dtype: mx.Dtype) -> float:
    """`value` rounded to `dtype`, back as a Python float (once per value: no call into MLX on
    a decode step)."""
    return mx.array(value, dtype).item()
