"""Prefix cache: KV snapshots of earlier requests, reused when a new prompt starts with their tokens.

Agent loops re-send the whole conversation every step; with this cache a request prefills only what
no snapshot holds. Snapshots are copies taken at useful boundaries (the end of each prompt, the end
of each reply), kept least-recently-used first within a byte budget.

Exactness past the sliding window: a rotating cache keeps only `window - 1 + max_trim` positions,
so once it has wrapped it can forget at most `max_trim` of its newest tokens. A snapshot is reused
only when every layer can be cut back to the shared prefix (`cache.max_trim`); otherwise a shorter
snapshot (or none) is used. What the model then sees is exactly what a fresh run sees.

With a disk tier (`gemma_mlx.server.prefix_disk`, `--prompt-cache-dir`) every snapshot is also
written to a file, so that what memory evicts, and what a restarted server never computed, is
found again: a prompt takes the longest usable snapshot in memory or on disk, and one read from
disk comes back into memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx

from gemma_mlx.cache import shared_prefix
from gemma_mlx.server.prefix_disk import DiskTier


@dataclass(frozen=True)
class _Snapshot:
    """Copies of every layer cache's state after `tokens`."""

    tokens: tuple[int, ...]
    states: tuple[tuple[mx.array, ...], ...]
    meta: tuple[tuple[str, ...], ...]
    nbytes: int


class PrefixCache:
    """LRU snapshots within `budget_bytes` (0 turns the cache off), and in `disk` when given;
    safe to call from any thread, though the engine calls it only from its own."""

    def __init__(
        self, make_cache: Callable[[], list], budget_bytes: int, disk: DiskTier | None = None
    ):
        if budget_bytes < 0:
            raise ValueError(f"prompt cache budget must be >= 0 bytes, got {budget_bytes}")
        self.make_cache = make_cache
        self.budget_bytes = budget_bytes
        self.disk = disk
        self._entries: OrderedDict[tuple[int, ...], _Snapshot] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0  # held by the snapshots

    def __len__(self) -> int:
        return len(self._entries)

    def fetch(self, tokens: Sequence[int]) -> tuple[list, int]:
        """(a fresh cache holding `tokens[:n]`, n) for the longest usable snapshot; n < len(tokens),
        so at least one token is left to run. (new cache, 0) when no snapshot helps."""
        limit = len(tokens) - 1
        with self._lock:
            on_disk = [] if self.disk is None else self.disk.keys()
            candidates = sorted(  # the longest first; in memory before on disk
                [(min(shared_prefix(key, tokens), limit), True, key) for key in self._entries]
                + [(min(shared_prefix(key, tokens), limit), False, key) for key in on_disk],
                reverse=True,
            )
            for n, in_memory, key in candidates:
                if n == 0:
                    break
                if in_memory:
                    cache = self._restore(self._entries[key])
                    self._entries.move_to_end(key)
                elif key in self._entries or (cache := self.disk.get(key)) is None:
                    continue  # held in memory too (tried above), or a damaged file
                else:
                    self._keep(key, cache)
                drop = len(key) - n
                if all(c.max_trim >= drop for c in cache):
                    for c in cache:
                        c.trim(drop)
                    return cache, n
        return self.make_cache(), 0

    def store(self, tokens: Sequence[int], cache: list) -> None:
        """Keep a copy of `cache`, which holds exactly `tokens` (`cache[0].offset` of them)."""
        if not tokens or self.budget_bytes == 0:
            return
        if cache and cache[0].offset != len(tokens):
            raise ValueError(f"the cache holds {cache[0].offset} tokens, not {len(tokens)}")
        with self._lock:
            self._keep(tuple(tokens), cache)
        if self.disk is not None:
            self.disk.put(tokens, cache)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def _keep(self, key: tuple[int, ...], cache: list) -> None:
        """Hold a copy of `cache` (holding `key`) in memory, evicting the least recently used."""
        states = tuple(tuple(mx.array(a) for a in c.state) for c in cache)  # copies, compact
        mx.eval(states)
        nbytes = sum(a.nbytes for state in states for a in state)
        if nbytes > self.budget_bytes:
            return
        self._drop(key)
        self._entries[key] = _Snapshot(
            key, states, tuple(tuple(c.meta_state) for c in cache), nbytes
        )
        self.nbytes += nbytes
        while self.nbytes > self.budget_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[int, ...]) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes

    def _restore(self, snapshot: _Snapshot) -> list:
        cache = self.make_cache()
        for c, state, meta in zip(cache, snapshot.states, snapshot.meta, strict=True):
            if state:
                # New array objects over the snapshot's data: a cache writes into its arrays in
                # place (`keys[...] = ...`), which must never reach the snapshot.
                c.state = tuple(a[...] for a in state)
                c.meta_state = meta
        return cache
