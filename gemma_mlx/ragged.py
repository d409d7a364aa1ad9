"""Ragged batches: several sequences' new tokens stacked in one row dimension, one forward pass.

Why ragged and not left padding: a decoded token's cost is reading the weights, and every
weight product takes all rows of all sequences at once whichever layout is chosen. What the
layouts change is attention. Left padding (mlx-lm's `BatchKVCache`) puts every sequence in one
[B, heads, positions, dim] cache, aligned at the right, so attention is one call; but each
sequence's softmax and weighted sum then run over a row that starts with padding, which changes
their rounding against the sequence alone, trimming one sequence means shifting the others'
padding, a sequence that joins must be copied into the shared buffer, and a sliding-window
cache has one rotation for all. Ragged rows keep each sequence's own caches
(`model.make_cache()`, the same `KVCache`/`RotatingKVCache` as alone): its attention is the very
call it makes alone (same shapes, same keys, same mask), it joins and leaves without a copy,
trims on its own after a speculative verify, and the prefix cache hands its caches over as they
are. Attention stays one call per layer for the sequences whose calls have the same shapes (as
many new tokens, as many cached keys, the same mask): `RaggedBatch.attention` stacks them on the
batch axis, and MLX computes each batch entry of an attention call on its own, so each gets the
very values of its call alone. Sequences at different lengths attend in separate calls.

Decoding sequences whose caches are slots of a `gemma_mlx.pooled_cache.CachePool` are written
and attend all at once: one scatter and one attention call per layer whatever their number and
lengths (`write`, `attention`); their softmax runs over their whole slot, masked.

A `RaggedBatch` is the layout of one pass: which rows belong to which sequence, the position of
each sequence's first new token, and each sequence's attention masks; `kept()` is the layout of
the rows whose outputs are wanted (KV-shared layers and the output head need no others).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx

from gemma_mlx.cache import attention_mask, window_start
from gemma_mlx.kernels.attention import kernel_covers
from gemma_mlx.kernels.backend import active_kernels
from gemma_mlx.pooled_cache import CachePool, PooledKV, Slot, is_pooled

Mask = str | mx.array | None
# attend(q [B, heads, T, D], k, v [B, kv heads, positions, D], mask) -> [B, heads, T, D]
Attend = Callable[[mx.array, mx.array, mx.array, Mask], mx.array]


@dataclass(frozen=True)
class Segment:
    """One sequence's part of a batched pass: `length` new tokens fed into `cache` (the list
    `model.make_cache()` made for it), of which the last `keep` need outputs."""

    cache: list
    length: int
    keep: int

    def __post_init__(self) -> None:
        if self.length < 1 or not 0 <= self.keep <= self.length:
            raise ValueError(
                f"a segment feeds >= 1 token and keeps 0..length of them, "
                f"got length {self.length}, keep {self.keep}"
            )


@dataclass
class RaggedBatch:
    """Row layout and masks of one batched pass (see the module docstring); make it with `of`.

    `starts[i]`: position of segment i's first new token; `skipped[i]`: how many of its leading
    new tokens have no row in this layout (`kept()` skips all but the kept ones).
    """

    segments: list[Segment]
    windows: dict[str, int | None]  # layer type -> sliding window (None: full attention)
    starts: list[int]
    skipped: list[int]

    @classmethod
    def of(cls, segments: Sequence[Segment], windows: dict[str, int | None]) -> RaggedBatch:
        """The layout of every new token; positions are read from the caches, so make it before
        the pass writes into them."""
        if not segments:
            raise ValueError("a batched pass needs at least one segment")
        starts = [s.cache[0].offset if s.cache else 0 for s in segments]
        for s in (s for s in segments if is_pooled(s.cache)):  # its layers write as it is built
            if s.length != 1:
                raise ValueError("a pooled sequence feeds one token per pass")
            s.cache[0].slot.offset += 1
        return cls(list(segments), windows, starts, [0] * len(segments))

    def __post_init__(self) -> None:
        self.rows: list[tuple[int, int]] = []  # segment i's rows: [first, last)
        row = 0
        for s, skipped in zip(self.segments, self.skipped, strict=True):
            self.rows.append((row, row + s.length - skipped))
            row += s.length - skipped
        self.n_rows = row
        self.positions = mx.array(  # of every row, in row order
            [p for i in range(len(self.segments)) for p in self._positions(i)], dtype=mx.int32
        )
        self.masks: dict[str, list[Mask]] = {
            t: [self._mask(i, w) for i in range(len(self.segments))]
            for t, w in self.windows.items()
        }
        self._reused_stacks: dict[tuple, tuple] = {}  # see `_stacks`
        self.pooled = PooledRows.of(self)

    def query_start(self, i: int) -> int:
        """Position of segment i's first row in this layout."""
        return self.starts[i] + self.skipped[i]

    def _positions(self, i: int) -> range:
        return range(self.query_start(i), self.starts[i] + self.segments[i].length)

    def _mask(self, i: int, window: int | None) -> Mask:
        first, end = self.query_start(i), self.starts[i] + self.segments[i].length
        if first == end:
            return None
        return attention_mask(first, end, window_start(self.starts[i], window), window)

    def kept(self) -> RaggedBatch:
        """The layout of the kept rows only (each segment's last `keep`)."""
        skipped = [s.length - s.keep for s in self.segments]
        return RaggedBatch(self.segments, self.windows, self.starts, skipped)

    def kept_rows(self) -> mx.array:
        """Indices, in this layout, of the rows `kept()` keeps."""
        index = [
            r
            for (first, last), s in zip(self.rows, self.segments, strict=True)
            for r in range(max(first, last - s.keep), last)
        ]
        return mx.array(index, dtype=mx.int32)

    def write(self, layer: int, k: mx.array, v: mx.array) -> list:
        """Write every segment's new keys and values (`k`, `v` [rows, kv heads, 1, D], rows as
        one-position sequences) into its cache `layer`; returns what each segment's queries
        attend: its cache's keys and values, or for the pooled sequences
        (`gemma_mlx.pooled_cache`) their pool's, written for all of them at once."""
        kvs: list = [None] * len(self.segments)
        pooled = self.pooled
        for i, (s, (first, last)) in enumerate(zip(self.segments, self.rows, strict=True)):
            if not is_pooled(s.cache):
                kvs[i] = s.cache[layer].update_and_fetch(
                    k[first:last].transpose(2, 1, 0, 3), v[first:last].transpose(2, 1, 0, 3)
                )
        if pooled is not None:
            rows = pooled.rows
            entry = pooled.pool.write(layer, pooled.slots, pooled.positions, k[rows], v[rows])
            for i in pooled.segments:
                kvs[i] = entry
        return kvs

    def attention(
        self,
        q: mx.array,
        kvs: Sequence[tuple],
        layer_type: str,
        attend: Attend,
        reused: bool = False,
    ) -> mx.array:
        """Attention of every row, [rows, heads * D] in row order: `q` [rows, heads, 1, D] (rows
        as one-position sequences), `kvs[i]` segment i's cached keys and values [1, kv heads,
        positions, D]. Segments whose calls have the same shapes and mask attend in one call,
        stacked on the batch axis; keys or values MLX cannot stack (a quantized cache's), or a
        call our one-sequence decode kernel would take, stay one call per segment; the pooled
        sequences (`kvs[i]` their pool's `PooledKV`) attend in one call. `reused`:
        `kvs` are read by more layers of this pass (KV sharing): their stacks are made once."""
        pooled = self.pooled
        if pooled is not None and pooled.everything:
            entry = kvs[pooled.segments[0]]
            out = attend(q, entry.keys, entry.values, entry.mask)
            return out.reshape(self.n_rows, -1)
        masks = self.masks[layer_type]
        kernel = active_kernels() is not None
        groups: dict[tuple, list[int]] = {}
        if pooled is not None:
            groups[("pooled",)] = list(pooled.segments)
        for i, ((first, last), kv) in enumerate(zip(self.rows, kvs, strict=True)):
            if first == last or isinstance(kv, PooledKV):
                continue
            k, v = kv
            mask = masks[i]
            alone = (
                not isinstance(k, mx.array)
                or not isinstance(v, mx.array)
                or not (mask is None or isinstance(mask, str))
                or (kernel and kernel_covers(self._queries(q, [i]), k, v, mask))
            )
            key = ("alone", i) if alone else (last - first, k.shape, v.shape, k.dtype, mask)
            groups.setdefault(key, []).append(i)
        outs, order = [], []
        for members in groups.values():
            entry = kvs[members[0]]
            if isinstance(entry, PooledKV):
                k, v, mask = entry.keys, entry.values, entry.mask
            else:
                k, v = self._stacks(kvs, members, reused)
                mask = masks[members[0]]
            out = attend(self._queries(q, members), k, v, mask)
            G, heads, T, D = out.shape
            outs.append(out.transpose(0, 2, 1, 3).reshape(G * T, heads * D))
            order += members
        out = _stacked(outs)
        if order != sorted(order):  # back to row order
            rows = [r for i in order for r in range(*self.rows[i])]  # the row of each output
            index = sorted(range(len(rows)), key=rows.__getitem__)
            out = out[mx.array(index, dtype=mx.int32)]
        return out

    def _stacks(
        self, kvs: Sequence[tuple], members: list[int], reused: bool
    ) -> tuple[mx.array, mx.array]:
        """Segments `members`' keys and values, each stacked on the batch axis."""
        key = (id(kvs), tuple(members))
        if reused and key in self._reused_stacks:
            return self._reused_stacks[key][1:]
        k, v = (_stacked([kvs[i][j] for i in members]) for j in (0, 1))
        if reused:  # holding `kvs` keeps its id its own while the entry lives
            self._reused_stacks[key] = (kvs, k, v)
        return k, v

    def _queries(self, q: mx.array, members: list[int]) -> mx.array:
        """The rows of segments `members` (as many rows each) as [members, heads, T, D]."""
        first, last = self.rows[members[0]]
        T = last - first
        if all(self.rows[i][0] == first + j * T for j, i in enumerate(members)):
            rows = q[first : first + len(members) * T]
        else:
            index = [r for i in members for r in range(*self.rows[i])]
            rows = q[mx.array(index, dtype=mx.int32)]
        _, heads, _, D = q.shape
        return rows.reshape(len(members), T, heads, D).transpose(0, 2, 1, 3)


@dataclass(frozen=True)
class PooledRows:
    """The pooled sequences of a pass (`gemma_mlx.pooled_cache`, one row each) in slot order:
    their segments, slots and positions, and their rows (a slice when consecutive)."""

    segments: tuple[int, ...]
    pool: CachePool
    slots: list[Slot]
    positions: list[int]
    rows: slice | mx.array
    everything: bool  # every row of the pass, in row order

    @classmethod
    def of(cls, batch: RaggedBatch) -> PooledRows | None:
        pooled = [i for i, s in enumerate(batch.segments) if is_pooled(s.cache)]
        if not pooled:
            return None
        slots = [batch.segments[i].cache[0].slot for i in pooled]
        order = sorted(range(len(pooled)), key=lambda n: slots[n].index)
        segments = tuple(pooled[n] for n in order)
        rows = [batch.rows[i][0] for i in segments]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            where: slice | mx.array = slice(rows[0], rows[0] + len(rows))
        else:
            where = mx.array(rows, dtype=mx.int32)
        return cls(
            segments,
            batch.segments[segments[0]].cache[0].pool,
            [slots[n] for n in order],
            [batch.starts[i] for i in segments],
            where,
            isinstance(where, slice) and where == slice(0, batch.n_rows),
        )


def _stacked(arrays: list[mx.array]) -> mx.array:
    return arrays[0] if len(arrays) == 1 else mx.concatenate(arrays)
