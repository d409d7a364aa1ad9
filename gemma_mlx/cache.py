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
- `QuantizedKVCache` (a full-attention layer with `kv_bits`): positions [0, offset) as a
  `QuantizedKV` each for keys and values (`gemma_mlx.kernels.quantized_attention`), or as arrays
  while it holds only its dense prefix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from gemma_mlx.errors import OptionError
from gemma_mlx.kernels.quantized_attention import QuantizedKV, quantize_rows
from gemma_mlx.options import check_int


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
# Group 32 by measurement (`benchmarks.kv_quality`, the 270M past 4k tokens): 8-bit g32 KLD 1.9e-4,
# g64 1.0e-3 (keys have outlier channels that widen a 64-value group's range).
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
    """A full-attention cache whose positions from `quantization.start` on are stored quantized.

    Each position is quantized on its own as it arrives (groups along the head dimension), so
    the stored bits do not depend on how tokens were chunked, and `trim` only moves `offset`:
    a speculative rollback leaves exactly the state plain decoding would have. Positions before
    `start` live in a plain `KVCache`; while nothing else is held, `update_and_fetch` returns its
    arrays, so short contexts compute exactly as without quantization.
    """

    step = 256

    def __init__(self, quantization: KVQuantization) -> None:
        self.quantization = quantization
        self.dense = KVCache()  # positions [0, min(offset, start))
        self.keys: tuple[mx.array, ...] | None = None  # (packed, scales, biases), from `start`
        self.values: tuple[mx.array, ...] | None = None
        self.offset = 0

    @property
    def _quantized(self) -> int:
        return self.offset - self.dense.offset

    def update_and_fetch(
        self, keys: mx.array, values: mx.array
    ) -> tuple[mx.array, mx.array] | tuple[QuantizedKV, QuantizedKV]:
        n = keys.shape[2]
        n_dense = min(n, max(0, self.quantization.start - self.offset))
        if n_dense < n:  # first: it counts the quantized positions from the offsets
            self._append(keys[..., n_dense:, :], values[..., n_dense:, :])
        if n_dense:
            self.dense.update_and_fetch(keys[..., :n_dense, :], values[..., :n_dense, :])
        self.offset += n
        return self.fetch()

    def _append(self, keys: mx.array, values: mx.array) -> None:
        q = self.quantization
        if keys.shape[-1] % q.group_size or values.shape[-1] % q.group_size:
            raise OptionError(
                f"kv_group_size {q.group_size} does not divide this model's head size "
                f"{keys.shape[-1]} (choose one of {KV_GROUP_SIZES} that does)"
            )
        start, end = self._quantized, self._quantized + keys.shape[2]
        new_k = quantize_rows(keys, q.group_size, q.bits)
        new_v = quantize_rows(values, q.group_size, q.bits)
        if self.keys is None or end > self.keys[0].shape[2]:
            self.keys = self._grown(self.keys, start, end, new_k)
            self.values = self._grown(self.values, start, end, new_v)
        for buffers, new in ((self.keys, new_k), (self.values, new_v)):
            for buffer, x in zip(buffers, new, strict=True):
                buffer[..., start:end, :] = x

    def _grown(
        self, buffers: tuple[mx.array, ...] | None, used: int, needed: int, like: tuple
    ) -> tuple[mx.array, ...]:
        old = buffers or (None,) * len(like)
        return tuple(_grow(b, used, needed, x, self.step) for b, x in zip(old, like, strict=True))

    def fetch(self) -> tuple[mx.array, mx.array] | tuple[QuantizedKV, QuantizedKV]:
        """Keys and values of positions [0, offset)."""
        n = self._quantized
        if n == 0:
            return self.dense.state
        dense_k, dense_v = self.dense.state or (None, None)
        q = self.quantization
        k = QuantizedKV(dense_k, *(a[..., :n, :] for a in self.keys), q.group_size, q.bits)
        v = QuantizedKV(dense_v, *(a[..., :n, :] for a in self.values), q.group_size, q.bits)
        return k, v

    @property
    def max_trim(self) -> int:
        return self.offset

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
        """The dense prefix's keys and values (when held), then the quantized keys' and values'
        (packed, scales, biases) (when any): 0, 2, 6 or 8 arrays, told apart by the first's dtype."""
        n = self._quantized
        quantized = () if n == 0 else tuple(a[..., :n, :] for a in (*self.keys, *self.values))
        return (*self.dense.state, *quantized)

    @state.setter
    def state(self, state: Sequence[mx.array]) -> None:
        state = tuple(state)
        n_dense = 0 if not state or state[0].dtype == mx.uint32 else 2
        quantized = state[n_dense:]
        if len(quantized) not in (0, 6):
            raise ValueError(
                f"a quantized KV cache state has 0, 2, 6 or 8 arrays, not {len(state)}"
            )
        self.dense = KVCache()
        if n_dense:
            self.dense.state = state[:2]
        self.keys, self.values = (quantized[:3], quantized[3:]) if quantized else (None, None)
        self.offset = self.dense.offset + (quantized[1].shape[2] if quantized else 0)

    @property
    def meta_state(self) -> tuple[str, ...]:
        q = self.quantization
        return tuple(map(str, (q.bits, q.group_size, q.start)))

    @meta_state.setter
    def meta_state(self, meta: Sequence[str]) -> None:
        self.quantization = KVQuantization(*map(int, meta))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


def quantize_caches(caches: list, quantization: KVQuantization | None) -> list:
    """`caches` (a model's `make_cache()` list) with each full-attention `KVCache` replaced, in
    place, by a `QuantizedKVCache` holding the same positions; returns the list. Caches that are
    already quantized must use `quantization`."""
    if quantization is None:
        return caches
    for i, cache in enumerate(caches):
        if isinstance(cache, QuantizedKVCache):
            if cache.quantization != quantization:
                raise OptionError(
                    f"prompt_cache is quantized with {cache.quantization}, not the requested "
                    f"{quantization}"
                )
        elif isinstance(cache, KVCache):
            quantized = QuantizedKVCache(quantization)
            if cache.offset:
                quantized.update_and_fetch(*cache.state)
            caches[i] = quantized
    return caches


def held_quantization(caches: Sequence[Any]) -> KVQuantization | None:
    """How a cache list quantizes its full-attention layers (None: it does not)."""
    return next((c.quantization for c in caches if isinstance(c, QuantizedKVCache)), None)


def positions_from(kv: mx.array | QuantizedKV, first: int) -> mx.array | QuantizedKV:
    """Cached keys or values [B, heads, positions, D] from position index `first` on."""
    if isinstance(kv, QuantizedKV):
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
