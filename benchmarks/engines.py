"""The runtimes a benchmark times, behind one interface: token ids in, a stream of token ids out.

Every engine decodes greedily and ignores end-of-sequence (mlx-lm's `benchmark` contract), so each
trial produces exactly the tokens asked for. The harness (`benchmarks.trials`) owns the clock.

- `Ours`: `gemma_mlx.generate.stream_generate` on `gemma_mlx.loading.load` of the model directory.
- `MlxLm`: `mlx_lm.stream_generate` on `mlx_lm.load` of the same directory, given exactly the
  weight treatment our loader applied (on the CPU backend: quantized matrices expanded to dense
  float32 except the per-layer-embedding table, floating weights cast to float32), so the two
  differ only in their implementation; on the CPU with OpenBLAS preloaded this is also mlx-lm's
  fastest setting. With `default_conversion`, the weights `mlx_lm.convert -q` would make instead.
  On Linux every product of an mlx-lm trial goes through OpenBLAS's sgemm, as in mlx-lm's own
  process; `with_routing` gives it our routing of few-row products (`gemma_mlx/_blas_route.c`)
  too, which says how much of a gap is that routing and how much the rest of the stack.
- `LlamaCpp`: llama-cpp-python on the source GGUF, all cores, its default f16 KV cache.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import gemma_mlx

# isort: split
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from benchmarks.roofline import kv_bytes, weight_bytes_per_token
from gemma_mlx import _platform
from gemma_mlx.errors import GemmaMLXError


class EngineError(GemmaMLXError):
    """A peer that cannot run here (not installed, no GGUF, an unsupported option)."""


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def describe_weights(model: nn.Module) -> str:
    """'4-bit g32 quantized: 2 modules; dense float32: 180 tensors' for a loaded model."""
    quantized: dict[str, int] = {}
    for _, module in model.named_modules():
        if hasattr(module, "bits") and hasattr(module, "group_size"):
            key = f"{module.bits}-bit g{module.group_size}"
            quantized[key] = quantized.get(key, 0) + 1
    dense: dict[str, int] = {}
    for _, value in tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            key = str(value.dtype).removeprefix("mlx.core.")
            dense[key] = dense.get(key, 0) + 1
    parts = [f"{k} quantized: {n} modules" for k, n in sorted(quantized.items())]
    parts += [f"{k} tensors: {n}" for k, n in sorted(dense.items())]
    return "; ".join(parts)


def compute_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype activations and the KV cache are in: that of the final norm's weight."""
    return model.model.norm.weight.dtype


class MlxEngine:
    """What the two MLX engines share: a model in this process, its memory and its roofline."""

    name = ""
    measures_memory = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        prefill_step_size: int,
        stream_generate: Callable[..., Iterator[Any]],
        few_row_routing: bool,
        **options: Any,
    ):
        self.model = model
        self.few_row_routing = few_row_routing
        self.tokenizer = tokenizer
        self.prefill_step_size = prefill_step_size
        self._stream_generate = stream_generate
        self._options = options

    def stream(self, prompt: list[int], max_tokens: int) -> Iterator[tuple[int, bool]]:
        # Engines alternate in one process: each trial runs with its own BLAS routing.
        with _platform.few_row_routing_set(self.few_row_routing):
            for response in self._stream_generate(
                self.model,
                self.tokenizer,
                prompt,
                max_tokens=max_tokens,
                prefill_step_size=self.prefill_step_size,
                **self._options,
            ):
                yield response.token, response.from_draft

    @property
    def weight_nbytes(self) -> int:
        return sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))

    def weight_bytes_per_token(self) -> int:
        return weight_bytes_per_token(self.model).total

    def kv_bytes(self, args: Any, context: int) -> int:
        return kv_bytes(args, context, compute_dtype(self.model))


class Ours(MlxEngine):
    name = "gemma_mlx"

    def __init__(self, model_dir: Path, prefill_step_size: int, draft: str | None = None):
        from gemma_mlx.generate import stream_generate
        from gemma_mlx.loading import load

        model, tokenizer = load(model_dir)
        never_stop = dataclasses.replace(tokenizer, eos_token_ids=frozenset())
        options = {} if draft is None else {"draft": draft}
        super().__init__(
            model,
            never_stop,
            prefill_step_size,
            stream_generate,
            _platform.few_row_routing,
            **options,
        )
        self.description = (
            f"gemma_mlx {gemma_mlx.__version__}: {describe_weights(model)}; "
            f"prefill chunks of {prefill_step_size}; MLX {mx.__version__} "
            f"{mx.default_device()}; BLAS: {_platform.describe_blas()}"
            + (f"; draft: {draft}" if draft else "")
        )


class MlxLm(MlxEngine):
    """mlx-lm on the same directory. `default_conversion`: what `mlx_lm.convert -q` would have made
    of these weights instead (affine 4-bit, group 64, in the checkpoint's dtype)."""

    name = "mlx-lm"

    def __init__(
        self,
        model_dir: Path,
        prefill_step_size: int,
        like: Ours,
        default_conversion: bool = False,
        with_routing: bool = False,
    ):
        import mlx_lm

        from gemma_mlx.loading import checkpoint_dtype, dequantize_modules, read_config

        model, tokenizer = mlx_lm.load(str(model_dir))
        if default_conversion:
            from mlx_lm.utils import quantize_model

            self.name = "mlx-lm-default"
            dtype = getattr(mx, checkpoint_dtype(read_config(model_dir)))
            dequantize_modules(model, dtype)
            model.set_dtype(dtype)
            quantize_model(model, {}, group_size=None, bits=None)
            treatment = "re-quantized as mlx_lm.convert -q does"
        else:
            dtype = compute_dtype(like.model)
            if not any(isinstance(m, nn.QuantizedLinear) for _, m in like.model.named_modules()):
                dequantize_modules(model, dtype)
            model.set_dtype(dtype)
            treatment = "given our loader's treatment"
        mx.eval(model.parameters())
        tokenizer._eos_token_ids = set()  # as mlx_lm.benchmark does: never stop early
        if with_routing:
            self.name += "+route"
        super().__init__(model, tokenizer, prefill_step_size, mlx_lm.stream_generate, with_routing)
        products = "few-row products routed (ours)" if with_routing else "products as sgemm"
        self.description = (
            f"mlx-lm {package_version('mlx-lm')}: mlx_lm.load of the same directory, {treatment}: "
            f"{describe_weights(model)}; prefill chunks of {prefill_step_size}; {products}"
        )


def _cpu_has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def load_llama(path: str, **options: Any) -> Any:
    """`llama_cpp.Llama(path, **options)`, without ggml's extra (repacked) weight buffers on CPUs
    with AMX: there ggml's AMX matmul segfaults on the Gemma 3 270M (llama-cpp-python 0.3.36, 2-core
    Xeon). `Llama` does not expose the switch, so its default model parameters are patched for
    the load."""
    import llama_cpp

    if not _cpu_has_amx():
        return llama_cpp.Llama(path, **options)
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffers() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(path, **options)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


class LlamaCpp:
    """llama-cpp-python on the GGUF the MLX directory was converted from."""

    name = "llama.cpp"
    measures_memory = False

    def __init__(self, gguf: Path, context: int, threads: int | None = None):
        try:
            import llama_cpp  # noqa: F401
        except ImportError as e:
            raise EngineError("--vs llama.cpp: pip install llama-cpp-python") from e
        self.gguf = gguf
        threads = threads or os.cpu_count() or 1
        self.llm = load_llama(
            str(gguf),
            n_ctx=context,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=512,
            verbose=False,
        )
        self.description = (
            f"llama-cpp-python {package_version('llama-cpp-python')}: {gguf.name}, "
            f"{threads} threads, batch 512, f16 KV cache"
        )

    def stream(self, prompt: list[int], max_tokens: int) -> Iterator[tuple[int, bool]]:
        self.llm.reset()  # no prefix reuse between trials
        for n, token in enumerate(self.llm.generate(prompt, temp=0.0, reset=True), start=1):
            yield token, False
            if n == max_tokens:
                return

    def weight_bytes_per_token(self) -> int:
        from benchmarks.roofline import gguf_weight_bytes_per_token

        return gguf_weight_bytes_per_token(self.gguf)

    def kv_bytes(self, args: Any, context: int) -> int:
        return kv_bytes(args, context, mx.float16)
