"""Converting one tensor: the choice of MLX format, the conversion itself, and its error record.

Large tensors are processed in row chunks, so the float32 copies needed to measure the error never
exceed a few tens of megabytes whatever the tensor's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import mlx.core as mx
import numpy as np
from gemma_mlx.convert.blocks import (
    DEFAULT_REQUANT_BITS,
    EXACT_LAYOUTS,
    FLOAT_TYPES,
    GROUP,
    KEPT_TYPES,
    unpack_rows,
)
from gemma_mlx.convert.mlx_format import (
    QuantizedTensor,
    dequantize,
    from_groups,
    quantize_affine,
    quantized_nbytes,
)
from gguf import GGMLQuantizationType, quants

from gemma_mlx.errors import WeightsError
from gemma_mlx.kernels import q6k

CHUNK_ELEMENTS = 1 << 23  # 32 MB of float32 per chunk


@dataclass
class TensorRecord:
    """One line of the conversion report."""

    name: str
    source: str  # e.g. "Q4_K", "bfloat16", "compressed-tensors int4 g32"
    target: str  # e.g. "affine 4-bit g32 (float32 scales)", "float32"
    shape: tuple[int, ...]
    bits_per_weight: float
    max_abs_error: float
    mean_abs_error: float
    exact: bool

    def to_json(self) -> dict:
        return asdict(self)


class ErrorMeter:
    """Max and mean absolute difference, accumulated chunk by chunk."""

    def __init__(self) -> None:
        self.max = 0.0
        self.total = 0.0
        self.count = 0

    def add(self, converted: np.ndarray, reference: np.ndarray) -> None:
        diff = np.abs(converted.astype(np.float64) - reference.astype(np.float64))
        if diff.size:
            self.max = max(self.max, float(diff.max()))
            self.total += float(diff.sum())
            self.count += diff.size

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


@dataclass
class GGUFBlocks:
    """A weight kept as its GGUF blocks, uint8 [rows, bytes per row] (`KEPT_TYPES`)."""

    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


@dataclass
class Converted:
    """What a tensor becomes: a float array, a quantized one, or GGUF blocks."""

    value: np.ndarray | mx.array | QuantizedTensor | GGUFBlocks

    @property
    def nbytes(self) -> int:
        return self.value.nbytes

    def arrays(self, name: str) -> dict[str, np.ndarray | mx.array]:
        if isinstance(self.value, GGUFBlocks):
            return {name: self.value.data}
        if isinstance(self.value, QuantizedTensor):
            base = name.removesuffix(".weight")
            return {
                f"{base}.weight": self.value.weight,
                f"{base}.scales": self.value.scales,
                f"{base}.biases": self.value.biases,
            }
        return {name: self.value}


def row_chunks(rows: int, columns: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(columns, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def quantize_rows(
    source: np.ndarray | mx.array,
    reference: Callable[[np.ndarray], np.ndarray],
    quantize: Callable[[np.ndarray], QuantizedTensor],
    columns: int,
    meter: ErrorMeter,
) -> QuantizedTensor:
    """Quantize `source` ([..., *] rows) chunk by chunk; `reference` gives a chunk's true values."""
    lead = source.shape[:-1]
    flat = source.reshape(-1, source.shape[-1])
    parts = []
    for rows in row_chunks(flat.shape[0], columns):
        chunk = flat[rows]
        if isinstance(chunk, mx.array):  # bf16 sources: float32 one chunk at a time
            chunk = np.asarray(chunk.astype(mx.float32))
        part = quantize(chunk)
        meter.add(dequantize(part), reference(chunk))
        parts.append(part)
    joined = [
        np.concatenate(a).reshape(*lead, -1)
        for a in zip(*((p.weight, p.scales, p.biases) for p in parts), strict=True)
    ]
    return QuantizedTensor(*joined, parts[0].bits, parts[0].group_size)


def gguf_output_nbytes(
    qtype: GGMLQuantizationType,
    numel: int,
    source_nbytes: int,
    *,
    k_scale_dtype: str = "float32",
    requant_bits: int | None = None,
    dequantize_all: bool = False,
    ndim: int = 2,
) -> int:
    """The bytes `gguf_tensor` will write for this tensor (for the free-space check)."""
    if qtype in FLOAT_TYPES:
        return source_nbytes
    if dequantize_all:
        return numel * 4
    if keeps_blocks(qtype, requant_bits, ndim):
        return source_nbytes
    layout = EXACT_LAYOUTS.get(qtype)
    if layout is None:
        return quantized_nbytes(numel, requant_bits or DEFAULT_REQUANT_BITS, GROUP, 2)
    float32_scales = layout.block_size > GROUP and k_scale_dtype == "float32"
    return quantized_nbytes(numel, layout.bits, GROUP, 4 if float32_scales else 2)


def gguf_tensor(
    name: str,
    qtype: GGMLQuantizationType,
    data: np.ndarray,
    columns: int,
    *,
    norm_shift: float = 0.0,
    k_scale_dtype: str = "float32",
    requant_bits: int | None = None,
    dequantize_all: bool = False,
) -> tuple[Converted, TensorRecord]:
    """Convert one GGUF tensor: exact types keep their grid, Q6_K weights keep their blocks
    (unless `requant_bits` is given), other block types are requantized (`requant_bits`, default
    8); `dequantize_all` gives the float32 values instead (the reference model of the tests)."""
    meter = ErrorMeter()
    shape = (*data.shape[:-1], columns)
    if qtype in FLOAT_TYPES:
        value = (
            np.asarray(data) - np.asarray(norm_shift, dtype=data.dtype)
            if norm_shift
            else np.asarray(data)
        )
        target = FLOAT_TYPES[qtype] + (f" (norm weight - {norm_shift:g})" if norm_shift else "")
        converted = Converted(np.ascontiguousarray(value))
        return converted, make_record(name, qtype.name, target, shape, converted.nbytes, meter)
    if norm_shift:
        raise WeightsError(f"tensor '{name}': a quantized norm weight is not supported")

    def reference(raw: np.ndarray) -> np.ndarray:
        return quants.dequantize(raw, qtype)

    layout = EXACT_LAYOUTS.get(qtype)
    if dequantize_all:
        flat = np.asarray(data).reshape(-1, data.shape[-1])
        value = np.concatenate(
            [reference(flat[rows]) for rows in row_chunks(flat.shape[0], columns)]
        )
        converted = Converted(value.reshape(shape))
        return converted, make_record(
            name, qtype.name, "float32 (dequantized)", shape, converted.nbytes, meter
        )
    if keeps_blocks(qtype, requant_bits, data.ndim):
        raw = np.asarray(data)
        for rows in row_chunks(raw.shape[0], columns):  # what the model decodes, measured
            meter.add(np.asarray(q6k.decode(mx.array(raw[rows]))), reference(raw[rows]))
        converted = Converted(GGUFBlocks(raw))
        return converted, make_record(
            name, qtype.name, f"GGUF {qtype.name} blocks", shape, converted.nbytes, meter
        )
    if layout is not None:
        half_scales = layout.block_size > GROUP and k_scale_dtype == "float16"

        def quantize(raw: np.ndarray) -> QuantizedTensor:
            q, scale, bias = unpack_rows(layout, raw, columns)
            if half_scales:
                scale, bias = scale.astype(np.float16), bias.astype(np.float16)
            return from_groups(q, scale, bias, layout.bits, GROUP)

        value = quantize_rows(np.asarray(data), reference, quantize, columns, meter)
        scales = np.dtype(value.scales.dtype).name
        target = f"affine {layout.bits}-bit g{GROUP} ({scales} scales)"
    else:
        try:
            quants.dequantize(np.asarray(data).reshape(-1, data.shape[-1])[:1], qtype)
        except (NotImplementedError, KeyError, ValueError) as e:
            raise WeightsError(
                f"tensor '{name}': GGUF type {qtype.name} is not supported (no dequantizer)"
            ) from e

        bits = requant_bits or DEFAULT_REQUANT_BITS

        def quantize(raw: np.ndarray) -> QuantizedTensor:
            return quantize_affine(reference(raw), bits, GROUP)

        value = quantize_rows(np.asarray(data), reference, quantize, columns, meter)
        target = f"requantized affine {bits}-bit g{GROUP} (float16 scales)"
    converted = Converted(value)
    return converted, make_record(name, qtype.name, target, shape, converted.nbytes, meter)


def keeps_blocks(qtype: GGMLQuantizationType, requant_bits: int | None, ndim: int) -> bool:
    """Whether a tensor is written as its GGUF blocks: a 2-D weight of a `KEPT_TYPES` type, when
    no requantization was asked for (expert stacks have no layer that runs blocks)."""
    return qtype in KEPT_TYPES and requant_bits is None and ndim == 2


def make_record(
    name: str, source: str, target: str, shape: tuple[int, ...], nbytes: int, meter: ErrorMeter
) -> TensorRecord:
    numel = int(np.prod(shape))
    return TensorRecord(
        name=name,
        source=source,
        target=target,
        shape=tuple(int(s) for s in shape),
        bits_per_weight=8 * nbytes / numel,
        max_abs_error=meter.max,
        mean_abs_error=meter.mean,
        exact=meter.max == 0.0,
    )
