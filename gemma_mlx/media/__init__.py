"""Images and audio for Gemma 4's towers, without torch: decoding with safety limits
(`image`, `audio`), the processor's token layout (`layout`) and prompt preparation (`prompt`)."""

from gemma_mlx.media.prompt import (
    EncodedMedia,
    PreparedPrompt,
    encode_audio,
    encode_image,
    prepare,
    reusable_prefix,
)

__all__ = [
    "EncodedMedia",
    "PreparedPrompt",
    "encode_audio",
    "encode_image",
    "prepare",
    "reusable_prefix",
]
