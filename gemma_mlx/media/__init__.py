"""Images and audio for Gemma 4's towers, without torch: decoding with safety limits
(`image`, `audio`), the processor's token layout (`layout`), prompt preparation (`prompt`)
and what a server's clients may name (`untrusted`)."""

from gemma_mlx.media.prompt import (
    EncodedMedia,
    PreparedPrompt,
    encode_audio,
    encode_image,
    prepare,
    reusable_prefix,
)
from gemma_mlx.media.untrusted import SourcePolicy, base64_source, untrusted_source

__all__ = [
    "EncodedMedia",
    "PreparedPrompt",
    "SourcePolicy",
    "base64_source",
    "encode_audio",
    "encode_image",
    "prepare",
    "reusable_prefix",
    "untrusted_source",
]
