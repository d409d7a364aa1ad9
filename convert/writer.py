"""Streaming output: sharded safetensors written as tensors arrive (into a staging directory that
`gemma_mlx.outputs.staged_directory` commits).

Only one shard's worth of tensors (`shard_bytes`) is held in memory at a time, which bounds the
converter's peak memory whatever the model's size.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma_mlx.outputs import fault_point, save_safetensors

DEFAULT_SHARD_BYTES = 1 << 29  # 512 MiB: the in-memory buffer is one shard


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
        save_safetensors(self.directory / f"shard-{index:05d}.safetensors", self.pending)
        fault_point("shard")
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
