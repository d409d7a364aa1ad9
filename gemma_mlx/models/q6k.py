"""Layers whose weight is GGUF Q6_K blocks, kept exactly: the tied embedding / head of Google's
QAT GGUFs and the Q6_K projections of K-quant mixes.

A converted directory stores such a weight as `<module>.weight`, uint8 [rows, in / 256 * 210]
(the GGUF bytes), and marks the module in config.json's "quantization" with `mode` = MODE. The
loader swaps the model's `nn.Linear` / `nn.Embedding` there for the layers below
(`use_q6k_layers`). Lookups read only the rows they need and round once to the compute dtype;
products accumulate in float32 (`gemma_mlx.kernels.q6k`: one kernel each on Metal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from gemma_mlx.kernels import q6k
from gemma_mlx.kernels.operands import Matrix

MODE = q6k.MODE
# What config.json says about the layout besides the mode (readers that print the entries).
ENTRY = {"group_size": 16, "bits": 6, "mode": MODE}


def table(rows: int, columns: int) -> mx.array:
    """A zero Q6_K table of `rows` x `columns` weights (the shape the loader checks)."""
    if columns % q6k.BLOCK_WEIGHTS:
        raise ValueError(
            f"a Q6_K weight needs rows of a multiple of {q6k.BLOCK_WEIGHTS} values, got {columns}"
        )
    return mx.zeros((rows, columns // q6k.BLOCK_WEIGHTS * q6k.BLOCK_BYTES), mx.uint8)


@dataclass(frozen=True)
class Q6KMatrix(Matrix):
    """A Q6_K weight as the fused layer kernels take their operands (`kernels.operands`): a form
    they do not read (so they run the composed path), whose product is `q6k.matmul`."""

    def __call__(self, x: mx.array) -> mx.array:
        return q6k.matmul(x, self.weight, x.dtype)

    @property
    def columns(self) -> int:
        return q6k.columns(self.weight)

    def kernel_form(self) -> None:
        return None


class Q6KLinear(nn.Module):
    """`x @ W.T` for a Q6_K weight W [out, in]; the result in x's dtype, summed in float32."""

    def __init__(self, input_dims: int, output_dims: int):
        super().__init__()
        self.weight = table(output_dims, input_dims)

    def __call__(self, x: mx.array) -> mx.array:
        return q6k.matmul(x, self.weight, x.dtype)

    def matrix(self) -> Q6KMatrix:
        return Q6KMatrix(self.weight, mode=MODE)

    def dense(self, dtype: mx.Dtype) -> nn.Linear:
        rows, columns = self.weight.shape[0], q6k.columns(self.weight)
        layer = nn.Linear(columns, rows, bias=False)
        layer.weight = q6k.dequantize(self.weight).astype(dtype)
        return layer


class Q6KEmbedding(nn.Module):
    """An embedding table in Q6_K. A lookup returns `compute_dtype` rows (each weight exact in
    float32, rounded once); as a tied head it returns float32 logits."""

    def __init__(self, num_embeddings: int, dims: int):
        super().__init__()
        self.weight = table(num_embeddings, dims)
        self.compute_dtype = mx.float32

    def __call__(self, ids: mx.array) -> mx.array:
        return q6k.rows(self.weight, ids, self.compute_dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        return q6k.matmul(x, self.weight, mx.float32)

    def dense(self, dtype: mx.Dtype) -> nn.Embedding:
        layer = nn.Embedding(self.weight.shape[0], q6k.columns(self.weight))
        layer.weight = q6k.dequantize(self.weight).astype(dtype)
        return layer


Q6K_LAYERS = (Q6KLinear, Q6KEmbedding)


def use_q6k_layers(model: nn.Module, quantization: dict[str, Any]) -> set[str]:
    """Swap the modules that config.json's "quantization" marks MODE for Q6_K layers; returns
    their paths. A bad entry raises ValueError naming the module."""
    marked = {
        path
        for path, entry in quantization.items()
        if isinstance(entry, dict) and entry.get("mode") == MODE
    }
    modules = dict(model.named_modules())
    replacements = []
    for path in sorted(marked):
        module = modules.get(path)
        if isinstance(module, nn.Linear) and "bias" not in module:
            out_dims, in_dims = module.weight.shape
            layer = Q6KLinear(in_dims, out_dims)
        elif isinstance(module, nn.Embedding):
            layer = Q6KEmbedding(*module.weight.shape)
        else:
            kind = "no module" if module is None else type(module).__name__
            raise ValueError(
                f"'{path}': mode {MODE!r} is for a linear layer without bias or an embedding, "
                f"the model has {kind} there"
            )
        replacements.append((path, layer))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    return marked


def set_compute_dtype(model: nn.Module, dtype: mx.Dtype) -> None:
    """The dtype Q6_K embedding lookups return (the model's compute dtype)."""
    for _, module in model.named_modules():
        if isinstance(module, Q6KEmbedding):
            module.compute_dtype = dtype


def dense_nbytes(module: nn.Module, dtype: mx.Dtype) -> int:
    """Bytes of the module's weight expanded to `dtype` (0 for other modules)."""
    if not isinstance(module, Q6K_LAYERS):
        return 0
    return module.weight.shape[0] * q6k.columns(module.weight) * dtype.size
