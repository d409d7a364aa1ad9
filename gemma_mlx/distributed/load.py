"""Load one rank's part of a model in a group of several ranks (started by `mlx.launch`).

Every rank reads the safetensors headers (names and shapes, no data), agrees on the split with the
others (each rank's memory is gathered first), then materializes only its own tensors: a rank
never holds the whole model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from gemma_mlx import machine_memory
from gemma_mlx.distributed.split import plan_split, rank_tensors
from gemma_mlx.distributed.stage import PipelineError, PipelineModel
from gemma_mlx.distributed.watchdog import Watchdog
from gemma_mlx.errors import OptionError
from gemma_mlx.loading import (
    DEQUANTIZE_FRACTION,
    _final_nbytes,
    _quantized_dense_bytes,
    build_and_check,
    compute_dtype,
    dequantize_modules,
    physical_memory,
)
from gemma_mlx.models import q6k
from gemma_mlx.options import check_int, check_number

DEFAULT_CONTEXT = 8192  # tokens of KV cache each rank's share is planned for
DEFAULT_TIMEOUT = 120.0  # seconds a step may wait on another rank
STARTUP_TIMEOUT = 3600.0  # seconds a rank may wait for the others to find and load the model
TIMEOUT_ENV = "GEMMA_MLX_PIPELINE_TIMEOUT"
CONTEXT_ENV = "GEMMA_MLX_PIPELINE_CONTEXT"


def pipeline_group() -> mx.distributed.Group | None:
    """The group of processes `mlx.launch` started, when there are several; else None."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def _setting(name: str, value: Any, env: str, default: Any) -> Any:
    if value is not None:
        return value
    text = os.environ.get(env)
    if text is None:
        return default
    try:
        return float(text) if isinstance(default, float) else int(text)
    except ValueError as e:
        raise OptionError(f"{env}={text!r}: {name} must be a number") from e


def _in_dtype(value: mx.array, dtype: mx.Dtype) -> mx.array:
    return value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value


def gathered(group: mx.distributed.Group, value: float, watchdog: Watchdog) -> list[float]:
    """Every rank's `value`, in rank order (a float32 sum in which each rank fills its slot).
    Ranks reach it after finding (maybe downloading or converting) and loading their model, at
    their own pace: its deadline is STARTUP_TIMEOUT, never shorter than the step timeout."""
    slots = mx.zeros((group.size(),), mx.float32)
    slots[group.rank()] = value
    with watchdog.step("the other ranks to load", max(STARTUP_TIMEOUT, watchdog.timeout)):
        try:
            total = mx.distributed.all_sum(slots, group=group)
            mx.eval(total)
        except RuntimeError as e:
            raise PipelineError(f"pipeline rank {group.rank()}: {e} (another rank ended)") from e
    return total.tolist()


def load_pipeline(
    path: str | Path,
    group: mx.distributed.Group,
    dtype: mx.Dtype | str | None = None,
    dequantize: bool | None = None,
    context: int | None = None,
    memory: int | None = None,
    timeout: float | None = None,
) -> PipelineModel:
    """This rank's `PipelineModel` of the model directory `path`.

    `context`: tokens of KV cache the split plans for (default 8192, or GEMMA_MLX_PIPELINE_CONTEXT).
    `memory`: bytes this rank may use (default: what `machine_memory.available_memory` says).
    `timeout`: seconds any step may wait on another rank before this process ends with a message
    (default 120, or GEMMA_MLX_PIPELINE_TIMEOUT). `dtype`, `dequantize`: as `load_model`.
    """
    context = check_int("context", _setting("context", context, CONTEXT_ENV, DEFAULT_CONTEXT), 1)
    timeout = _setting("timeout", timeout, TIMEOUT_ENV, DEFAULT_TIMEOUT)
    timeout = check_number("timeout", timeout)
    if timeout <= 0:
        raise OptionError(f"timeout must be positive, got {timeout}")
    rank = group.rank()
    watchdog = Watchdog(timeout, rank)
    model_dir = Path(path)
    model, config, weights = build_and_check(model_dir, media=False)
    dtype = compute_dtype(config, dtype)
    if memory is None:
        memory = machine_memory.available_memory()
    memory = check_int("memory", memory, 1)
    # float32 slots hold whole MiB exactly up to 16 TiB
    memories = [int(m) * 2**20 for m in gathered(group, memory // 2**20, watchdog)]
    sizes = {name: _final_nbytes(value, dtype) for name, value in weights.items()}
    split = plan_split(model.args, sizes, memories, context, dtype.size, str(model_dir))
    names = rank_tensors(list(weights), split, rank, model.args.tie_word_embeddings)
    q6k.set_compute_dtype(model, dtype)
    own = [(name, _in_dtype(weights[name], dtype)) for name in names]
    del weights
    machine_memory.raise_wired_limit()
    model.load_weights(own, strict=False)
    stage = PipelineModel(model, split, group, watchdog)
    stage.dtype = dtype
    del model, own
    for _, value in tree_flatten(stage.parameters()):
        mx.eval(value)  # one tensor at a time: each is read once
    if dequantize is None:
        needed = split.planned_bytes[rank] + _quantized_dense_bytes(stage, dtype)
        limit = DEQUANTIZE_FRACTION * physical_memory()
        dequantize = mx.default_device() == mx.cpu and needed < limit
    if dequantize:
        dequantize_modules(stage, dtype)
        for _, value in tree_flatten(stage.parameters()):
            mx.eval(value)
    stage.eval()
    # Every rank samples alike: one seed for all, drawn by rank 0 (also the end-of-load barrier).
    seed = int.from_bytes(os.urandom(3)) if rank == 0 else 0  # exact in a float32 slot
    mx.random.seed(int(gathered(group, seed, watchdog)[0]))
    return stage
