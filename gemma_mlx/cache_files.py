"""KV caches in files: what saved chat sessions, prompt-cache files and the server's disk tier
share.

A file is safetensors: the caches' `state` arrays (`cache.<layer>.<path in the state>`) and JSON
metadata fields, among them the model's identity (shapes and the weights' fingerprint), each
cache's class name and `meta_state`, and a sha256 over every field and array, so that a file of
another model or a damaged file is refused by name instead of producing wrong text. A cache is
rebuilt from its class name (any class in `gemma_mlx.cache` with `state` and `meta_state`), the way
mlx-lm's `load_prompt_cache` does, so every cache kind round-trips.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from gemma_mlx import cache as cache_module
from gemma_mlx.errors import GemmaMLXError
from gemma_mlx.fingerprint import model_fingerprint
from gemma_mlx.outputs import write_file_atomically

CACHE_ARRAY = "cache."
# safetensors starts with the 8-byte little-endian length of its JSON header.
HEADER_LENGTH = struct.Struct("<Q")
MAX_HEADER_BYTES = 100 << 20


def model_signature(model: Any, tokenizer: Any = None) -> dict[str, Any]:
    """The model's shapes (and the tokenizer's vocabulary when one is given)."""
    args = getattr(model, "args", None)
    keys = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")
    signature = {k: getattr(args, k, None) for k in keys}
    return signature if tokenizer is None else signature | {"tokenizer_vocab": tokenizer.vocab_size}


def identity_fields(model: Any, tokenizer: Any = None) -> dict[str, str]:
    """The metadata fields that name the model a file belongs to."""
    return {
        "signature": json.dumps(model_signature(model, tokenizer)),
        "weights": json.dumps(model_fingerprint(model)),
    }


def check_identity(
    path: Path, fields: Mapping[str, Any], model: Any, error: type[GemmaMLXError],
    tokenizer: Any = None,
) -> None:  # fmt: skip
    """Refuse a file (decoded `fields`) saved with another model than `model`."""
    if fields["signature"] != model_signature(model, tokenizer):
        raise error(f"{path}: was saved with a different model (other shapes)")
    if fields["weights"] != model_fingerprint(model):
        raise error(f"{path}: was saved with a different model (same shapes, other weights)")


def checksum(
    fields: Mapping[str, str], arrays: Mapping[str, mx.array], names: Sequence[str]
) -> str:
    """sha256 over the metadata fields `names` and every array's name, shape, dtype and bytes."""
    digest = hashlib.sha256()
    for key in names:
        digest.update(f"{key}={fields[key]}\n".encode())
    for name in sorted(arrays):
        value = arrays[name]
        digest.update(f"{name}|{value.shape}|{value.dtype}\n".encode())
        digest.update(np.array(value.view(mx.uint8)).tobytes())
    return digest.hexdigest()


def cache_arrays(caches: Sequence[Any]) -> dict[str, mx.array]:
    """Every cache's `state` arrays, named `cache.<layer>.<path in the state>` (nested states,
    e.g. a quantized cache's (data, scales, biases), get a longer path)."""
    return {
        f"{CACHE_ARRAY}{i}.{name}": value
        for i, c in enumerate(caches)
        for name, value in tree_flatten(c.state)
    }


def cache_fields(caches: Sequence[Any]) -> dict[str, str]:
    """The metadata fields that describe the caches: their class names and `meta_state`s."""
    return {
        "cache_types": json.dumps([type(c).__name__ for c in caches]),
        "meta_state": json.dumps([list(c.meta_state) for c in caches]),
    }


def cache_classes() -> dict[str, type]:
    """The cache kinds a file may name: the classes of `gemma_mlx.cache` that can be saved."""
    return {
        name: value
        for name, value in vars(cache_module).items()
        if isinstance(value, type)
        and value.__module__ == cache_module.__name__
        and hasattr(value, "state")
        and hasattr(value, "meta_state")
    }


def restored_caches(
    path: Path, arrays: Mapping[str, mx.array], fields: Mapping[str, Any],
    error: type[GemmaMLXError],
) -> list:  # fmt: skip
    """The caches a file holds (decoded `fields`: `cache_types`, `meta_state`), each rebuilt from
    its class, its state and its meta state."""
    classes = cache_classes()
    types, metas = fields["cache_types"], fields["meta_state"]
    if not isinstance(types, list) or not isinstance(metas, list) or len(types) != len(metas):
        raise error(f"{path}: damaged (its cache list is malformed)")
    caches = []
    try:
        for i, (name, meta) in enumerate(zip(types, metas, strict=True)):
            if name not in classes:
                raise error(f"{path}: holds a cache kind this version does not know ({name!r})")
            prefix = f"{CACHE_ARRAY}{i}."
            state = [(k[len(prefix) :], v) for k, v in arrays.items() if k.startswith(prefix)]
            cache = classes[name].__new__(classes[name])
            if state:
                cache.state = tree_unflatten(state)
            cache.meta_state = tuple(meta)
            caches.append(cache)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise error(f"{path}: its cache cannot be restored ({e})") from e
    return caches


def write_cache_file(
    path: Path, arrays: Mapping[str, mx.array], file_format: str, fields: Mapping[str, str],
    force: bool = False,
) -> None:  # fmt: skip
    """Write `arrays` and the metadata `fields` (+ format and checksum) to `path` atomically: the
    file appears complete or not at all; an existing file is replaced only with `force`."""
    mx.eval(dict(arrays))
    metadata = {"format": file_format, **fields, "checksum": checksum(fields, arrays, list(fields))}

    def write(partial: Path) -> None:
        with partial.open("wb") as f:
            mx.save_safetensors(f, dict(arrays), metadata=metadata)

    write_file_atomically(path, write, force=force)


def read_header(path: Path, error: type[GemmaMLXError], what: str) -> dict[str, str]:
    """The metadata of a safetensors file, without reading its arrays."""
    try:
        with path.open("rb") as f:
            (length,) = HEADER_LENGTH.unpack(f.read(HEADER_LENGTH.size))
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"header length {length}")
            header = json.loads(f.read(length))
        metadata = header.get("__metadata__", {})
        if not isinstance(metadata, dict):
            raise ValueError("no metadata")
        return metadata
    except (OSError, struct.error, ValueError, AttributeError) as e:
        raise error(f"{path}: cannot be read as {what} ({e})") from e


def read_cache_file(
    path: Path, formats: Mapping[str, Sequence[str]], error: type[GemmaMLXError], what: str
) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """The arrays and the decoded metadata fields of a file written by `write_cache_file` in one
    of `formats` (format -> its field names), after checking its checksum."""
    try:
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise error(f"{path}: cannot be read as {what} ({e})") from e
    names = formats.get(metadata.get("format"))
    if names is None:
        newest = list(formats)[-1]
        raise error(f"{path}: not {what} saved by this version of gemma_mlx (format {newest})")
    missing = [key for key in (*names, "checksum") if key not in metadata]
    if missing:
        raise error(f"{path}: damaged (no '{missing[0]}' in its metadata)")
    if metadata["checksum"] != checksum(metadata, arrays, names):
        raise error(f"{path}: damaged (its checksum does not match its contents)")
    try:
        return arrays, {key: json.loads(metadata[key]) for key in names}
    except json.JSONDecodeError as e:
        raise error(f"{path}: damaged metadata ({e})") from e
