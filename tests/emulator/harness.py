"""Run `mx.fast.metal_kernel` bodies on the CPU: g++, a Metal prelude and cooperative fibers.

`Emulator.metal_kernel(...)` has the signature of `mx.fast.metal_kernel`, and the kernel it returns
is called like MLX's (`inputs=`, `template=`, `grid=`, `threadgroup=`, `output_shapes=`,
`output_dtypes=`, `init_value=`), so code written for Metal runs here unchanged. A call:

1. generates the source MLX would generate (`signature.py`): header, templated `[[kernel]]`
   signature with MLX's parameter names, types and address spaces, the body;
2. rewrites `threadgroup` declarations into storage shared by the fibers of a threadgroup, and
   adds `#line` markers so errors name the `.metal`/`.h` file and line;
3. checks the source's address spaces with clang as C++ for OpenCL (`strict.py`: g++ below
   erases them), then compiles it once per distinct source with g++ against `prelude.h` (the
   Metal builtins we implement; anything else is a compile error) and links the fiber runtime
   (`runtime.cpp`);
4. runs it over the same grid and threadgroup as MLX (threadgroup clamped to the grid), threads
   as fibers that meet at every barrier and SIMD-group function, in a seeded shuffled order;
5. returns the outputs as `mx.array`s. Outputs start as 0xFF bytes (MLX leaves them
   uninitialised) unless `init_value` is given; guard bytes around every buffer catch writes
   out of bounds.

A kernel made with `ensure_row_contiguous=False` gets each input of two or more dimensions as
a view into a larger buffer (every axis but the first longer, the rest NaN), as MLX passes a
slice of a cache, so it must index them through `<name>_strides`.

Where a Mac may compute differently, two switches make the emulator adversarial:

- `order="random"`: every SIMD-group sum and prefix sum (`simd_sum`, `simd_prefix_*_sum`) adds
  the lanes in a random order (a random permutation under a random binary tree, drawn per call
  from the launch's seed; `simd_sum` gives all lanes one result) instead of a fixed pairwise
  tree. Metal leaves the order unspecified.
- `fma=True`: the kernel is compiled with `-ffp-contract=fast` (and `-mfma` on x86-64 CPUs that
  have FMA), so `a * b + c` may be one fused multiply-add, as the Metal compiler may make it.

`Emulator(build_dir, order="random", fma=True)` sets both; from a test, `emulator.variant(
order="random", fma=True)` gives the shared emulator of the same build directory with those
switches; `GEMMA_MLX_EMULATOR=random,fma` makes them the default of `shared_emulator` (the
conftest's `emulator` fixture). Comparisons under them must tolerate the rounding the math
allows (and every seed gives another order: `seed=`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import platform
import re
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import strict
from .signature import Signature, TemplateArg, signature, type_string

HERE = Path(__file__).parent
CXX = "g++"
CXXFLAGS = ["-std=c++20", "-O1", "-fPIC", "-Wall", "-Wno-attributes", "-Wno-unused"]
# GCC contracts a * b + c only with -fexpensive-optimizations (part of -O2) and a target with FMA.
FMA_FLAGS = ["-fexpensive-optimizations", "-ffp-contract=fast"]
ORDERS = ("fixed", "random")
OPTIONS_ENV = "GEMMA_MLX_EMULATOR"
# Files whose change must rebuild (and re-check) every kernel.
TOOLCHAIN = ("prelude.h", "metal_scalars.h", "runtime.h", "metal_opencl.h", "strict.py")
GUARD = 256  # bytes before and after every buffer
GUARD_BYTE = 0xFF  # NaN for floats, all ones for integers: out-of-bounds reads show


class EmulatorError(RuntimeError):
    """A kernel that does not compile, breaks a Metal rule, or writes out of bounds."""


# Metal kernel sources that the emulator rejects because they would not behave the same on Metal.
LINT_RULES = (
    (
        re.compile(r"\bconst\s+(device|constant)\b|\b(device|constant)\s+const\b"),
        "declares a pointer or reference to an input with an address space: MLX passes inputs "
        "with fewer than 8 elements as `constant` and larger ones as `device`, so the type breaks "
        "on Metal for some sizes; use `auto` or a template parameter instead",
    ),
    (
        re.compile(r"^\s*#\s*include\b", re.MULTILINE),
        "includes a file: MLX compiles the kernel from a string, so headers must be passed "
        "through `header=`",
    ),
)

# `threadgroup <type> <name>[dims];` or `threadgroup <type> <name>;` (no pointer): a declaration.
THREADGROUP_DECLARATION = re.compile(
    r"\bthreadgroup\s+((?:[A-Za-z_][\w:]*(?:<[^;{}()<>]*>)?\s+)+?)"
    r"([A-Za-z_]\w*)\s*((?:\[[^\]]+\]\s*)*);"
)


def rewrite_threadgroup(text: str) -> str:
    """Threadgroup declarations -> static storage (shared by a threadgroup's fibers, which run one
    threadgroup at a time), poisoned at the start of each threadgroup; other uses of the
    address-space keyword (pointer parameters) are dropped."""

    def declare(m: re.Match) -> str:
        type_, name, dims = m.group(1).strip(), m.group(2), m.group(3).strip()
        return (
            f"static {type_} {name}{dims}; "
            f'emu_threadgroup_memory(&{name}, sizeof({name}), "{name}", '
            f"__builtin_FILE(), __builtin_LINE());"
        )

    text = THREADGROUP_DECLARATION.sub(declare, text)
    return re.sub(r"\bthreadgroup\b", "", text)


def threadgroup_references(text: str) -> str:
    """Threadgroup declarations -> references to threadgroup memory, for the strictness check
    (OpenCL declares __local variables only in kernel functions, and MLX's kernel is a template
    function); other uses of the keyword keep it."""

    def declare(m: re.Match) -> str:
        type_, name, dims = m.group(1).strip(), m.group(2), m.group(3).strip()
        return f"auto& {name} = emu_threadgroup<{type_}{dims}>();"

    return THREADGROUP_DECLARATION.sub(declare, text)


def lint(text: str, where: str) -> None:
    for rule, why in LINT_RULES:
        m = rule.search(text)
        if m:
            line = text.count("\n", 0, m.start()) + 1
            raise EmulatorError(f"{where}:{line}: `{m.group(0).strip()}` {why}")


def split_sections(text: str, unnamed: str) -> list[tuple[str, str]]:
    """[(file name, text)] from a header or body made of `// file: NAME` sections (see
    gemma_mlx.kernels.spec), each text starting at the file's line 1; text before the first
    marker (all of it, without markers) is named `unnamed`."""
    parts = re.split(r"^// file: (\S+)\n", text, flags=re.MULTILINE)
    sections = [(unnamed, parts[0])] if parts[0].strip() else []
    sections += [(parts[i], parts[i + 1]) for i in range(1, len(parts), 2)]
    return sections


ATTRIBUTE_VALUES = {
    "dispatch_quadgroups_per_threadgroup": "(ids->simdgroups_per_threadgroup * 8)",
    "dispatch_simdgroups_per_threadgroup": "ids->simdgroups_per_threadgroup",
    "dispatch_threads_per_threadgroup": "v3(ids->threads_per_threadgroup)",
    "grid_origin": "uint3{0, 0, 0}",
    "grid_size": "v3(ids->threads_per_grid)",
    "quadgroup_index_in_threadgroup": "(ids->thread_index_in_threadgroup / 4)",
    "quadgroups_per_threadgroup": "((n_threads(ids) + 3) / 4)",
    "simdgroup_index_in_threadgroup": "ids->simdgroup_index_in_threadgroup",
    "simdgroups_per_threadgroup": "ids->simdgroups_per_threadgroup",
    "thread_execution_width": "32u",
    "thread_index_in_quadgroup": "(ids->thread_index_in_threadgroup % 4)",
    "thread_index_in_simdgroup": "ids->thread_index_in_simdgroup",
    "thread_index_in_threadgroup": "ids->thread_index_in_threadgroup",
    "thread_position_in_grid": "v3(ids->thread_position_in_grid)",
    "thread_position_in_threadgroup": "v3(ids->thread_position_in_threadgroup)",
    "threadgroup_position_in_grid": "v3(ids->threadgroup_position_in_grid)",
    "threadgroups_per_grid": "v3(ids->threadgroups_per_grid)",
    "threads_per_grid": "v3(ids->threads_per_grid)",
    "threads_per_simdgroup": "32u",
    "threads_per_threadgroup": "v3(ids->threads_per_threadgroup)",
}


def launcher(sig: Signature) -> str:
    """`emu_kernel_entry(buffers, ids)`: calls the kernel with buffers in MLX's order."""
    args = []
    index = itertools.count()
    for x in sig.inputs:
        t = type_string(x.dtype)
        args.append(
            f"*(const {t}*)b[{next(index)}]" if x.ndim == 0 else f"(const {t}*)b[{next(index)}]"
        )
        if x.ndim > 0:
            if x.uses_shape:
                args.append(f"(const int*)b[{next(index)}]")
            if x.uses_strides:
                args.append(f"(const int64_t*)b[{next(index)}]")
            if x.uses_ndim:
                args.append(f"*(const int*)b[{next(index)}]")
    for dtype in sig.output_dtypes:
        t = type_string(dtype)
        t = f"atomic<{t}>" if sig.atomic_outputs else t
        args.append(f"({t}*)b[{next(index)}]")
    args += [ATTRIBUTE_VALUES[a] for a, _ in sig.attributes]
    call = sig.kernel_name
    if sig.template:
        call += f"<{sig.template_arguments()}>"
    joined = ",\n      ".join(args)
    return f"""
// ---- emulator launcher ----
static uint3 v3(const unsigned* v) {{ return uint3{{v[0], v[1], v[2]}}; }}
static uint n_threads(const emu_ids* ids) {{
  return ids->threads_per_threadgroup[0] * ids->threads_per_threadgroup[1] *
         ids->threads_per_threadgroup[2];
}}
extern "C" void emu_kernel_entry(void** b, const emu_ids* ids) {{
  (void)n_threads;
  {call}(
      {joined});
}}
"""


@functools.cache
def translation_unit(sig: Signature, header: str, body: str, body_file: str) -> str:
    """The C++ file: prelude, header sections and body under their own names, launcher."""
    parts = ['#include "prelude.h"\n']
    for name, text in split_sections(header, "<header>"):
        lint(text, name)
        parts.append(f'#line 1 "{name}"\n{rewrite_threadgroup(text)}\n')
    body_parts = []
    for name, text in split_sections(body, body_file):
        lint(text, name)
        body_parts.append(f'#line 1 "{name}"\n{rewrite_threadgroup(text)}')
    declaration = sig.declaration("", "".join(body_parts))
    parts.append(f'#line 1 "{strict.SIGNATURE_FILE}"\n{declaration}')
    parts.append(f'#line 1 "<emulator launcher>"\n{launcher(sig)}')
    return "".join(parts)


def check_address_spaces(sig: Signature, header: str, body: str, body_file: str) -> None:
    """`strict.py`'s check of the source MLX would generate, as an EmulatorError."""
    unit, sections = strict.unit_text(
        sig,
        split_sections(header, "<header>"),
        split_sections(body, body_file),
        threadgroup_references,
    )
    try:
        strict.check(unit, sections)
    except strict.StrictnessError as e:
        raise EmulatorError(f"{sig.kernel_name}: {e}") from None


def fma_flags() -> list[str]:
    """FMA_FLAGS, with -mfma where the CPU has FMA (x86-64; arm64 always has it)."""
    if platform.machine() in ("x86_64", "AMD64"):
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists() and re.search(r"^flags\b.*\bfma\b", cpuinfo.read_text(), re.M):
            return [*FMA_FLAGS, "-mfma"]
    return list(FMA_FLAGS)


def options_from_environment() -> dict:
    """`order` and `fma` from GEMMA_MLX_EMULATOR (comma-separated: `random`, `fma`)."""
    words = {w.strip() for w in os.environ.get(OPTIONS_ENV, "").split(",") if w.strip()}
    unknown = words - {"random", "fma"}
    if unknown:
        raise EmulatorError(f"{OPTIONS_ENV}: unknown option(s) {sorted(unknown)}; use random, fma")
    return {"order": "random" if "random" in words else "fixed", "fma": "fma" in words}


@functools.cache
def shared(build_dir: Path, order: str, fma: bool) -> Emulator:
    """One emulator per build directory and options for the whole test session."""
    return Emulator(build_dir, order=order, fma=fma)


class Emulator:
    """Compiles and runs kernels; built objects live under `build_dir` (one per source and
    flags). `order` and `fma`: see the module's docstring."""

    def __init__(self, build_dir: Path, seed: int = 0, order: str = "fixed", fma: bool = False):
        if order not in ORDERS:
            raise ValueError(f"order={order!r}: expected one of {', '.join(ORDERS)}")
        self.build_dir = Path(build_dir)
        self.build_dir.mkdir(parents=True, exist_ok=True)
        self.seeds = itertools.count(seed)
        self.order = order
        self.fma = fma
        self.flags = CXXFLAGS + (fma_flags() if fma else [])
        self.launches = 0
        self._libraries: dict[str, ctypes.CDLL] = {}
        self._toolchain = b"".join((HERE / f).read_bytes() for f in TOOLCHAIN)
        self._runtime = self._build_runtime()

    def variant(self, order: str = "fixed", fma: bool = False) -> Emulator:
        """The shared emulator of this build directory with other switches."""
        return shared(self.build_dir, order, fma)

    def metal_kernel(
        self,
        name: str,
        input_names: Sequence[str],
        output_names: Sequence[str],
        source: str,
        header: str = "",
        ensure_row_contiguous: bool = True,
        atomic_outputs: bool = False,
        body_file: str | None = None,
    ):
        """`mx.fast.metal_kernel`'s signature; `body_file` names the body in error messages."""
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")

        def kernel(
            *,
            inputs: Sequence[mx.array],
            output_shapes: Sequence[Sequence[int]],
            output_dtypes: Sequence[mx.Dtype],
            grid: tuple[int, int, int],
            threadgroup: tuple[int, int, int],
            template: Sequence[tuple[str, TemplateArg]] = (),
            init_value: float | None = None,
            verbose: bool = False,
            stream=None,
        ) -> list[mx.array]:
            if len(inputs) != len(input_names):
                raise ValueError(
                    f"[metal_kernel] Expected `inputs` to have size {len(input_names)} but got "
                    f"size {len(inputs)}."
                )
            sig = signature(
                name,
                input_names,
                output_names,
                source,
                inputs,
                output_dtypes,
                template,
                atomic_outputs,
            )
            if verbose:  # as MLX prints it
                print(
                    f"Generated source code for `{name}`:\n```\n{sig.source(header, source)}\n```"
                )
            where = body_file or f"<{name} body>"
            unit = translation_unit(sig, header, source, where)
            library = self._library(unit, lambda: check_address_spaces(sig, header, source, where))
            return self._launch(
                library,
                sig,
                inputs,
                output_shapes,
                output_dtypes,
                grid,
                threadgroup,
                init_value,
                ensure_row_contiguous,
            )

        return kernel

    # ---- building ----------------------------------------------------------------------------

    def _build_runtime(self) -> ctypes.CDLL:
        sources = [HERE / "runtime.cpp", HERE / "runtime.h"]
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
        path = self.build_dir / f"libemu_runtime_{digest}.so"
        if not path.exists():
            self._compile(
                [str(HERE / "runtime.cpp"), "-O2", "-shared", "-o", str(path)],
                "the emulator runtime",
                CXXFLAGS,
            )
        runtime = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        runtime.emu_run.restype = ctypes.c_int
        runtime.emu_run.argtypes = [
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_uint),
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_ulonglong,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_ulong,
        ]
        self._runtime_path = path
        return runtime

    def _library(self, unit: str, check: Callable[[], None]) -> ctypes.CDLL:
        """The built kernel; `check` runs before each compilation (a build is kept only when it
        passed)."""
        if unit in self._libraries:
            return self._libraries[unit]
        flags = " ".join(self.flags).encode()
        key = hashlib.sha256(self._toolchain + unit.encode() + flags).hexdigest()
        source = self.build_dir / f"kernel_{key[:16]}.cpp"
        path = self.build_dir / f"kernel_{key[:16]}.so"
        if not path.exists():
            check()
            source.write_text(unit)
            self._compile(
                [
                    str(source),
                    "-shared",
                    "-o",
                    str(path),
                    str(self._runtime_path),
                    f"-Wl,-rpath,{self.build_dir}",
                ],
                f"kernel source {source}",
                self.flags,
            )
        library = ctypes.CDLL(str(path))
        self._libraries[unit] = library
        return library

    def _compile(self, args: list[str], what: str, flags: list[str]) -> None:
        command = [CXX, *flags, f"-I{HERE}", *args]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise EmulatorError(f"g++ failed on {what}:\n{done.stderr}")

    # ---- running -----------------------------------------------------------------------------

    def _launch(
        self,
        library,
        sig,
        inputs,
        output_shapes,
        output_dtypes,
        grid,
        threadgroup,
        init_value,
        row_contiguous=True,
    ) -> list[mx.array]:
        seed = next(self.seeds)
        rng = np.random.default_rng(seed)
        buffers: list[tuple[str, GuardedBuffer]] = []
        for info, x in zip(sig.inputs, inputs, strict=True):
            data = host_array(x)
            if row_contiguous or data.ndim < 2:
                buffer, strides = GuardedBuffer.of(data), row_strides(x.shape)
            else:  # as a view into a larger buffer (a slice of a cache) reaches the kernel
                buffer, strides = GuardedBuffer.padded(data, rng)
            buffers.append((info.name, buffer))
            if info.uses_shape and info.ndim > 0:
                buffers.append(
                    (f"{info.name}_shape", GuardedBuffer.of(np.array(x.shape, np.int32)))
                )
            if info.uses_strides and info.ndim > 0:
                buffers.append(
                    (f"{info.name}_strides", GuardedBuffer.of(np.array(strides, np.int64)))
                )
            if info.uses_ndim and info.ndim > 0:
                buffers.append((f"{info.name}_ndim", GuardedBuffer.of(np.array(x.ndim, np.int32))))
        outputs = []
        for name, shape, dtype in zip(sig.output_names, output_shapes, output_dtypes, strict=True):
            out = GuardedBuffer.empty(tuple(shape), HOST_DTYPES[dtype], init_value)
            outputs.append(out)
            buffers.append((name, out))
        group = [min(t, g) for t, g in zip(threadgroup, grid, strict=True)]  # as MLX does
        pointers = (ctypes.c_void_p * len(buffers))(*(b.pointer for _, b in buffers))
        error = ctypes.create_string_buffer(4096)
        entry = ctypes.cast(library.emu_kernel_entry, ctypes.c_void_p)
        status = self._runtime.emu_run(
            entry,
            pointers,
            (ctypes.c_uint * 3)(*grid),
            (ctypes.c_uint * 3)(*group),
            seed,
            int(self.order == "random"),
            error,
            len(error),
        )
        self.launches += 1
        if status != 0:
            raise EmulatorError(f"{sig.kernel_name}: {error.value.decode()}")
        for name, b in buffers:
            b.check(name)
        return [
            device_array(o.array, dtype) for o, dtype in zip(outputs, output_dtypes, strict=True)
        ]


def row_strides(shape: Sequence[int]) -> list[int]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return strides[::-1]


# numpy dtype of a buffer; bfloat16 travels as its bits (numpy has no bfloat16).
HOST_DTYPES = {
    mx.bool_: np.dtype(np.bool_),
    mx.uint8: np.dtype(np.uint8),
    mx.uint16: np.dtype(np.uint16),
    mx.uint32: np.dtype(np.uint32),
    mx.uint64: np.dtype(np.uint64),
    mx.int8: np.dtype(np.int8),
    mx.int16: np.dtype(np.int16),
    mx.int32: np.dtype(np.int32),
    mx.int64: np.dtype(np.int64),
    mx.float16: np.dtype(np.float16),
    mx.bfloat16: np.dtype(np.uint16),
    mx.float32: np.dtype(np.float32),
}


def host_array(x: mx.array) -> np.ndarray:
    if x.dtype == mx.bfloat16:
        return np.array(x.view(mx.uint16))
    return np.array(x)


def device_array(a: np.ndarray, dtype: mx.Dtype) -> mx.array:
    if dtype == mx.bfloat16:
        return mx.array(a).view(mx.bfloat16)
    return mx.array(a)


class GuardedBuffer:
    """A C-contiguous array with GUARD bytes of a known pattern on both sides."""

    def __init__(self, raw: np.ndarray, array: np.ndarray):
        self.raw = raw
        self.array = array

    @classmethod
    def empty(cls, shape, dtype: np.dtype, init_value: float | None) -> GuardedBuffer:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = np.full(GUARD + nbytes + GUARD, GUARD_BYTE, dtype=np.uint8)
        array = raw[GUARD : GUARD + nbytes].view(dtype).reshape(shape)
        if init_value is None:
            raw[GUARD : GUARD + nbytes] = 0xFF
        else:
            array[...] = init_value
        return cls(raw, array)

    @classmethod
    def of(cls, data: np.ndarray) -> GuardedBuffer:
        buffer = cls.empty(data.shape, data.dtype, None)
        buffer.array[...] = data
        return buffer

    @classmethod
    def padded(cls, data: np.ndarray, rng: np.random.Generator) -> tuple[GuardedBuffer, list[int]]:
        """`data` as the leading corner of a larger array (every axis but the first 1-3 longer),
        the layout a slice of a bigger buffer has, with that array's strides; the padding holds
        GUARD_BYTE, so a kernel that ignores the strides reads NaN."""
        outer = data.shape[:1] + tuple(n + int(rng.integers(1, 4)) for n in data.shape[1:])
        buffer = cls.empty(outer, data.dtype, None)
        buffer.array[tuple(slice(0, n) for n in data.shape)] = data
        return buffer, row_strides(outer)

    @property
    def pointer(self) -> int:
        return self.raw.ctypes.data + GUARD

    def check(self, name: str) -> None:
        if (self.raw[:GUARD] != GUARD_BYTE).any() or (self.raw[-GUARD:] != GUARD_BYTE).any():
            raise EmulatorError(f"the kernel wrote outside buffer `{name}`")
