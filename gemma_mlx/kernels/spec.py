"""What a kernel is (`KernelSpec`: names and Metal sources) and how one call launches it (`Launch`).

Every wrapper computes its grid, threadgroup, template arguments and output shapes in one
`Launch`, which goes unchanged to `mx.fast.metal_kernel` on a Mac and to the CPU emulator in CI
(`tests/emulator`), so CI runs the launch configuration a Mac would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

import mlx.core as mx

TemplateArg = int | bool | mx.Dtype

# `mx.fast.metal_kernel`, or anything with its signature (the emulator, in tests).
KernelFactory = Callable[..., Callable[..., list[mx.array]]]


@cache
def metal_source(file: str) -> str:
    """A file of the `gemma_mlx.metal` package data, with a `// file:` first line that names it
    (a comment for Metal; the emulator reports errors against it)."""
    text = resources.files("gemma_mlx.metal").joinpath(file).read_text()
    return f"// file: {file}\n{text}"


@dataclass(frozen=True)
class KernelSpec:
    """One `mx.fast.metal_kernel`: parameter names, body file and header files (`metal/`)."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    body: str
    headers: tuple[str, ...] = ("select.h",)
    # False: inputs reach the kernel as they are (a slice of a cache, say), indexed through
    # `<name>_strides`; True: MLX copies a non-contiguous input first.
    row_contiguous: bool = True

    @property
    def source(self) -> str:
        return metal_source(self.body)

    @property
    def header(self) -> str:
        return "".join(metal_source(h) for h in self.headers)


@dataclass(frozen=True)
class Launch:
    """The arguments of one kernel call, as `mx.fast.metal_kernel` takes them."""

    inputs: Sequence[mx.array]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shapes: Sequence[tuple[int, ...]]
    output_dtypes: Sequence[mx.Dtype]
    template: Sequence[tuple[str, TemplateArg]] = ()
    init_value: float | None = None


class Kernels:
    """Builds each kernel once per factory and runs launches on it."""

    def __init__(self, factory: KernelFactory):
        self.factory = factory
        self._built: dict[KernelSpec, Callable[..., list[mx.array]]] = {}

    def run(self, spec: KernelSpec, launch: Launch) -> list[mx.array]:
        kernel = self._built.get(spec)
        if kernel is None:
            kernel = self.factory(
                name=spec.name,
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                source=spec.source,
                header=spec.header,
                ensure_row_contiguous=spec.row_contiguous,
            )
            self._built[spec] = kernel
        return kernel(
            inputs=list(launch.inputs),
            template=list(launch.template),
            grid=launch.grid,
            threadgroup=launch.threadgroup,
            output_shapes=list(launch.output_shapes),
            output_dtypes=list(launch.output_dtypes),
            init_value=launch.init_value,
        )


def placeholder() -> mx.array:
    """A one-element input for a kernel parameter that a template argument switches off."""
    return mx.zeros((1,), mx.uint32)


def whole_groups(threads: int, threadgroup: int) -> int:
    """`threads` rounded up to whole threadgroups (kernels bound-check the tail)."""
    return -(-threads // threadgroup) * threadgroup
