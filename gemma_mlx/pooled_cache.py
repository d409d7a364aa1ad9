"""A batch's KV caches in one buffer per layer: one write and one attention call per layer per step,
whatever the batch size.

A decoding sequence alone keeps its own caches (`gemma_mlx.cache`); in a batch, writing each
sequence's new keys into its own buffer and reading them back costs a few operations per sequence
per layer, and attention over several buffers needs them stacked (a copy of every key) or one call
each. A `CachePool` holds the caches of the sequences that decode together as slots of one buffer
per layer, [slots, kv heads, capacity, head_dim], so a step writes every slot's new key with one
scatter and attends with one call, each slot's keys masked to the positions its query sees.

- Full-attention layers keep position p at index p; the capacity grows in steps of
  `KVCache.step` for every slot (the longest sequence sets it, as left padding would).
- Sliding-window layers keep a ring: position p at index p mod (window + max_trim_kept), the
  positions a `RotatingKVCache` would hold; their mask follows from each slot's position. The
  ring grows as the full layers do until it is whole (short sequences take no whole window).

Sequences join once their prompt is in their own caches (`join`, a copy) and leave (`remove`,
several at once); `own_caches` gives a pooled sequence caches of its own again, equal to what
they would hold had it never been pooled, so a prefix cache or a chat session takes them as they
are. A pooled sequence feeds one token per step: no prefill chunk, no drafts, so no rollback. Softmax and the weighted sum then run over the whole
row of a slot (masked positions weigh zero): equal to attention alone up to float rounding, as the
weight products of a batch are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from gemma_mlx.cache import KVCache, RotatingKVCache, grow_buffer


@dataclass
class Slot:
    """One sequence's place in a pool: its index (slots move down when one before them leaves)
    and how many positions it holds."""

    index: int
    offset: int


class SlotCache:
    """A pooled sequence's cache of one layer, as its `cache` list shows it: its offset, and
    what the batched pass needs to find the pool (every layer's entry is alike)."""

    def __init__(self, pool: CachePool, slot: Slot) -> None:
        self.pool = pool
        self.slot = slot

    @property
    def offset(self) -> int:
        return self.slot.offset


def is_pooled(cache: list) -> bool:
    """Whether a sequence's cache list is a slot of a pool."""
    return bool(cache) and isinstance(cache[0], SlotCache)


@dataclass(frozen=True)
class PooledKV:
    """What a pass's pooled rows attend at one layer: the keys and values of slots [0, n) after
    the pass wrote them, and which positions each slot's query sees."""

    keys: mx.array  # [n, kv heads, capacity, head_dim]
    values: mx.array
    mask: mx.array  # [n, 1, 1, capacity] bool


class _Layer:
    """One layer's buffers; `ring` (window + max_trim_kept) for a sliding-window layer, else
    None (positions at their own index)."""

    def __init__(self, window: int | None, ring: int | None) -> None:
        self.window = window
        self.ring = ring
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def index(self, position: int) -> int:
        return position if self.ring is None else position % self.ring

    def visible(self, positions: list[int]) -> np.ndarray:
        """[slots, capacity] bool: the indices holding a position that the query at
        `positions[s]` sees (itself and earlier, within the window)."""
        q = np.asarray(positions)[:, None]
        j = np.arange(self.capacity)[None, :]
        if self.ring is None:
            return j <= q
        back = (q - j) % self.ring  # how far before q the position held at j is
        return back <= np.minimum(q, self.window - 1)

    def room_for(self, needed: int) -> int:
        """The capacity that holds `needed` positions: steps of `KVCache.step`, at most the ring
        (a ring only wraps once it is whole, so below that every position is at its own index)."""
        capacity = _round_up(needed)
        return capacity if self.ring is None else min(capacity, self.ring)

    def grow_to(self, needed: int) -> None:
        """Room for `needed` positions in every slot."""
        if self.keys is None or self.room_for(needed) <= self.capacity:
            return
        extra = self.room_for(needed) - self.capacity
        S, heads, _, D = self.keys.shape
        pad = mx.zeros((S, heads, extra, D), self.keys.dtype)
        self.keys = mx.concatenate([self.keys, pad], axis=2)
        self.values = mx.concatenate([self.values, pad], axis=2)


class CachePool:
    """The pooled caches of the sequences decoding together (see the module docstring)."""

    def __init__(self) -> None:
        self.layers: list[_Layer] = []
        self.slots: list[Slot] = []
        self._memos: dict[tuple, mx.array] = {}

    @staticmethod
    def accepts(cache: list) -> bool:
        """Whether a sequence's caches can join: plain `KVCache`/`RotatingKVCache` buffers
        holding at least one position (they tell the pool its shapes)."""
        return (
            bool(cache)
            and cache[0].offset > 0
            and all(type(c) in (KVCache, RotatingKVCache) for c in cache)
        )

    def join(self, caches: list[list]) -> list[list[SlotCache]]:
        """Copy sequences' caches (each `accepts`ed) into new last slots, one copy per layer for
        all of them; returns their pooled cache lists."""
        if not self.slots:
            self.layers = [
                _Layer(c.window, c.window + c.max_trim_kept)
                if isinstance(c, RotatingKVCache)
                else _Layer(None, None)
                for c in caches[0]
            ]
        slots = [Slot(len(self.slots) + n, cache[0].offset) for n, cache in enumerate(caches)]
        longest = max(s.offset for s in slots) + 1
        for i, layer in enumerate(self.layers):
            layer.grow_to(longest)
            capacity = layer.capacity or layer.room_for(longest)
            parts = [] if layer.keys is None else [(layer.keys, layer.values)]
            for slot, cache in zip(slots, caches, strict=True):
                keys, values = cache[i].state
                parts.append(
                    (
                        _placed(keys, layer, slot.offset, capacity),
                        _placed(values, layer, slot.offset, capacity),
                    )
                )
            layer.keys = mx.concatenate([k for k, _ in parts])
            layer.values = mx.concatenate([v for _, v in parts])
            mx.async_eval(layer.keys, layer.values)  # one layer's old and new buffers at a time
        self.slots += slots
        return [[SlotCache(self, slot) for _ in self.layers] for slot in slots]

    def own_caches(self, pooled: list[SlotCache]) -> list:
        """Caches of its own holding what a pooled sequence holds (a copy), as it would hold
        them had it never been pooled."""
        slot = pooled[0].slot
        own = [_own_cache(layer, slot) for layer in self.layers]
        mx.async_eval([c.state for c in own])
        return own

    def remove(self, leaving: list[list[SlotCache]]) -> None:
        """Take sequences out of the pool (one copy per layer of the slots that stay)."""
        gone = {id(pooled[0].slot) for pooled in leaving}
        stay = [s for s in self.slots if id(s) not in gone]
        if not stay:
            self.layers, self.slots = [], []
            return
        index = mx.array([s.index for s in stay], dtype=mx.int32)
        for layer in self.layers:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
            mx.async_eval(layer.keys, layer.values)  # one layer's old and new buffers at a time
        for n, s in enumerate(stay):
            s.index = n
        self.slots = stay

    def write(
        self, layer: int, slots: list[Slot], positions: list[int], keys: mx.array, values: mx.array
    ) -> PooledKV:
        """Write one new position per slot (`keys`, `values` [len(slots), kv heads, 1, D], at
        `positions`) at layer `layer`; returns what their queries attend. `slots` are in slot
        order; when they are every slot, one scatter writes them all."""
        L = self.layers[layer]
        end = max(positions) + 1
        L.grow_to(end)
        if len(slots) == len(self.slots):
            index = self._memo(("index", L.ring, tuple(positions)), lambda: _indices(L, positions))
            L.keys = mx.put_along_axis(L.keys, index, keys, axis=2)
            L.values = mx.put_along_axis(L.values, index, values, axis=2)
            k, v = L.keys, L.values
        else:  # some slots sit this pass out (their last token is in flight)
            for n, (s, p) in enumerate(zip(slots, positions, strict=True)):
                j = L.index(p)
                L.keys[s.index : s.index + 1, :, j : j + 1] = keys[n : n + 1]
                L.values[s.index : s.index + 1, :, j : j + 1] = values[n : n + 1]
            rows = mx.array([s.index for s in slots], dtype=mx.int32)
            k, v = L.keys[rows], L.values[rows]
        if end < L.capacity:  # indices past the newest position hold nothing yet
            k, v = k[:, :, :end], v[:, :, :end]
        key = ("mask", L.ring, L.window, k.shape[2], tuple(positions))
        mask = self._memo(
            key, lambda: mx.array(L.visible(positions)[:, : k.shape[2]])[:, None, None, :]
        )
        return PooledKV(k, v, mask)

    def _memo(self, key: tuple, make: Callable[[], mx.array]) -> mx.array:
        """An array of this pass that layers of one kind share (a pass's keys hold its
        positions; a few passes' worth are kept)."""
        if key not in self._memos:
            if len(self._memos) > 16:
                self._memos.clear()
            self._memos[key] = make()
        return self._memos[key]


def _indices(layer: _Layer, positions: list[int]) -> mx.array:
    """[slots, 1, 1, 1]: where each slot's new position goes in `layer`'s buffers."""
    return mx.array([layer.index(p) for p in positions], dtype=mx.int32).reshape(-1, 1, 1, 1)


def _round_up(n: int) -> int:
    return -(-n // KVCache.step) * KVCache.step


def _placed(state: mx.array, layer: _Layer, offset: int, capacity: int) -> mx.array:
    """One slot [1, kv heads, capacity, D] holding a cache's positions where the pool keeps
    them: `state` holds the last `state.shape[2]` positions before `offset`, in order."""
    _, heads, held, D = state.shape
    out = mx.zeros((1, heads, capacity, D), state.dtype)
    if layer.ring is None:
        out[:, :, :held] = state
        return out
    held = min(held, layer.ring)
    first = offset - held
    for p0, p1 in _ring_runs(first, offset, layer.ring):
        j = p0 % layer.ring
        out[:, :, j : j + p1 - p0] = state[:, :, state.shape[2] - (offset - p0) :][:, :, : p1 - p0]
    return out


def _ring_runs(first: int, end: int, ring: int) -> list[tuple[int, int]]:
    """Positions [first, end) split where their ring index wraps."""
    runs, p = [], first
    while p < end:
        stop = min(end, (p // ring + 1) * ring)
        runs.append((p, stop))
        p = stop
    return runs


def _own_cache(layer: _Layer, slot: Slot) -> KVCache | RotatingKVCache:
    """A cache of the sequence's own, as it would be had it never been pooled."""
    keys = layer.keys[slot.index : slot.index + 1]
    values = layer.values[slot.index : slot.index + 1]
    offset = slot.offset
    if layer.ring is None:  # a copy in buffers of its own, grown in the cache's steps
        cache = KVCache()
        cache.keys = grow_buffer(keys, offset, offset, keys, KVCache.step)
        cache.values = grow_buffer(values, offset, offset, values, KVCache.step)
        cache.offset = offset
        return cache
    cache = RotatingKVCache(layer.window, layer.ring - layer.window)
    held = min(offset, layer.ring - 1)  # what a RotatingKVCache keeps: window - 1 + max_trim
    runs = _ring_runs(offset - held, offset, layer.ring)
    order = [j % layer.ring for p0, p1 in runs for j in range(p0, p1)]
    index = mx.array(order, dtype=mx.int32)
    cache.state = (keys[:, :, index], values[:, :, index])
    cache.offset = offset
    return cache
