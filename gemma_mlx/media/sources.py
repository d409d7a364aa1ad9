"""Where a media file comes from: a path, bytes, or a base64 `data:` URL; never the network."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from gemma_mlx.errors import MediaError


def resolve_source(source: str | Path | bytes, kind: str) -> Path | bytes:
    """Bytes for a `data:` URL, a path otherwise; http(s) URLs are refused (never fetched here)."""
    if isinstance(source, bytes):
        return source
    text = str(source)
    if text.startswith(("http://", "https://")):
        raise MediaError(
            f"{text}: {kind} URLs are not fetched; download the file and pass its path"
        )
    if text.startswith("data:"):
        header, _, payload = text.partition(",")
        if not header.endswith(";base64"):
            raise MediaError(f"a data URL {kind} must be base64 ('data:...;base64,...')")
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error as e:
            raise MediaError(f"a data URL {kind} is not valid base64 ({e})") from e
    return Path(source)
