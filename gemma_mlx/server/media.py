"""Images and audio in HTTP requests: what a client may name, read into bytes and checked before
the request is queued, so that bad media get a 400 in the API's own shape (streams included)
and never reach the engine.

Sources go through `gemma_mlx.media.untrusted` under the server's `SourcePolicy` (data: URLs
always; local files with `--allow-local-media`; http(s) with `--allow-remote-media`). Each item
is decoded once here (corrupt files, unsupported formats, pixel bombs, audio too long) and a
model without the needed tower refuses it; the engine encodes the bytes (MLX work stays on its
thread). Pure Python and numpy: the HTTP layer runs this in a worker thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma_mlx.errors import MediaError
from gemma_mlx.media.audio import read_audio
from gemma_mlx.media.image import DEFAULT_SOFT_TOKENS, image_patches
from gemma_mlx.media.prompt import media_args
from gemma_mlx.media.untrusted import SourcePolicy, base64_source, untrusted_source
from gemma_mlx.server.errors import invalid

AUDIO_FORMATS = ("wav", "mp3")  # OpenAI's input_audio formats


@dataclass(frozen=True)
class MediaPolicy:
    """The served model's towers (`model.media_args`; None for a text-only model), where
    clients' media may come from, and the tokens an image takes."""

    model_args: Any = None
    sources: SourcePolicy = field(default_factory=SourcePolicy)
    max_soft_tokens: int = DEFAULT_SOFT_TOKENS


@dataclass
class MediaFiles:
    """A request's images and audio clips, in prompt order, read and checked."""

    policy: MediaPolicy
    images: list[bytes] = field(default_factory=list)
    audio: list[bytes] = field(default_factory=list)

    def image_from_url(self, url: str, param: str) -> None:
        """An image named by a URL (OpenAI `image_url.url`, Anthropic `url` sources)."""
        with _as_400(param):
            self._add_image(_read(untrusted_source(url, "image", self.policy.sources)))

    def image_from_base64(self, data: str, param: str) -> None:
        with _as_400(param):
            self._add_image(base64_source(data, "image", self.policy.sources))

    def audio_from_base64(self, data: str, audio_format: str, param: str) -> None:
        """OpenAI `input_audio`: base64 bytes in one of `AUDIO_FORMATS`."""
        with _as_400(param):
            if audio_format not in AUDIO_FORMATS:
                raise MediaError(
                    f"audio format {audio_format!r} is not supported (use {' or '.join(AUDIO_FORMATS)})"
                )
            self._needs("audio")
            clip = base64_source(data, "audio", self.policy.sources)
            read_audio(clip)  # decodes it: corrupt, unreadable or too long fail here
            self.audio.append(clip)

    def _add_image(self, data: bytes) -> None:
        args = self._needs("images")
        vision = args.vision
        # Decoding and patching check format, corruption and the pixel limit.
        image_patches(
            data, vision.patch_size, vision.pooling_kernel_size, self.policy.max_soft_tokens,
            merge=args.unified,
        )  # fmt: skip
        self.images.append(data)

    def _needs(self, kind: str) -> Any:
        if self.policy.model_args is None:
            raise MediaError(
                f"this model is text-only (loaded without towers): it cannot take {kind}"
            )
        return media_args(_Towers(self.policy.model_args), kind)


@dataclass(frozen=True)
class _Towers:
    """What `media_args` reads off a model."""

    media_args: Any


def _read(source: bytes | Path) -> bytes:
    if isinstance(source, bytes):
        return source
    try:
        return source.read_bytes()
    except OSError as e:
        raise MediaError(f"{source}: cannot be read ({e.strerror or e})") from e


@contextmanager
def _as_400(param: str) -> Iterator[None]:
    """A `MediaError` as a 400 naming the request field."""
    try:
        yield
    except MediaError as e:
        raise invalid(f"{param}: {e}", param=param) from e
