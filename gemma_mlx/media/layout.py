"""Where soft tokens go in a prompt: transformers' `Gemma4Processor` text expansion, on token ids.

The chat template writes one placeholder per image (`<|image|>`), clip (`<|audio|>`) or video
(`<|video|>`). The processor replaces each with begin marker + one placeholder per soft token +
end marker: `<|image>` `<|image|>` x n `<image|>` for images, the audio markers for clips, and for a
video one "mm:ss " timestamp and an image-marked run of `<|video|>` per frame, joined by spaces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
    stamps = [f"{int(s // 60):02d}:{int(s % 60):02d}" for s in timestamps]
    return " ".join(f"{t} {boi}{video * soft_tokens}{eoi}" for t in stamps)


def expand_video(
    tokens: Sequence[int],
    placeholder: int,
    frame_texts: Sequence[str],
    encode: Callable[[str], list[int]],
) -> list[int]:
    """Replace the i-th video `placeholder` by the tokens of `frame_texts[i]` (`video_text`)."""
    found = sum(1 for t in tokens if t == placeholder)
    if found != len(frame_texts):
        raise MediaError(
            f"the prompt has {found} video placeholder(s) but {len(frame_texts)} video(s) given"
        )
    out: list[int] = []
    texts = iter(frame_texts)
    for token in tokens:
        out += encode(next(texts)) if token == placeholder else [token]
    return out


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
