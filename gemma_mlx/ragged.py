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
are. The price is one attention call per sequence and layer instead of one per layer.

A `RaggedBatch` is the layout of one pass: which rows belong to which sequence, the position of
each sequence's first new token, and each sequence's attention masks; `kept()` is the layout of
the rows whose outputs are wanted (KV-shared layers and the output head need no others).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from gemma_mlx.cache import attention_mask, window_start

Mask = str | mx.array | None


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
