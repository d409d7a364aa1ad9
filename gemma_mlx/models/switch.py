"""Per-expert linear layers for the MoE block: weights [E, out, in], one expert per row of input.

The same module and parameter names as mlx-lm's `SwitchLinear` / `QuantizedSwitchLinear`, so
converted directories load in both; written here so that loading a model never imports mlx-lm
(which pulls in its whole package, transformers and, where installed, torch).
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np


@functools.lru_cache(maxsize=16)
def _rows(batch: tuple[int, ...]) -> mx.array:
    """The lhs indices gather_(q)mm uses by default (every batch entry of x its own row), made on
    the host once per shape: left to MLX they cost an Arange kernel launch per product (90 per
    decoded token of 26B-A4B)."""
    return mx.array(np.arange(math.prod(batch), dtype=np.uint32).reshape(batch))


class SwitchLinear(nn.Module):
    """`x @ weight[e].T` for the expert `e` of each row (`gather_mm`)."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_mm(
            x,
            self.weight.swapaxes(-1, -2),
            lhs_indices=_rows(x.shape[:-2]),
            rhs_indices=indices,
            sorted_indices=sorted_indices,
        )

    def to_quantized(
        self, group_size: int = 64, bits: int = 4, mode: str = "affine"
    ) -> QuantizedSwitchLinear:
        """The quantized layer `nn.quantize` puts in this one's place (weights quantized here)."""
        return QuantizedSwitchLinear(self.weight, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    """`SwitchLinear` with MLX-quantized expert weights (`gather_qmm`)."""

    def __init__(self, weight: mx.array, group_size: int, bits: int, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
        self.biases = biases[0] if biases else None
        self.freeze()

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.get("biases"),
            lhs_indices=_rows(x.shape[:-2]),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )
