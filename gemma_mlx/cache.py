"""KV caches that can be trimmed back at any length.

Speculative decoding rolls the caches back after a partial accept. mlx-lm's rotating cache stops being
trimmable once the sliding window wraps, which silently corrupts every peer's output past 512/1024
tokens. Ours keeps `max_trim` extra positions beyond the window, so a trim of up to `max_trim` tokens is
always exact, wrapped or not.

Both caches store keys/values as [B, n_kv_heads, positions, head_dim] in temporal order, and return
from `update_and_fetch` exactly the positions the new queries may attend:
- `KVCache`: positions [0, offset).
- `RotatingKVCache`: positions [max(0, first_new - window + 1), offset), where `first_new` is the
  position of the first new token. The mask for those keys is `attention_mask` below.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx


def _grow(buffer: mx.array | None, used: int, needed: int, like: mx.array, step: int) -> mx.array:
    """Return a buffer holding `buffer[..., :used, :]` with room for at least `needed` positions."""
    capacity = ((needed + step - 1) // step) * step
    B, n_kv, _, D = like.shape
    fresh = mx.zeros((B, n_kv, capacity, D), dtype=like.dtype)
    if buffer is not None and used > 0:
        fresh[..., :used, :] = buffer[..., :used, :]
    return fresh


class KVCache:
    """Keys and values of a full-attention layer; grows in steps of `step` positions."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        start, end = self.offset, self.offset + keys.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            self.keys = _grow(self.keys, start, end, keys, self.step)
            self.values = _grow(self.values, start, end, values, self.step)
        self.keys[..., start:end, :] = keys
        self.values[..., start:end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    @property
    def max_trim(self) -> int:
        return self.offset

    def trim(self, n: int) -> int:
        """Forget the last `n` positions (at most `max_trim`); return how many were forgotten."""
        n = max(0, min(n, self.max_trim))
        self.offset -= n
        return n

    def is_trimmable(self) -> bool:
        return True

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, state: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = state
        self.offset = self.keys.shape[2]

    @property
    def meta_state(self) -> tuple[str, ...]:
        return ()

    @meta_state.setter
    def meta_state(self, meta: tuple[str, ...]) -> None:
        pass

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


class RotatingKVCache:
    """Keys and values of a sliding-window layer, trimmable by up to `max_trim` at any length.

    The buffer keeps the newest `window - 1 + max_trim` positions in temporal order and `step`
    positions of headroom; when the headroom is used up the kept positions are moved to the front
    (one copy every `step` tokens instead of one per token).
    """

    step = 256

    def __init__(self, max_size: int, max_trim: int = 32) -> None:
        if max_size < 1:
            raise ValueError(f"sliding window must be >= 1, got {max_size}")
        self.window = max_size
        self.max_trim_kept = max_trim
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # positions seen
        self.filled = 0  # positions held in the buffer: [offset - filled, offset)

    @property
    def max_size(self) -> int:
        return self.window

    @property
    def _keep(self) -> int:
        return self.window - 1 + self.max_trim_kept

    def _make_room(self, new: mx.array) -> None:
        n_new = new.shape[2]
        capacity = 0 if self.keys is None else self.keys.shape[2]
        if self.filled + n_new <= capacity:
            return
        kept = min(self.filled, self._keep)
        src = self.filled - kept
        if capacity >= kept + n_new and capacity > 0:
            # Slide the kept positions to the front of the existing buffer.
            self.keys[..., :kept, :] = self.keys[..., src : self.filled, :]
            self.values[..., :kept, :] = self.values[..., src : self.filled, :]
        else:
            needed = kept + max(n_new, self.step)
            old_k, old_v = self.keys, self.values
            self.keys = _grow(None, 0, needed, new, self.step)
            self.values = _grow(None, 0, needed, new, self.step)
            if kept:
                self.keys[..., :kept, :] = old_k[..., src : self.filled, :]
                self.values[..., :kept, :] = old_v[..., src : self.filled, :]
        self.filled = kept

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n_new = keys.shape[2]
        self._make_room(keys)
        start, end = self.filled, self.filled + n_new
        self.keys[..., start:end, :] = keys
        self.values[..., start:end, :] = values
        self.filled = end
        self.offset += n_new
        first = max(0, start - (self.window - 1))
        return self.keys[..., first:end, :], self.values[..., first:end, :]

    @property
    def max_trim(self) -> int:
        """How many positions `trim` can forget while the next query still sees its whole window."""
        if self.filled == self.offset:
            return self.offset
        return self.filled - (self.window - 1)

    def trim(self, n: int) -> int:
        """Forget the last `n` positions (at most `max_trim`); return how many were forgotten."""
        n = max(0, min(n, self.max_trim))
        self.offset -= n
        self.filled -= n
        return n

    def is_trimmable(self) -> bool:
        return True

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        if self.keys is None:
            return ()
        return self.keys[..., : self.filled, :], self.values[..., : self.filled, :]

    @state.setter
    def state(self, state: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = state
        self.filled = self.keys.shape[2]

    @property
    def meta_state(self) -> tuple[str, ...]:
        return tuple(map(str, (self.window, self.max_trim_kept, self.offset, self.filled)))

    @meta_state.setter
    def meta_state(self, meta: tuple[str, ...]) -> None:
        self.window, self.max_trim_kept, self.offset, self.filled = map(int, meta)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


def attention_mask(
    query_start: int, query_end: int, key_start: int, window: int | None
) -> str | mx.array | None:
    """Mask for queries at positions [query_start, query_end) over keys at [key_start, query_end).

    `window=None` is full attention; otherwise key k is visible to query q iff 0 <= q - k < window.
    Returns None when every key is visible to every query, "causal" when MLX's lower-right-aligned
    causal mask is exact, else a boolean [n_queries, n_keys] array.
    """
    n_queries = query_end - query_start
    if window is None or query_end - 1 - key_start < window:
        return None if n_queries == 1 else "causal"
    q = mx.arange(query_start, query_end)[:, None]
    k = mx.arange(key_start, query_end)[None, :]
    return (k <= q) & (q - k < window)


def window_start(first_new: int, window: int | None) -> int:
    """Position of the first key a cache returns when new tokens start at `first_new`."""
    return 0 if window is None else max(0, first_new - window + 1)


def shared_prefix(cached: Sequence[int], tokens: Sequence[int]) -> int:
    """How many leading tokens two sequences share: what a cache holding `cached` can keep of a
    prompt `tokens` (prefix caches, chat sessions)."""
    n = min(len(cached), len(tokens))
    return next((i for i in range(n) if cached[i] != tokens[i]), n)
