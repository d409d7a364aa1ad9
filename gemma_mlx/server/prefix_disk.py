"""The prefix cache's disk tier: snapshots in files, so that they survive a restart.

Every snapshot the prefix cache keeps in memory is also written here (`gemma_mlx.cache_files`:
the caches, their tokens, the model's identity and a checksum, written atomically), and the
files are kept least-recently-used first within a byte budget. A restarted server reads the
files' headers (not their arrays) to know which prompts they hold; a file is read in full, and
checked, only when a prompt needs it. Files of another model are left alone and ignored, damaged
ones are removed, each with a warning: neither can make a reply wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gemma_mlx.cache_files import (
    cache_arrays,
    cache_fields,
    check_identity,
    identity_fields,
    read_cache_file,
    read_header,
    restored_caches,
    write_cache_file,
)
from gemma_mlx.errors import GemmaMLXError

FORMAT = "gemma_mlx.prefix_snapshot/1"
FIELDS = ("signature", "weights", "kinds", "tokens", "cache_types", "meta_state")
WHAT = "a prefix-cache snapshot"
SUFFIX = ".safetensors"

log = logging.getLogger("gemma_mlx.server")


class SnapshotFileError(GemmaMLXError, ValueError):
    """A snapshot file that is unreadable, damaged, or belongs to another model."""


def file_name(tokens: Sequence[int]) -> str:
    """A snapshot's file name: a hash of its tokens."""
    return hashlib.sha256(json.dumps(list(tokens)).encode()).hexdigest()[:32] + SUFFIX


def cache_kinds(make_cache: Callable[[], list]) -> str:
    """The kinds of caches `make_cache` makes, as text: class names and their settings (the
    `meta_state` of an empty cache: a window, `--kv-bits`)."""
    return json.dumps([[type(c).__name__, list(c.meta_state)] for c in make_cache()])


class DiskTier:
    """Snapshot files in `directory` within `budget_bytes`, for `model` and caches of the kinds
    `make_cache` makes only (a file of other settings, e.g. another `--kv-bits`, is ignored)."""

    def __init__(
        self,
        directory: str | Path,
        budget_bytes: int,
        model: Any,
        make_cache: Callable[[], list],
    ):
        if budget_bytes < 0:
            raise ValueError(f"disk budget must be >= 0 bytes, got {budget_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.budget_bytes = budget_bytes
        self.model = model
        self.identity = identity_fields(model) | {"kinds": cache_kinds(make_cache)}
        self._files: OrderedDict[tuple[int, ...], int] = OrderedDict()  # tokens -> bytes, LRU
        self._lock = threading.Lock()
        self._scan()

    @property
    def nbytes(self) -> int:
        return sum(self._files.values())

    def keys(self) -> list[tuple[int, ...]]:
        with self._lock:
            return list(self._files)

    def put(self, tokens: Sequence[int], caches: Sequence[Any]) -> None:
        """Write the snapshot `caches` (holding `tokens`) unless a file holds it already."""
        key = tuple(tokens)
        with self._lock:
            if key in self._files:
                self._touch(key)
                return
        arrays = cache_arrays(caches)
        size = sum(a.nbytes for a in arrays.values())
        if size > self.budget_bytes:
            return
        fields = self.identity | {"tokens": json.dumps(list(key)), **cache_fields(caches)}
        path = self.directory / file_name(key)
        try:
            write_cache_file(path, arrays, FORMAT, fields, force=True)
        except (OSError, GemmaMLXError) as e:  # a full disk costs the snapshot, not the request
            log.warning("prefix cache: could not write %s (%s)", path, e)
            return
        with self._lock:
            self._files[key] = path.stat().st_size
            self._evict()

    def get(self, tokens: Sequence[int]) -> list | None:
        """The caches of the snapshot holding `tokens`; None (and the file removed) when it turns
        out damaged or unreadable."""
        key = tuple(tokens)
        path = self.directory / file_name(key)
        try:
            arrays, fields = read_cache_file(path, {FORMAT: FIELDS}, SnapshotFileError, WHAT)
            check_identity(path, fields, self.model, SnapshotFileError)
            if tuple(fields["tokens"]) != key:
                raise SnapshotFileError(f"{path}: holds other tokens than its name says")
            caches = restored_caches(path, arrays, fields, SnapshotFileError)
        except SnapshotFileError as e:
            log.warning("prefix cache: %s; removed", e)
            with self._lock:
                self._forget(key)
            return None
        with self._lock:
            self._touch(key)
        return caches

    def _scan(self) -> None:
        """Index the directory's snapshot files, oldest use first."""
        found = []
        for path in self.directory.glob("*" + SUFFIX):
            if path.name.startswith("."):  # staging of an interrupted write
                continue
            try:
                tokens = self._header_tokens(path)
            except SnapshotFileError as e:
                log.warning("prefix cache: %s; ignored", e)
                continue
            found.append((path.stat().st_mtime, tokens, path.stat().st_size))
        for _, tokens, size in sorted(found):
            self._files[tokens] = size
        self._evict()

    def _header_tokens(self, path: Path) -> tuple[int, ...]:
        """The tokens a snapshot file holds, from its header, after checking that it belongs to
        this model."""
        header = read_header(path, SnapshotFileError, WHAT)
        if header.get("format") != FORMAT or any(k not in header for k in FIELDS):
            raise SnapshotFileError(f"{path}: not {WHAT} of this version of gemma_mlx")
        try:
            fields = {k: json.loads(header[k]) for k in ("signature", "weights", "tokens")}
        except json.JSONDecodeError as e:
            raise SnapshotFileError(f"{path}: damaged metadata ({e})") from e
        check_identity(path, fields, self.model, SnapshotFileError)
        if header["kinds"] != self.identity["kinds"]:
            raise SnapshotFileError(f"{path}: holds caches of other settings (--kv-bits?)")
        tokens = fields["tokens"]
        if not isinstance(tokens, list) or path.name != file_name(tokens):
            raise SnapshotFileError(f"{path}: its tokens do not match its name")
        return tuple(tokens)

    def _touch(self, key: tuple[int, ...]) -> None:
        self._files.move_to_end(key)
        path = self.directory / file_name(key)
        try:
            os.utime(path)  # the order survives a restart
        except OSError:
            self._forget(key)

    def _forget(self, key: tuple[int, ...]) -> None:
        self._files.pop(key, None)
        (self.directory / file_name(key)).unlink(missing_ok=True)

    def _evict(self) -> None:
        while self._files and self.nbytes > self.budget_bytes:
            self._forget(next(iter(self._files)))
