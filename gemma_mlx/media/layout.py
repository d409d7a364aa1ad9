"""Where soft tokens go in a prompt: transformers' `Gemma4Processor` text expansion, on token ids.

The chat template writes one placeholder per image (`<|image|>`), clip (`<|audio|>`) or video
(`<|video|>`). The processor replaces each with begin marker + one placeholder per soft token +
end marker: `<|image>` `<|image|>` x n `<image|>` for images, the audio markers for clips, and for a
video one "mm:ss " timestamp and an image-marked run of `<|video|>` per frame, joined by spaces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gemma_mlx.errors import MediaError


def expand(
    tokens: Sequence[int], placeholder: int, begin: int, end: int, counts: Sequence[int], kind: str
) -> list[int]:
    """Replace the i-th `placeholder` in `tokens` by [begin] + [placeholder] * counts[i] + [end]."""
    found = sum(1 for t in tokens if t == placeholder)
    if found != len(counts):
        raise MediaError(
            f"the prompt has {found} {kind} placeholder(s) but {len(counts)} {kind} input(s) "
            "were given"
        )
    out: list[int] = []
    i = 0
    for token in tokens:
        if token == placeholder:
            out += [begin, *([placeholder] * counts[i]), end]
            i += 1
        else:
            out.append(token)
    return out


def video_text(
    timestamps: Sequence[float], soft_tokens: int, boi: str, video: str, eoi: str
) -> str:
    """The processor's replacement text for one video: "mm:ss <boi><video>*n<eoi>" per frame."""
    return " ".join(f"{stamp(t)} {boi}{video * soft_tokens}{eoi}" for t in timestamps)


@dataclass(frozen=True)
class VideoRun:
    """One video's part of the layout: its frames' times in seconds and soft tokens per frame."""

    timestamps: Sequence[float]
    soft_tokens: int


@dataclass(frozen=True)
class TextCodec:
    """What the video layout needs of the tokenizer: `encode` (text -> ids, no special tokens);
    with `decode` (ids -> text, special tokens kept) and `special_ids` (where the tokenizer cuts
    text), the first timestamp is tokenized with the text before the video, as transformers'
    processor tokenizes the expanded text."""

    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str] | None = None
    special_ids: frozenset[int] = frozenset()

    @classmethod
    def of(cls, tokenizer: Any) -> TextCodec:
        """The codec of a `gemma_mlx.tokenizer.Tokenizer`."""
        return cls(
            lambda text: tokenizer.encode(text, add_special_tokens=False),
            lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
            frozenset(tokenizer.special_ids),
        )


def stamp(seconds: float) -> str:
    """A frame's "mm:ss" timestamp."""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def expand_video(
    tokens: Sequence[int],
    placeholder: int,
    videos: Sequence[VideoRun],
    markers: tuple[int, int],
    text: TextCodec | None = None,
) -> list[int]:
    """Replace the i-th video `placeholder` by the tokens of `video_text` for `videos[i]`: per
    frame "mm:ss " (tokenized by `text`) and the `markers` (begin, end) around the frame's run of
    placeholders. The first timestamp joins the text since the last special token, where that
    text re-encodes to its own tokens (a prompt tokenized from text); otherwise it is tokenized
    on its own."""
    found = sum(1 for t in tokens if t == placeholder)
    if found != len(videos):
        raise MediaError(
            f"the prompt has {found} video placeholder(s) but {len(videos)} video(s) given"
        )
    if videos and text is None:
        raise MediaError("videos need the tokenizer for their frame timestamps")
    begin, end = markers
    out: list[int] = []
    pieces = iter(videos)
    for token in tokens:
        if token != placeholder:
            out.append(token)
            continue
        video = next(pieces)
        for i, seconds in enumerate(video.timestamps):
            piece = f"{' ' if i else ''}{stamp(seconds)} "
            if i == 0:
                out = joined_with_text_before(out, piece, text)
            else:
                out += text.encode(piece)
            out += [begin, *[placeholder] * video.soft_tokens, end]
    return out


def joined_with_text_before(tokens: list[int], piece: str, text: TextCodec) -> list[int]:
    """`tokens` followed by `piece`, its text since the last special token tokenized together with
    `piece` when those tokens are what that text encodes to."""
    start = next(
        (i + 1 for i in range(len(tokens) - 1, -1, -1) if tokens[i] in text.special_ids), 0
    )
    before = tokens[start:]
    if before and text.decode is not None:
        written = text.decode(before)
        if text.encode(written) == before:
            return [*tokens[:start], *text.encode(written + piece)]
    return [*tokens, *text.encode(piece)]


def with_placeholders(
    tokens: Sequence[int], placeholder: int, count: int, bos: int | None
) -> list[int]:
    """`tokens` with `count` placeholders put at its start (after BOS) when it holds none: where
    a prompt written without them takes its images or clips. A prompt with some keeps them."""
    tokens = list(tokens)
    if count == 0 or placeholder in tokens:
        return tokens
    at = 1 if tokens[:1] == [bos] else 0
    return [*tokens[:at], *[placeholder] * count, *tokens[at:]]
