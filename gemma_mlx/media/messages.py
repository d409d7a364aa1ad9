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

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from gemma_mlx.errors import MediaError, OptionError, OptionTypeError
from gemma_mlx.media.prompt import EncodedMedia
from gemma_mlx.options import check_text

KINDS = ("image", "audio")
# The keys transformers' templates and processors accept for a part's source.
SOURCE_KEYS = {kind: (kind, "url", "path") for kind in ("image", "audio", "video")}
# How a saved session writes an `EncodedMedia` source.
ENCODED = "encoded"


def _parts(
    messages: Sequence[Mapping[str, Any]], kinds: Sequence[str] = KINDS
) -> Iterator[tuple[int, int, Mapping[str, Any]]]:
    """(message index, part index, part) of every part of one of `kinds`."""
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, Sequence) or isinstance(content, str):
            continue
        for j, part in enumerate(content):
            if isinstance(part, Mapping) and part.get("type") in kinds:
                yield i, j, part


def media_parts(messages: Sequence[Mapping[str, Any]]) -> tuple[list[Any], list[Any]]:
    """(image sources, audio sources) of all messages' content parts, in order."""
    found = _sources(messages, KINDS)
    return found["image"], found["audio"]


def video_parts(messages: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Sources of all messages' video parts (`{"type": "video", "video": path}`), in order. A
    chat session keeps them as they are (files are re-read and matched by content hash)."""
    return _sources(messages, ("video",))["video"]


def _sources(messages: Sequence[Mapping[str, Any]], kinds: Sequence[str]) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {kind: [] for kind in kinds}
    for i, j, part in _parts(messages, kinds):
        kind = part["type"]
        source = next((part[k] for k in SOURCE_KEYS[kind] if part.get(k) is not None), None)
        if source is None:
            raise MediaError(
                f"message {i} part {j}: an {kind} part needs its source under "
                f"{' / '.join(repr(k) for k in SOURCE_KEYS[kind])}"
            )
        found[kind].append(source)
    return found


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


def media_list(name: str, value: Any) -> list[Any]:
    """`images=`/`audio=` as a list: one source (a path, bytes, data URL, PIL image, or for audio
    (samples, sampling rate)) or a list of them."""
    if value is None:
        return []
    one = isinstance(value, (str, bytes, os.PathLike, EncodedMedia)) or hasattr(value, "getbands")
    if name == "audio" and isinstance(value, tuple) and len(value) == 2:
        one = isinstance(value[1], int) and not isinstance(value[1], bool)
    if one:
        return [value]
    if not isinstance(value, Sequence):
        raise OptionTypeError(f"{name} must be a source or a list of sources, got {value!r}")
    return list(value)


def media_content(
    images: Sequence[Any], audio: Sequence[Any], videos: Sequence[Any] = ()
) -> list[dict[str, Any]]:
    """Content parts for `images`, `audio` and `videos`: the images, the clips, the videos."""
    return [
        *({"type": "image", "image": image} for image in images),
        *({"type": "audio", "audio": clip} for clip in audio),
        *({"type": "video", "video": video} for video in videos),
    ]


def user_content(
    message: str | Sequence[Mapping[str, Any]], images: Any, audio: Any, videos: Any = ()
) -> str | list[Mapping[str, Any]]:
    """A user message's content: the text, or content parts (images, audio, videos, the text)."""
    images, audio = media_list("images", images), media_list("audio", audio)
    videos = media_list("videos", videos)
    if not isinstance(message, str):
        if images or audio or videos:
            raise OptionError("give images and audio as content parts or as images=/audio=")
        if not isinstance(message, Sequence) or not all(isinstance(p, Mapping) for p in message):
            raise OptionTypeError("message must be a string or a list of content parts (dicts)")
        return list(message)
    check_text("message", message)
    if not images and not audio and not videos:
        return message
    return [*media_content(images, audio, videos), {"type": "text", "text": message}]


def attach_media(
    messages: Sequence[Mapping[str, Any]], images: Sequence[Any], audio: Sequence[Any]
) -> list[dict[str, Any]]:
    """`messages` with `images` and `audio` as content parts in front of the last user message."""
    out = [dict(m) for m in messages]
    last = next((m for m in reversed(out) if m.get("role") == "user"), None)
    if last is None:
        raise OptionError("images and audio need a user message to go with")
    content = last.get("content")
    text = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
    last["content"] = [*media_content(images, audio), *text]
    return out
