"""A prompt with images, audio and videos, ready for a multimodal model: the processor's token layout and
the encoded soft tokens (`gemma4_multimodal.PromptMedia`).

`prepare(model, tokens, images=[...], audio=[...])` takes the tokens the chat template made (one
`<|image|>` / `<|audio|>` placeholder per item, in prompt order), encodes each item with the
model's towers, expands each placeholder to its markers and soft-token run, and returns the new
tokens with their `PromptMedia`. Nothing is encoded for a checkpoint without the needed tower: that
is a `MediaError` up front, and every file is read and checked before anything is encoded.

`gemma_mlx.decode.prefill(..., media=...)` then feeds the prompt into the cache in chunks that
never cut an image in two; later turns extend the same cache without re-encoding anything: the
`encoded` memo keeps soft tokens by a hash of the content (`media_key`), and `reusable_prefix`
tells how much of a cache holding an earlier prompt a new prompt can keep.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from gemma_mlx.cache import shared_prefix
from gemma_mlx.errors import MediaError
from gemma_mlx.media.audio import AudioSource, log_mel, read_audio, waveform_frames
from gemma_mlx.media.image import DEFAULT_SOFT_TOKENS, ImageSource, image_patches
from gemma_mlx.media.layout import TextCodec, VideoRun, expand, expand_video
from gemma_mlx.media.sources import resolve_source
from gemma_mlx.media.video import VIDEO_SOFT_TOKENS, VideoSource, read_video
from gemma_mlx.models.gemma4_multimodal import (
    MediaItem,
    MultimodalArgs,
    PromptMedia,
    placeholder_runs,
)


@dataclass(frozen=True)
class EncodedMedia:
    """An image or clip whose soft tokens an `encoded` memo holds under `key`: what a chat
    session keeps in its history (and saves) in place of the file it came from."""

    key: str


@dataclass(frozen=True)
class PreparedPrompt:
    """Token ids with the soft tokens of their images and audio: what `stream_generate` runs."""

    tokens: list[int]
    media: PromptMedia | None = None


def media_args(model: nn.Module, needs: str) -> MultimodalArgs:
    """The model's multimodal config, or a `MediaError` saying it cannot take `needs`."""
    args = getattr(model, "media_args", None)
    if args is None:
        raise MediaError(
            f"this model was loaded without vision and audio towers (a text-only checkpoint, or "
            f"gemma_mlx.load(..., media=False)): it cannot take {needs}"
        )
    tower = args.audio if needs == "audio" else args.vision
    if tower is None:
        kind = "audio" if needs == "audio" else "vision"
        raise MediaError(f"this checkpoint has no {kind} tower: it cannot take {needs}")
    return args


def encode_image(
    model: nn.Module,
    source: ImageSource,
    max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
    resize: str | None = None,
) -> mx.array:
    """Soft tokens [n, hidden] of one image (a path, bytes or a PIL image); `resize` as
    `image_patches` takes it."""
    args = media_args(model, "images")
    vision = args.vision
    patches = image_patches(
        source, vision.patch_size, vision.pooling_kernel_size, max_soft_tokens, args.unified,
        resize=resize,
    )  # fmt: skip
    return model.encode_image(mx.array(patches.patches), mx.array(patches.positions))


def encode_audio(
    model: nn.Module, source: AudioSource, sampling_rate: int | None = None
) -> mx.array:
    """Soft tokens [n, hidden] of one clip (a path, bytes, or samples with their rate)."""
    args = media_args(model, "audio")
    return model.encode_audio(mx.array(audio_features(args, read_audio(source, sampling_rate))))


def encode_video(model: nn.Module, source: VideoSource) -> tuple[mx.array, list[float]]:
    """Soft tokens [frames * n, hidden] of a video's sampled frames (each encoded like an image
    with `VIDEO_SOFT_TOKENS` and resized as the torchvision video processor does), and the frames'
    times in seconds."""
    media_args(model, "videos")
    video = read_video(source)
    frames = [
        encode_image(model, frame, VIDEO_SOFT_TOKENS, resize="torchvision")
        for frame in video.frames
    ]
    return mx.concatenate(frames), video.timestamps


def audio_features(args: MultimodalArgs, samples: np.ndarray) -> np.ndarray:
    """The audio tower's input for 16 kHz samples: log-mel frames, or the 12B's waveform frames."""
    if args.unified:
        return waveform_frames(samples, args.audio.audio_embed_dim)
    if args.audio.mel_bins != 128:
        raise MediaError(
            f"the audio tower expects {args.audio.mel_bins} mel bins; the feature extractor "
            "makes 128"
        )
    return log_mel(samples)


def prepare(
    model: nn.Module,
    tokens: Sequence[int],
    images: Sequence[ImageSource | EncodedMedia] = (),
    audio: Sequence[AudioSource | tuple[np.ndarray, int] | EncodedMedia] = (),
    max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
    encoded: dict[str, mx.array] | None = None,
    videos: Sequence[VideoSource] = (),
    encode_text: Callable[[str], list[int]] | TextCodec | None = None,
) -> tuple[list[int], PromptMedia | None]:
    """(expanded tokens, their media) for a prompt whose placeholders stand for `images`, `audio`
    and `videos` in order (a clip: a file path or bytes, or (samples, sampling rate)); (tokens,
    None) when there is none. `encoded` (content hash -> soft tokens, filled as items are encoded)
    spares re-encoding what an earlier turn already did; `EncodedMedia` items are taken from it.
    `encode_text` (text -> ids without special tokens, or a `TextCodec`, which also joins the first
    timestamp to the text before it as transformers does) tokenizes the videos' frame timestamps."""
    if not images and not audio and not videos:
        if getattr(model, "media_args", None) is not None:  # placeholders need their media
            ids = model.media_args.tokens
            expand(tokens, ids.image, ids.boi, ids.eoi, [], "image")
            expand(tokens, ids.audio, ids.boa, ids.eoa, [], "audio")
            expand_video(tokens, ids.video, [])
        return list(tokens), None
    for needs, items in (("images", images), ("audio", audio), ("videos", videos)):
        if items:
            media_args(model, needs)  # refuse before reading any file
    if videos and encode_text is None:
        raise MediaError("videos need the tokenizer (encode_text) for their frame timestamps")
    memo = {} if encoded is None else encoded
    clips = [clip if isinstance(clip, tuple) else (clip, None) for clip in audio]
    # Every item is hashed (read) before any is encoded: a missing file fails first.
    image_keys = [media_key("image", image, max_soft_tokens) for image in images]
    audio_keys = [media_key("audio", clip, rate) for clip, rate in clips]
    video_keys = [media_key("video", video, VIDEO_SOFT_TOKENS) for video in videos]

    def remembered(key: str, source: object, encode: Callable[[], mx.array]) -> mx.array:
        if key not in memo:
            if isinstance(source, EncodedMedia):
                raise MediaError(f"encoded media {key[:12]}…: its soft tokens are not in the memo")
            memo[key] = encode()
        return memo[key]

    image_tokens = [
        remembered(key, image, lambda i=image: encode_image(model, i, max_soft_tokens))
        for key, image in zip(image_keys, images, strict=True)
    ]
    audio_tokens = [
        remembered(key, clip, lambda c=clip, r=rate: encode_audio(model, c, r))
        for key, (clip, rate) in zip(audio_keys, clips, strict=True)
    ]
    ids = model.media_args.tokens
    counts = [e.shape[0] for e in image_tokens]
    tokens = expand(tokens, ids.image, ids.boi, ids.eoi, counts, "image")
    counts = [e.shape[0] for e in audio_tokens]
    tokens = expand(tokens, ids.audio, ids.boa, ids.eoa, counts, "audio")
    frame_tokens, frame_keys, runs = [], [], []
    if callable(encode_text):
        encode_text = TextCodec(encode_text)
    for key, video in zip(video_keys, videos, strict=True):
        if key not in memo or f"{key}:timestamps" not in memo:
            memo[key], stamps = encode_video(model, video)
            memo[f"{key}:timestamps"] = mx.array(stamps)
        stamps = memo[f"{key}:timestamps"].tolist()
        frame_tokens += mx.split(memo[key], len(stamps))
        frame_keys += [f"{key}:{i}" for i in range(len(stamps))]
        runs.append(VideoRun(stamps, memo[key].shape[0] // len(stamps)))
    tokens = expand_video(tokens, ids.video, runs, (ids.boi, ids.eoi), encode_text)
    media = model.place_media(
        tokens, images=image_tokens, audio=audio_tokens, video_frames=frame_tokens
    )
    keys = {"image": iter(image_keys), "audio": iter(audio_keys), "video": iter(frame_keys)}
    media.items = tuple(
        MediaItem(begin, end, kind, next(keys[kind]))
        for begin, end, kind in placeholder_runs(np.asarray(tokens), ids)
    )
    return tokens, media


def media_key(
    kind: str, source: ImageSource | AudioSource | EncodedMedia, *settings: object
) -> str:
    """A content hash of one image or clip and the settings it is encoded with (for memos and
    prefix caches: the same bytes give the same soft tokens, whatever the file is called)."""
    if isinstance(source, EncodedMedia):
        return source.key
    digest = hashlib.sha256(f"{kind}:{settings}".encode())
    if isinstance(source, Image.Image):
        digest.update(f"{source.mode}{source.size}".encode())
        digest.update(source.tobytes())
    elif isinstance(source, np.ndarray):
        digest.update(f"{source.dtype}{source.shape}".encode())
        digest.update(np.ascontiguousarray(source).tobytes())
    elif isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        resolved = resolve_source(source, kind)
        try:
            digest.update(resolved if isinstance(resolved, bytes) else resolved.read_bytes())
        except FileNotFoundError as e:
            raise MediaError(f"{source}: no such {kind} file") from e
        except OSError as e:
            raise MediaError(f"{source}: cannot be read ({e.strerror or e})") from e
    else:
        raise MediaError(
            f"an {kind} must be a file path, bytes, a data URL"
            + (", a PIL image" if kind == "image" else " or (samples, sampling rate)")
            + f"; got {type(source).__name__}"
        )
    return digest.hexdigest()


def reusable_prefix(
    cached: Sequence[int],
    cached_items: Sequence[MediaItem],
    tokens: Sequence[int],
    items: Sequence[MediaItem],
) -> int:
    """How many tokens of a cache holding `cached` (with media `cached_items`) a prompt `tokens`
    (with `items`) can keep: their common prefix, cut back to the start of the first item the two
    prompts hold differently (same placeholders, other content) or that the prefix would cut."""
    n = shared_prefix(cached, tokens)
    before = {(item.begin, item.end): item.key for item in cached_items}
    for item in items:
        if item.begin >= n:
            break
        if item.end > n or before.get((item.begin, item.end)) != item.key:
            return item.begin
    return n
