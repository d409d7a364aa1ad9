"""The Metal source that `mx.fast.metal_kernel` generates around a kernel body (MLX 0.32).

A port of `write_signature`, `write_template` and the kernel naming in MLX's
`mlx/backend/common/metal_kernel.cpp`, so the emulator compiles exactly the function that MLX would
hand to the Metal compiler. MLX prints that source with `verbose=True`, also without Metal inside
`mx.export_function` tracing: tests/test_kernels_source.py compares the two byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

# Inputs with fewer elements than this are passed in the `constant` address space.
MAX_CONSTANT_ARRAY_SIZE = 8

TYPE_STRINGS = {
    mx.bool_: "bool",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.float32: "float",
}

# (attribute, type) in MLX's order; a body that mentions the name gets the parameter.
ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)

TemplateArg = int | bool | mx.Dtype


def type_string(dtype: mx.Dtype) -> str:
    if dtype not in TYPE_STRINGS:
        raise ValueError(f"metal_kernel: dtype {dtype} has no Metal type")
    return TYPE_STRINGS[dtype]


def template_value(value: TemplateArg) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"  # C++ `ostream << bool`
    if isinstance(value, int):
        return str(value)
    return type_string(value)


def template_type(value: TemplateArg) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    return "typename"


@dataclass(frozen=True)
class InputInfo:
    """What the signature of one input depends on."""

    name: str
    dtype: mx.Dtype
    ndim: int
    size: int
    uses_shape: bool
    uses_strides: bool
    uses_ndim: bool

    @property
    def address_space(self) -> str:
        return "constant" if self.size < MAX_CONSTANT_ARRAY_SIZE else "device"


@dataclass(frozen=True)
class Signature:
    """The generated kernel: its name, template arguments, parameters and attributes."""

    kernel_name: str
    template: tuple[tuple[str, TemplateArg], ...]
    inputs: tuple[InputInfo, ...]
    output_names: tuple[str, ...]
    output_dtypes: tuple[mx.Dtype, ...]
    attributes: tuple[tuple[str, str], ...]
    atomic_outputs: bool

    def template_arguments(self) -> str:
        return ", ".join(template_value(v) for _, v in self.template)

    def declaration(self, header: str, body: str) -> str:
        """`write_signature`: header, template line, `[[kernel]] void name(...) {`, body, `}`."""
        text = header
        if self.template:
            params = ", ".join(f"{template_type(v)} {n}" for n, v in self.template)
            text += f"template <{params}>\n"
        text += f"[[kernel]] void {self.kernel_name}(\n"
        params = []
        index = 0
        for x in self.inputs:
            ref = "&" if x.ndim == 0 else "*"
            params.append(
                f"  const {x.address_space} {type_string(x.dtype)}{ref} {x.name} "
                f"[[buffer({index})]]"
            )
            index += 1
            if x.ndim > 0:
                for used, text_type, suffix in (
                    (x.uses_shape, "const constant int*", "_shape"),
                    (x.uses_strides, "const constant int64_t*", "_strides"),
                    (x.uses_ndim, "const constant int&", "_ndim"),
                ):
                    if used:
                        params.append(f"  {text_type} {x.name}{suffix} [[buffer({index})]]")
                        index += 1
        for name, dtype in zip(self.output_names, self.output_dtypes, strict=True):
            t = type_string(dtype)
            t = f"atomic<{t}>" if self.atomic_outputs else t
            params.append(f"  device {t}* {name} [[buffer({index})]]")
            index += 1
        params += [f"  {t} {a} [[{a}]]" for a, t in self.attributes]
        return text + ",\n".join(params) + ") {\n" + body + "\n}\n"

    def source(self, header: str, body: str) -> str:
        """The whole source MLX hands to the Metal compiler (and prints with `verbose=True`)."""
        return self.declaration(header, body) + self.host_instantiation()

    def host_instantiation(self) -> str:
        """The explicit instantiation MLX appends for templated kernels (Metal only)."""
        if not self.template:
            return ""
        full = f"{self.kernel_name}<{self.template_arguments()}>"
        return (
            f'\ntemplate [[host_name("{self.kernel_name}")]] [[kernel]] decltype({full}) {full};\n'
        )


def template_hash(template: Sequence[tuple[str, TemplateArg]]) -> str:
    """MLX's `make_template_hash`: '<a, b>' -> '_a_b'."""
    text = "<" + ", ".join(template_value(v) for _, v in template) + ">"
    return text.replace(", ", "_").replace("<", "_").replace(">", "_")[:-1]


def signature(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    body: str,
    inputs: Sequence[mx.array],
    output_dtypes: Sequence[mx.Dtype],
    template: Sequence[tuple[str, TemplateArg]],
    atomic_outputs: bool,
) -> Signature:
    kernel_name = f"custom_kernel_{name}"
    if template:
        kernel_name += "_" + template_hash(template)
    for x in inputs:
        kernel_name += "_" + type_string(x.dtype)
        if x.ndim == 0:
            kernel_name += "s"
        elif x.size < MAX_CONSTANT_ARRAY_SIZE:
            kernel_name += "c"
    for dtype in output_dtypes:
        kernel_name += "_" + type_string(dtype)
    infos = tuple(
        InputInfo(
            n,
            x.dtype,
            x.ndim,
            x.size,
            f"{n}_shape" in body,
            f"{n}_strides" in body,
            f"{n}_ndim" in body,
        )
        for n, x in zip(input_names, inputs, strict=True)
    )
    return Signature(
        kernel_name=kernel_name,
        template=tuple(template),
        inputs=infos,
        output_names=tuple(output_names),
        output_dtypes=tuple(output_dtypes),
        attributes=tuple((a, t) for a, t in ATTRIBUTES if a in body),
        atomic_outputs=atomic_outputs,
    )
