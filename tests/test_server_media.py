"""Images and audio over HTTP, through the official clients, on a tiny multimodal Gemma 4: replies
equal `gemma_mlx.generate` with the same media at temperature 0; the prefix cache tells images
apart by content; bad media get a 400 in each API's shape and the server stays up."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import struct
import threading
import wave
import zlib

import anthropic
import httpx
import numpy as np
import openai
import pytest
from multimodal_chat_model import write_audio, write_image, write_multimodal_model
from server_helpers import serving
from tiny_chat_model import write_model

import gemma_mlx
from gemma_mlx.generate import prepare_prompt

NAME = "mm"
MAX_TOKENS = 6
SOFT = 70  # the smallest image budget: short prompts, quick tests


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("server-media")
    return {
        "model": write_multimodal_model(root / "tiny-mm-it"),
        "image": write_image(root / "cat.png"),
        "same_size": write_image(root / "dog.png", seed=1),  # 40x30 like cat.png
        "audio": write_audio(root / "clip.wav", 0.6, 16_000),
        "root": root,
    }


@pytest.fixture(scope="module")
def loaded(files):
    return gemma_mlx.load(files["model"])


@pytest.fixture(scope="module")
def server(loaded):
    model, tokenizer = loaded
    flags = ["--served-model-name", NAME, "--allow-local-media", "--allow-remote-media",
             "--max-soft-tokens", str(SOFT)]  # fmt: skip
    with serving(model, tokenizer, *flags) as running:
        yield running


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def data_url(path, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def b64(path_or_bytes) -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else path_or_bytes.read_bytes()
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def reference(loaded):
    """(greedy reply, prompt tokens) from `gemma_mlx.generate` with a file as a content part
    (each computed once per module)."""
    return functools.cache(functools.partial(_reference, loaded))


def _reference(loaded, kind, path, text="describe this") -> tuple[str, int]:
    model, tokenizer = loaded
    messages = [
        {"role": "user", "content": [{"type": kind, kind: path}, {"type": "text", "text": text}]}
    ]
    reply = gemma_mlx.generate(
        model, tokenizer, messages, max_tokens=MAX_TOKENS, max_soft_tokens=SOFT
    )
    return reply, len(prepare_prompt(model, tokenizer, messages, max_soft_tokens=SOFT).tokens)


def image_message(url: str, text="describe this") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]  # fmt: skip


def test_openai_image_url_equals_generate(reference, files, oa):
    expected, prompt_tokens = reference("image", files["image"])
    for stream in (False, True):
        messages = image_message(data_url(files["image"]))
        if stream:
            chunks = oa.chat.completions.create(model=NAME, messages=messages,
                                                max_tokens=MAX_TOKENS, stream=True)  # fmt: skip
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            reply = oa.chat.completions.create(model=NAME, messages=messages, max_tokens=MAX_TOKENS)
            text = reply.choices[0].message.content
            assert reply.usage.prompt_tokens == prompt_tokens
        assert text == expected


def test_image_from_a_local_path_and_an_http_url(reference, files, oa):
    expected, _ = reference("image", files["image"])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=files["root"])
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        remote = f"http://127.0.0.1:{httpd.server_address[1]}/cat.png"
        for url in (str(files["image"]), remote):
            reply = oa.chat.completions.create(
                model=NAME, messages=image_message(url), max_tokens=MAX_TOKENS
            )
            assert reply.choices[0].message.content == expected
    finally:
        httpd.shutdown()


def test_openai_input_audio_equals_generate(reference, files, oa):
    expected, prompt_tokens = reference("audio", files["audio"])
    messages = [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": b64(files["audio"]), "format": "wav"}},
        {"type": "text", "text": "describe this"}]}]  # fmt: skip
    reply = oa.chat.completions.create(model=NAME, messages=messages, max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == prompt_tokens


def test_anthropic_image_blocks_equal_generate(reference, files, server):
    expected, _ = reference("image", files["image"])
    client = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    sources = [{"type": "base64", "media_type": "image/png", "data": b64(files["image"])},
               {"type": "url", "url": data_url(files["image"])}]  # fmt: skip
    for source in sources:
        message = client.messages.create(
            model=NAME, max_tokens=MAX_TOKENS,
            messages=[{"role": "user", "content": [{"type": "image", "source": source},
                                                   {"type": "text", "text": "describe this"}]}],
        )  # fmt: skip
        assert "".join(b.text for b in message.content if b.type == "text") == expected


def test_prefix_cache_keys_images_by_content(loaded, files, oa, reference):
    """A second prompt with the same image reuses the prefix through the image; one with another
    image of the same size (same tokens but the soft tokens) reuses nothing of it, and its reply
    is that image's."""
    model, tokenizer = loaded
    first = oa.chat.completions.create(
        model=NAME, messages=image_message(data_url(files["image"]), "one"), max_tokens=2
    )
    same = oa.chat.completions.create(
        model=NAME, messages=image_message(data_url(files["image"]), "two"), max_tokens=2
    )
    other = oa.chat.completions.create(
        model=NAME, messages=image_message(data_url(files["same_size"]), "one"),
        max_tokens=MAX_TOKENS,
    )  # fmt: skip
    prompt = prepare_prompt(model, tokenizer, [{"role": "user", "content": [
        {"type": "image", "image": files["image"]}, {"type": "text", "text": "one"}]}],
        max_soft_tokens=SOFT)  # fmt: skip
    item = prompt.media.items[0]
    assert first.usage.prompt_tokens == other.usage.prompt_tokens == len(prompt.tokens)
    assert same.usage.prompt_tokens_details.cached_tokens >= item.end
    assert other.usage.prompt_tokens_details.cached_tokens <= item.begin
    expected, _ = reference("image", files["same_size"], "one")
    assert other.choices[0].message.content == expected


# --- bad media ----------------------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims `width` x `height` pixels (a decompression bomb's)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def wav_seconds(seconds: float, rate: int = 8000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.zeros(int(seconds * rate), np.int16).tobytes())
    return buffer.getvalue()


def audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(data), "format": fmt}}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


BAD = {
    "corrupt": image_part("data:image/png;base64," + b64(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)),
    "not an image": image_part("data:image/png;base64," + b64(b"hello, world")),
    "pixel bomb": image_part("data:image/png;base64," + b64(png_claiming(20_000, 20_000))),
    "audio too long": audio_part(wav_seconds(31)),
    "audio format": audio_part(wav_seconds(0.5), "flac"),
    "bad base64": {"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}},
    "no such file": image_part("/nonexistent/cat.png"),
    "ftp url": image_part("ftp://example.com/cat.png"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_media_is_a_400_naming_the_part(server, case):
    """Each a 400 before anything is queued: also for a streamed request (the stream never
    starts), and the server stays up."""
    for stream in (False, True) if case in ("corrupt", "pixel bomb") else (False,):
        body = {"model": NAME, "max_tokens": 2, "stream": stream,
                "messages": [{"role": "user", "content": [BAD[case], {"type": "text", "text": "x"}]}]}  # fmt: skip
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and "Traceback" not in error["message"]
        assert error["param"].startswith("messages.0.content.0")
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_bad_anthropic_image_is_a_400_in_anthropic_shape(server):
    for source in ({"type": "base64", "media_type": "image/png", "data": b64(b"not a png")},
                   {"type": "url", "url": "ftp://example.com/x.png"}):  # fmt: skip
        body = {"model": NAME, "max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "image", "source": source}]}]}  # fmt: skip
        response = httpx.post(f"{server.url}/v1/messages", json=body, timeout=60)
        assert response.status_code == 400
        assert response.json()["type"] == "error"
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_sources_need_the_operators_permission(loaded, files, tmp_path):
    model, tokenizer = loaded
    with serving(
        model, tokenizer, "--served-model-name", NAME, "--max-soft-tokens", str(SOFT)
    ) as running:
        for url, words in (
            (str(files["image"]), "local"),
            ("http://127.0.0.1:9/x.png", "fetching"),
        ):
            body = {"model": NAME, "max_tokens": 2, "messages": image_message(url)}
            response = httpx.post(f"{running.url}/v1/chat/completions", json=body, timeout=60)
            assert response.status_code == 400 and words in response.json()["error"]["message"]
        body = {"model": NAME, "max_tokens": 2, "messages": image_message(data_url(files["image"]))}
        response = httpx.post(f"{running.url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200
    text_model, text_tokenizer = gemma_mlx.load(write_model(tmp_path / "text"))
    with serving(text_model, text_tokenizer, "--served-model-name", NAME) as running:
        body = {"model": NAME, "max_tokens": 2, "messages": image_message(data_url(files["image"]))}
        response = httpx.post(f"{running.url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 400 and "text-only" in response.json()["error"]["message"]
