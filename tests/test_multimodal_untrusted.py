"""Media references from a server's clients (`gemma_mlx.media.untrusted`): inline data always,
local files and http(s) URLs only when the policy allows them, sizes bounded, one clear
`MediaError` per refusal. URLs are fetched from an HTTP server on localhost."""

from __future__ import annotations

import base64
import http.server
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gemma_mlx.errors import MediaError
from gemma_mlx.media import SourcePolicy, base64_source, untrusted_source
from gemma_mlx.media.image import image_patches

CLOSED, LOCAL, REMOTE = (
    SourcePolicy(),
    SourcePolicy(allow_local=True),
    SourcePolicy(allow_remote=True),
)


def png_bytes() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


PNG = png_bytes()
REDIRECTS = {"/moved": "/cat.png", "/to-ftp": "ftp://127.0.0.1:1/cat.png"}


@pytest.fixture(scope="module")
def site():
    """http://127.0.0.1:PORT/cat.png serves PNG; /moved redirects there, /to-ftp to an ftp
    URL; other paths are 404."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path in REDIRECTS:
                self.send_response(302)
                self.send_header("Location", REDIRECTS[self.path])
                self.end_headers()
                return
            if self.path != "/cat.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_data_urls_are_always_taken():
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    data = untrusted_source(url, "image", CLOSED)
    assert data == PNG
    assert image_patches(data, 4, 3, 70).soft_tokens > 0  # what the image decoder reads
    with pytest.raises(MediaError, match="larger than 100 bytes"):
        untrusted_source(url, "image", SourcePolicy(max_bytes=100))
    with pytest.raises(MediaError, match="not valid base64"):
        untrusted_source("data:image/png;base64,@@@", "image", CLOSED)


def test_local_files_only_when_allowed(tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(PNG)
    for reference in (str(path), f"file://{path}"):
        with pytest.raises(MediaError, match="reading local image files is not allowed"):
            untrusted_source(reference, "image", CLOSED)
        with pytest.raises(MediaError, match="reading local image files is not allowed"):
            untrusted_source(reference, "image", REMOTE)
        assert untrusted_source(reference, "image", LOCAL) == Path(path)
    with pytest.raises(MediaError, match="no such audio file"):
        untrusted_source(str(tmp_path / "missing.wav"), "audio", LOCAL)
    with pytest.raises(MediaError, match="larger than 10 bytes"):
        untrusted_source(str(path), "image", SourcePolicy(allow_local=True, max_bytes=10))


def test_urls_fetched_only_when_allowed(site):
    url = f"{site}/cat.png"
    with pytest.raises(MediaError, match="fetching image URLs is not allowed"):
        untrusted_source(url, "image", LOCAL)
    assert untrusted_source(url, "image", REMOTE) == PNG
    assert untrusted_source(f"{site}/moved", "image", REMOTE) == PNG
    # Redirects only to http(s) URLs (urllib alone would follow one to ftp).
    with pytest.raises(MediaError, match=r"HTTP 302"):
        untrusted_source(
            f"{site}/to-ftp", "image", SourcePolicy(allow_local=True, allow_remote=True)
        )
    with pytest.raises(MediaError, match=r"HTTP 404"):
        untrusted_source(f"{site}/dog.png", "image", REMOTE)
    with pytest.raises(MediaError, match="larger than 100 bytes"):
        untrusted_source(url, "image", SourcePolicy(allow_remote=True, max_bytes=100))
    with pytest.raises(MediaError, match="could not be fetched"):
        untrusted_source("http://127.0.0.1:1/x.png", "image", REMOTE)  # nothing listens there


def test_other_references_are_refused():
    with pytest.raises(MediaError, match="unsupported image URL"):
        untrusted_source("ftp://example.com/cat.png", "image", SourcePolicy(True, True))
    with pytest.raises(MediaError, match="non-empty string"):
        untrusted_source("", "image", LOCAL)


def test_bare_base64():
    assert base64_source(base64.b64encode(PNG).decode(), "audio", CLOSED) == PNG
    with pytest.raises(MediaError, match="not valid base64"):
        base64_source("not base64!", "audio", CLOSED)
    with pytest.raises(MediaError, match="larger than 100 bytes"):
        base64_source(base64.b64encode(PNG).decode(), "image", SourcePolicy(max_bytes=100))
    with pytest.raises(MediaError, match="non-empty base64"):
        base64_source(None, "image", CLOSED)
