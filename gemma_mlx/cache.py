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
- `QuantizedKVCache` (a full-attention layer with `kv_bits`): positions [0, offset) as
  `QuantizedKeys` and `QuantizedKV` (`gemma_mlx.kernels.quantized_attention`), or as arrays while
  it holds only its dense prefix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from gemma_mlx.errors import OptionError
from gemma_mlx.kernels.quantized_attention import (
    QuantizedKeys,
    QuantizedKV,
    quantize_channels,
    quantize_rows,
)
from gemma_mlx.options import check_int

# Positions a cache can roll back by default: a speculative verify's drafts, any draft length.
DEFAULT_MAX_TRIM = 32


def grow_buffer(
    buffer: mx.array | None, used: int, needed: int, like: mx.array, step: int
) -> mx.array:
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
            self.keys = grow_buffer(self.keys, start, end, keys, self.step)
            self.values = grow_buffer(self.values, start, end, values, self.step)
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

    def fetch(self) -> tuple[mx.array, mx.array]:
        """Keys and values of every held position."""
        return self.state

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

    def __init__(self, max_size: int, max_trim: int = DEFAULT_MAX_TRIM) -> None:
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
            self.keys = grow_buffer(None, 0, needed, new, self.step)
            self.values = grow_buffer(None, 0, needed, new, self.step)
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

    def fetch(self) -> tuple[mx.array, mx.array]:
        """Keys and values of every held position."""
        return self.state

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


KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)
# Group 32 by measurement (`benchmarks.kv_quality`, the 270M past 4k tokens): 8-bit KLD 1.05e-5 at
# g32, 1.49e-5 at g64, for 3% more bytes.
DEFAULT_KV_GROUP_SIZE = 32
DEFAULT_QUANTIZED_KV_START = 0


@dataclass(frozen=True)
class KVQuantization:
    """How full-attention caches store keys and values: `bits` per value in groups of
    `group_size` along the head dimension, from position `start` on (earlier positions stay in
    the model's dtype, so a context shorter than `start` is computed exactly as unquantized)."""

    bits: int
    group_size: int = DEFAULT_KV_GROUP_SIZE
    start: int = DEFAULT_QUANTIZED_KV_START


def kv_quantization(
    kv_bits: Any,
    kv_group_size: Any = DEFAULT_KV_GROUP_SIZE,
    quantized_kv_start: Any = DEFAULT_QUANTIZED_KV_START,
) -> KVQuantization | None:
    """The options `kv_bits`, `kv_group_size`, `quantized_kv_start` checked (None: no
    quantization); a bad value raises an OptionError naming the option."""
    group = check_int("kv_group_size", kv_group_size)
    if group not in KV_GROUP_SIZES:
        raise OptionError(f"kv_group_size must be one of {KV_GROUP_SIZES}, got {group}")
    start = check_int("quantized_kv_start", quantized_kv_start, minimum=0)
    if kv_bits is None:
        return None
    bits = check_int("kv_bits", kv_bits)
    if bits not in KV_BITS:
        raise OptionError(f"kv_bits must be one of {KV_BITS} (or None), got {bits}")
    return KVQuantization(bits, group, start)


def kv_quantization_of(options: Mapping[str, Any]) -> KVQuantization | None:
    """`kv_quantization` of generation options' `kv_bits`, `kv_group_size` and
    `quantized_kv_start` entries (absent ones at their defaults)."""
    return kv_quantization(
        options.get("kv_bits"),
        options.get("kv_group_size", DEFAULT_KV_GROUP_SIZE),
        options.get("quantized_kv_start", DEFAULT_QUANTIZED_KV_START),
    )


class QuantizedKVCache:
    """A full-attention cache whose positions from `quantization.start` on are stored quantized:
    values row by row (groups along the head dimension), keys channel by channel (groups of
    `group_size` positions along each channel).

    Why keys by channel: keys have outlier channels (the 270M's run at 20-76 where the rest sit
    near 1); a group along the head dimension that holds one takes its range, coarsening every
    other key value in it. Grouped along positions, each channel gets its own step (as KIVI
    does): on the 270M at 8 bits the KL divergence from the unquantized cache drops 15x, to about
    what rounding the cache to bfloat16 costs.

    Values are quantized on arrival, each position on its own; a block of keys once its last
    position has arrived. Exactness does not depend on chunking: a query at position p sees the
    blocks completed by p + 1 quantized and later keys as computed, whether it came alone or in
    a chunk (`QuantizedKeys.seen`), so a verify pass computes what plain decoding would, and the
    stored bits are the same whatever the chunking. Keys of the newest `max_trim_kept` positions
    (and the rest of their block) also stay as computed, so a trim of that many positions (a
    speculative rollback) restores exactly the state plain decoding would have; deeper trims stop
    there (`max_trim`), as a rotating cache's stop at its window. Positions before `start` live in
    a plain `KVCache`; while nothing else is held, `update_and_fetch` returns its arrays, so short
    contexts compute exactly as without quantization.
    """

    step = 256

    def __init__(self, quantization: KVQuantization, max_trim: int = DEFAULT_MAX_TRIM) -> None:
        self.quantization = quantization
        self.max_trim_kept = max_trim
        self.dense = KVCache()  # positions [0, min(offset, start))
        # From `start` on (positions counted from there): keys of positions [0, blocked) as
        # (packed, scales, biases) [B, heads, D, columns], as computed from `tail_start` on.
        self.key_blocks: tuple[mx.array, ...] | None = None
        self.key_tail: mx.array | None = None
        self.tail_start = 0
        self.values: tuple[mx.array, ...] | None = None  # (packed, scales, biases)
        self.offset = 0

    @property
    def _quantized(self) -> int:
        return self.offset - self.dense.offset

    def _settled(self, n: int) -> int:
        """Quantized key positions once `n` positions from `start` have arrived: whole blocks."""
        return max(0, n) // self.quantization.group_size * self.quantization.group_size

    @property
    def blocked(self) -> int:
        return self._settled(self._quantized)

    def update_and_fetch(
        self, keys: mx.array, values: mx.array
    ) -> tuple[mx.array, mx.array] | tuple[QuantizedKeys, QuantizedKV]:
        n = keys.shape[2]
        n_dense = min(n, max(0, self.quantization.start - self.offset))
        view = None
        if n_dense < n:  # first: it counts the quantized positions from the offsets
            view = self._append(keys[..., n_dense:, :], values[..., n_dense:, :], n_dense)
        if n_dense:
            self.dense.update_and_fetch(keys[..., :n_dense, :], values[..., :n_dense, :])
        self.offset += n
        return self.fetch(view)

    def _append(
        self, keys: mx.array, values: mx.array, n_before: int
    ) -> tuple[mx.array, int, tuple[int, ...]]:
        """Store positions past `start` (`n_before` new ones precede them in this chunk); return
        this chunk's view of the keys: the tail as computed, where it starts, and what each
        query sees (`QuantizedKeys.seen`)."""
        q = self.quantization
        if values.shape[-1] % q.group_size:
            raise OptionError(
                f"kv_group_size {q.group_size} does not divide this model's head size "
                f"{values.shape[-1]} (choose one of {KV_GROUP_SIZES} that does)"
            )
        old, new = self._quantized, self._quantized + values.shape[2]
        new_v = quantize_rows(values, q.group_size, q.bits)
        if self.values is None or new > self.values[0].shape[2]:
            self.values = tuple(
                grow_buffer(b, old, new, x, self.step)
                for b, x in zip(self.values or (None,) * 3, new_v, strict=True)
            )
        for buffer, x in zip(self.values, new_v, strict=True):
            buffer[..., old:new, :] = x
        tail = self._tail()
        tail = keys if tail is None else mx.concatenate([tail, keys], axis=2)
        first, last = self._settled(old), self._settled(new)
        if last > first:
            settled = tail[..., first - self.tail_start : last - self.tail_start, :]
            self._store_blocks(quantize_channels(settled, q.group_size, q.bits), first, last)
        # Query i of the chunk (position old + i) sees the blocks completed by old + i + 1.
        seen = (0,) * n_before + tuple(self._settled(p + 1) for p in range(old, new))
        view = (tail, self.tail_start, seen)
        cut = max(self.tail_start, self._settled(new - self.max_trim_kept))
        self.key_tail = tail[..., cut - self.tail_start :, :]
        self.tail_start = cut
        return view

    def _store_blocks(self, new: tuple[mx.array, ...], first: int, last: int) -> None:
        """Write quantized key blocks for positions [first, last) into `key_blocks`."""
        q = self.quantization
        at, end = _block_columns(first, q), _block_columns(last, q)
        if self.key_blocks is None or end[1] > self.key_blocks[1].shape[-1]:
            room = _block_columns(-(-last // self.step) * self.step, q)
            old = self.key_blocks or (None,) * 3
            self.key_blocks = tuple(
                _grow_columns(b, u, r, x) for b, u, r, x in zip(old, at, room, new, strict=True)
            )
        for buffer, a, e, x in zip(self.key_blocks, at, end, new, strict=True):
            buffer[..., a:e] = x

    def _tail(self) -> mx.array | None:
        """Keys as computed of positions [tail_start, quantized) (None: none)."""
        n = self._quantized - self.tail_start
        return None if n == 0 else self.key_tail[..., :n, :]

    def fetch(
        self, view: tuple[mx.array, int, tuple[int, ...]] | None = None
    ) -> tuple[mx.array, mx.array] | tuple[QuantizedKeys, QuantizedKV]:
        """Keys and values of positions [0, offset), as a query after them sees them (`view`:
        as the queries of the chunk just stored see them)."""
        n = self._quantized
        if n == 0:
            return self.dense.state
        dense_k, dense_v = self.dense.state or (None, None)
        q = self.quantization
        blocks = None
        if self.blocked:
            columns = _block_columns(self.blocked, q)
            blocks = tuple(a[..., :c] for a, c in zip(self.key_blocks, columns, strict=True))
        tail, tail_start, seen = view or (self._tail(), self.tail_start, ())
        k = QuantizedKeys(dense_k, blocks, tail, tail_start, seen, q.group_size, q.bits)
        v = QuantizedKV(dense_v, *(a[..., :n, :] for a in self.values), q.group_size, q.bits)
        return k, v

    @property
    def max_trim(self) -> int:
        """How many positions `trim` can forget: those whose keys are held as computed."""
        return self.offset - (self.dense.offset + self.tail_start if self.tail_start else 0)

    def trim(self, n: int) -> int:
        """Forget the last `n` positions (at most `max_trim`); return how many were forgotten."""
        n = max(0, min(n, self.max_trim))
        self.dense.trim(n - min(n, self._quantized))
        self.offset -= n
        return n

    def is_trimmable(self) -> bool:
        return True

    @property
    def state(self) -> tuple[mx.array, ...]:
        """The dense prefix's keys and values (when held), the quantized key blocks' (packed,
        scales, biases) (when any), the keys kept as computed (when any), the quantized values'
        (packed, scales, biases) (when any positions are past the prefix): told apart by count
        and dtype."""
        if self._quantized == 0:
            return self.dense.state
        keys, values = self.fetch()
        tail = () if keys.tail is None else (keys.tail,)
        quantized_values = (values.packed, values.scales, values.biases)
        return (*self.dense.state, *(keys.blocks or ()), *tail, *quantized_values)

    @state.setter
    def state(self, state: Sequence[mx.array]) -> None:
        state = tuple(state)
        packed = [a.dtype == mx.uint32 for a in state]
        dense = state[:2] if len(state) >= 2 and not any(packed[:2]) else ()
        rest = state[len(dense) :]
        if len(rest) not in (0, 4, 6, 7):
            raise ValueError(
                f"a quantized KV cache state has 0, 2, 4, 6, 7, 8 or 9 arrays, not {len(state)}"
            )
        self.dense = KVCache()
        if dense:
            self.dense.state = dense
        self.values = rest[-3:] if rest else None
        self.key_tail = rest[-4] if len(rest) in (4, 7) else None
        self.key_blocks = rest[:3] if len(rest) >= 6 else None
        quantized = self.values[0].shape[2] if rest else 0
        self.tail_start = quantized - (0 if self.key_tail is None else self.key_tail.shape[2])
        self.offset = self.dense.offset + quantized

    @property
    def meta_state(self) -> tuple[str, ...]:
        q = self.quantization
        return tuple(map(str, (q.bits, q.group_size, q.start, self.max_trim_kept)))

    @meta_state.setter
    def meta_state(self, meta: Sequence[str]) -> None:
        if len(meta) != 4:
            raise ValueError(
                "this quantized KV cache was saved by an earlier gemma_mlx (keys quantized "
                "by position); make it again"
            )
        *quantization, self.max_trim_kept = map(int, meta)
        self.quantization = KVQuantization(*quantization)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


def _block_columns(positions: int, quantization: KVQuantization) -> tuple[int, int, int]:
    """The columns `positions` (whole blocks) take in quantized keys' (packed, scales, biases)."""
    groups = positions // quantization.group_size
    return positions * quantization.bits // 32, groups, groups


def _grow_columns(buffer: mx.array | None, used: int, columns: int, like: mx.array) -> mx.array:
    """A buffer shaped like `like` but `columns` wide, holding `buffer[..., :used]`."""
    fresh = mx.zeros((*like.shape[:-1], columns), dtype=like.dtype)
    if buffer is not None and used:
        fresh[..., :used] = buffer[..., :used]
    return fresh


def quantize_caches(caches: list, quantization: KVQuantization | None) -> list:
    """`caches` (a model's `make_cache()` list) with each full-attention `KVCache` replaced, in
    place, by a `QuantizedKVCache` holding the same positions and keeping the rollback room the
    list's sliding-window caches keep; returns the list. Caches that are already quantized must
    use `quantization`."""
    if quantization is None:
        return caches
    room = [c.max_trim_kept for c in caches if isinstance(c, RotatingKVCache)]
    max_trim = max(room, default=DEFAULT_MAX_TRIM)
    for i, cache in enumerate(caches):
        if isinstance(cache, QuantizedKVCache):
            if cache.quantization != quantization:
                raise OptionError(
                    f"prompt_cache is quantized with {cache.quantization}, not the requested "
                    f"{quantization}"
                )
        elif isinstance(cache, KVCache):
            quantized = QuantizedKVCache(quantization, max_trim)
            if cache.offset:
                quantized.update_and_fetch(*cache.state)
            caches[i] = quantized
    return caches


def held_quantization(caches: Sequence[Any]) -> KVQuantization | None:
    """How a cache list quantizes its full-attention layers (None: it does not)."""
    return next((c.quantization for c in caches if isinstance(c, QuantizedKVCache)), None)


def positions_from(
    kv: mx.array | QuantizedKeys | QuantizedKV, first: int
) -> mx.array | QuantizedKeys | QuantizedKV:
    """Cached keys or values [B, heads, positions, D] from position index `first` on."""
    if isinstance(kv, QuantizedKeys | QuantizedKV):
        return kv.positions_from(first)
    return kv[:, :, first:]


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
