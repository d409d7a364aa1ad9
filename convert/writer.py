"""Streaming output: sharded safetensors written as tensors arrive, and the safe move into place.

Only one shard's worth of tensors (`shard_bytes`) is held in memory at a time, which bounds the
converter's peak memory whatever the model's size.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma_mlx.errors import GemmaMLXError

DEFAULT_SHARD_BYTES = 1 << 29  # 512 MiB: the in-memory buffer is one shard


class OutputExistsError(GemmaMLXError, FileExistsError):
    """OUT exists and --force was not given."""


class ShardWriter:
    """Collects tensors into shards of at most `shard_bytes` and writes each when full."""

    def __init__(self, directory: Path, shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = directory
        self.shard_bytes = shard_bytes
        self.pending: dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, tuple[int, ...]]] = []
        self.total_bytes = 0

    def add(self, name: str, value: np.ndarray | mx.array) -> None:
        array = value if isinstance(value, mx.array) else mx.array(value)
        if self.pending and self.pending_bytes + array.nbytes > self.shard_bytes:
            self._flush()
        self.pending[name] = array
        self.pending_bytes += array.nbytes
        self.total_bytes += array.nbytes

    def _flush(self) -> None:
        index = len(self.shards) + 1
        mx.save_safetensors(str(self.directory / f"shard-{index:05d}.safetensors"), self.pending)
        self.shards.append({k: tuple(v.shape) for k, v in self.pending.items()})
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> dict[str, tuple[int, ...]]:
        """Write the last shard, name the shards mlx-lm's way, write the index; returns shapes."""
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        weight_map, shapes = {}, {}
        for i, names in enumerate(self.shards, start=1):
            final = (
                "model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            )
            (self.directory / f"shard-{i:05d}.safetensors").rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
            shapes.update(names)
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        write_json(self.directory / "model.safetensors.index.json", index)
        return shapes


def write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def staged_output(out: Path, force: bool = False) -> Iterator[Path]:
    """A temporary directory beside `out`, renamed to `out` only if the block completes.

    An existing `out` is refused without `force`, and with it replaced only at the very end, so an
    interrupted or failed conversion leaves the previous state untouched and nothing half-written.
    """
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists: pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(staging, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
