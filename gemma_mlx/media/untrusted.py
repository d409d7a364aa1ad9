"""Media named by someone else (an HTTP client of the server): what a reference may point at.

The library itself reads any local path it is given and never fetches a URL
(`sources.resolve_source`). A server must not let its clients read the server's files or make it
fetch URLs unless its operator said so; `untrusted_source` turns a client's reference into bytes
(or, when allowed, a local path) under a `SourcePolicy`, and `base64_source` decodes the bare
base64 payloads of OpenAI's `input_audio` and Anthropic's base64 image blocks. The result goes into
a content part (`{"type": "image", "image": ...}`) for `gemma_mlx.generate.prepare_prompt`.
"""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gemma_mlx.errors import MediaError
from gemma_mlx.media.sources import resolve_source

DEFAULT_MAX_BYTES = 64 * 2**20  # a 30 s WAV at 48 kHz stereo float32 is 11.5 MB
REMOTE_SCHEMES = ("http://", "https://")


@dataclass(frozen=True)
class SourcePolicy:
    """What an untrusted reference may name besides inline data (base64 `data:` URLs).

    `allow_local`: file paths and `file://` URLs on this machine. `allow_remote`: http(s) URLs,
    fetched with `timeout_s`. `max_bytes`: the largest file taken, inline or fetched."""

    allow_local: bool = False
    allow_remote: bool = False
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout_s: float = 30.0


def untrusted_source(reference: str, kind: str, policy: SourcePolicy) -> bytes | Path:
    """The bytes (or local path) `reference` names, if `policy` allows it; a `MediaError` saying
    why not otherwise. `kind`: "image" or "audio", for the messages."""
    if not isinstance(reference, str) or not reference:
        raise MediaError(f"an {kind} reference must be a non-empty string (a URL)")
    if reference.startswith("data:"):
        return _checked_size(resolve_source(reference, kind), kind, policy)
    if reference.startswith(REMOTE_SCHEMES):
        if not policy.allow_remote:
            raise MediaError(f"{_short(reference)}: fetching {kind} URLs is not allowed here")
        return _fetch(reference, kind, policy)
    if reference.startswith("file://"):
        reference = reference.removeprefix("file://")
    elif "://" in reference:
        raise MediaError(
            f"{_short(reference)}: unsupported {kind} URL (use a base64 data: URL"
            + (" or an http(s) URL" if policy.allow_remote else "")
            + ")"
        )
    if not policy.allow_local:
        raise MediaError(f"{_short(reference)}: reading local {kind} files is not allowed here")
    path = Path(reference)
    if not path.is_file():
        raise MediaError(f"{reference}: no such {kind} file")
    if path.stat().st_size > policy.max_bytes:
        raise MediaError(f"{reference}: the {kind} file is larger than {policy.max_bytes} bytes")
    return path


def base64_source(data: str, kind: str, policy: SourcePolicy) -> bytes:
    """The bytes of a bare base64 payload (OpenAI `input_audio.data`, Anthropic
    `source.data`)."""
    if not isinstance(data, str) or not data:
        raise MediaError(f"the {kind} data must be a non-empty base64 string")
    if len(data) * 3 // 4 > policy.max_bytes + 2:  # checked before decoding
        raise MediaError(f"the {kind} data is larger than {policy.max_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error as e:
        raise MediaError(f"the {kind} data is not valid base64 ({e})") from e


def _checked_size(data: bytes | Path, kind: str, policy: SourcePolicy) -> bytes | Path:
    if isinstance(data, bytes) and len(data) > policy.max_bytes:
        raise MediaError(f"the {kind} data is larger than {policy.max_bytes} bytes")
    return data


class _HttpRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to another http(s) URL (urllib would also follow one to ftp)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.startswith(REMOTE_SCHEMES):
            raise urllib.error.HTTPError(newurl, code, "redirect to a non-http(s) URL", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, kind: str, policy: SourcePolicy) -> bytes:
    """The body at `url`, at most `policy.max_bytes` of it (a longer body is refused)."""
    request = urllib.request.Request(url, headers={"User-Agent": "gemma-mlx"})
    opener = urllib.request.build_opener(_HttpRedirectsOnly)
    try:
        with opener.open(request, timeout=policy.timeout_s) as response:
            data = response.read(policy.max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise MediaError(f"{_short(url)}: the {kind} could not be fetched (HTTP {e.code})") from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise MediaError(f"{_short(url)}: the {kind} could not be fetched ({reason})") from e
    if len(data) > policy.max_bytes:
        raise MediaError(f"{_short(url)}: the {kind} is larger than {policy.max_bytes} bytes")
    return data


def _short(reference: str, limit: int = 80) -> str:
    """A reference as an error message shows it (a data URL or long URL cut short)."""
    return reference if len(reference) <= limit else reference[: limit - 1] + "…"
