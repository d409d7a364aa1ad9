"""Images and audio in chat messages: content parts as transformers' chat templates take them.

A message's `content` may be a list of parts: `{"type": "text", "text": ...}`,
`{"type": "image", "image": path | bytes | PIL image | data URL}` and
`{"type": "audio", "audio": path | bytes | data URL | (samples, sampling rate)}`. The Gemma 4
template writes one placeholder per image or audio part; `media_parts` lists their sources in the
same order, for `gemma_mlx.media.prepare`.

A chat session keeps its history with each source replaced by its `EncodedMedia` key
(`with_encoded`): later turns take the soft tokens from the session's memo, and a saved session
holds the keys as JSON (`to_json` / `from_json`), not the files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from gemma_mlx.errors import MediaError
from gemma_mlx.media.prompt import EncodedMedia

KINDS = ("image", "audio")
# The keys transformers' templates and processors accept for a part's source.
SOURCE_KEYS = {"image": ("image", "url", "path"), "audio": ("audio", "url", "path")}
# How a saved session writes an `EncodedMedia` source.
ENCODED = "encoded"


def _parts(messages: Sequence[Mapping[str, Any]]) -> Iterator[tuple[int, int, Mapping[str, Any]]]:
    """(message index, part index, part) of every image or audio part."""
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, Sequence) or isinstance(content, str):
            continue
        for j, part in enumerate(content):
            if isinstance(part, Mapping) and part.get("type") in KINDS:
                yield i, j, part


def media_parts(messages: Sequence[Mapping[str, Any]]) -> tuple[list[Any], list[Any]]:
    """(image sources, audio sources) of all messages' content parts, in order."""
    found: dict[str, list[Any]] = {kind: [] for kind in KINDS}
    for i, j, part in _parts(messages):
        kind = part["type"]
        source = next((part[k] for k in SOURCE_KEYS[kind] if part.get(k) is not None), None)
        if source is None:
            raise MediaError(
                f"message {i} part {j}: an {kind} part needs its source under "
                f"{' / '.join(repr(k) for k in SOURCE_KEYS[kind])}"
            )
        found[kind].append(source)
    return found["image"], found["audio"]


def map_sources(
    messages: Sequence[Mapping[str, Any]], change: Callable[[str, Any, int], Any]
) -> list[dict[str, Any]]:
    """`messages` with the source of the n-th image (audio) part replaced by
    `change("image" ("audio"), source, n)`; the messages themselves are not modified."""
    out = [dict(m) for m in messages]
    used = dict.fromkeys(KINDS, 0)
    for i, j, part in list(_parts(messages)):
        kind = part["type"]
        source = next((part[k] for k in SOURCE_KEYS[kind] if part.get(k) is not None), None)
        new = change(kind, source, used[kind])
        used[kind] += 1
        if new is not source:
            content = out[i]["content"] = list(out[i]["content"])
            content[j] = {"type": kind, kind: new}
    return out


def with_encoded(
    messages: Sequence[Mapping[str, Any]], keys: Mapping[str, Sequence[str]]
) -> list[dict[str, Any]]:
    """`messages` with the n-th image (audio) part's source replaced by `EncodedMedia` of
    `keys["image"][n]` (`keys["audio"][n]`)."""
    return map_sources(messages, lambda kind, _, n: EncodedMedia(keys[kind][n]))


def to_json(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with `EncodedMedia` sources written as {"encoded": key} (JSON-ready)."""

    def written(_: str, source: Any, __: int) -> Any:
        return {ENCODED: source.key} if isinstance(source, EncodedMedia) else source

    return map_sources(messages, written)


def from_json(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The inverse of `to_json`."""

    def read(_: str, source: Any, __: int) -> Any:
        if isinstance(source, Mapping) and isinstance(source.get(ENCODED), str):
            return EncodedMedia(source[ENCODED])
        return source

    return map_sources(messages, read)
