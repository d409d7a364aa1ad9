"""The kernel path's graph without Metal: each kernel launch becomes one stand-in node.

For counting what a step launches on Metal (`benchmarks`, tests): `kernel_path()` makes every
`KernelOp` take its kernel path, with kernels that compute nothing but give outputs of the right
shapes through a single `mx.depends` node reading all the kernel's inputs, so the kernel shows as
one primitive (`Depends`) in `mx.export_to_dot`. Each launch is also kept as the `Launch` its
wrapper built (grid, threadgroup, inputs), for the launch geometry.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import mlx.core as mx

from .backend import use_kernel_factory
from .spec import Launch


def _leaf(shape: Sequence[int], dtype: mx.Dtype) -> mx.array:
    """An evaluated array of `shape` holding one element (zero strides): no memory, no node."""
    out = mx.broadcast_to(mx.zeros((), dtype), tuple(shape))
    mx.eval(out)
    return out


class Launches(Counter[str]):
    """Launches by kernel name; `calls` holds each one, in order, as (kernel name, Launch)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, Launch]] = []


class StandInKernels:
    """A kernel factory (`mx.fast.metal_kernel`'s signature) whose launches are recorded in
    `launches` and computed by nothing."""

    def __init__(self):
        self.launches = Launches()

    def __call__(self, name: str, input_names, output_names, source: str, header: str = "", **_):
        def kernel(
            *, inputs, grid, threadgroup, output_shapes, output_dtypes, template=(), **_
        ) -> list[mx.array]:
            launch = Launch(inputs, grid, threadgroup, output_shapes, output_dtypes, template)
            self.launches[name] += 1
            self.launches.calls.append((name, launch))
            outputs = [_leaf(s, d) for s, d in zip(output_shapes, output_dtypes, strict=True)]
            return mx.depends(outputs, list(inputs))

        return kernel


@contextmanager
def kernel_path() -> Iterator[Launches]:
    """Trace the kernel path as Metal would dispatch it; yields the launches, by kernel name."""
    stand_ins = StandInKernels()
    with use_kernel_factory(stand_ins, mode="on"):
        yield stand_ins.launches
