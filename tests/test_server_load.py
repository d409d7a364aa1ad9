"""`python -m gemma_mlx.server` as a subprocess under load: 64 requests from 16 concurrent
clients, some cancelled mid-stream, some malformed; then SIGTERM while a stream is open (one
server process for both: starting one takes a while on two cores)."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from server_helpers import TOOLS_TEMPLATE, rss_bytes, server_process
from tiny_chat_model import write_model

import gemma_mlx
from gemma_mlx.loading import load

NAME = "tiny"
FLAGS = ["--served-model-name", NAME, "--decode-concurrency", "4", "--max-body-bytes", "64KiB"]
TOPICS = ["the quick fox", "a lazy dog", "hello world", "paris is", "rare characters", "it keeps"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("server-load") / "m"
    return write_model(directory, chat_template=TOOLS_TEMPLATE, max_position_embeddings=1024)


def valid_requests() -> list[tuple[str, dict]]:
    """(path, body) of every valid request kind: chat, completions, messages, streamed or not."""
    out = []
    for i, topic in enumerate(TOPICS):
        options = {"max_tokens": 6 + i, "repetition_penalty": 2.0 + i / 4}
        messages = [{"role": "user", "content": topic}]
        out.append(("/v1/chat/completions", {"model": NAME, "messages": messages, **options}))
        out.append(("/v1/completions", {"model": NAME, "prompt": topic, "stream": True, **options}))
        out.append(
            (
                "/v1/messages",
                {"model": NAME, "messages": messages, "max_tokens": 6 + i, "stream": i % 2 == 0},
            )
        )
    return out


def solo(model, tokenizer, path: str, body: dict) -> str:
    """What `gemma_mlx.generate` gives for the request alone."""
    prompt = body["prompt"] if path == "/v1/completions" else body["messages"]
    options = {"max_tokens": body["max_tokens"]}
    if "repetition_penalty" in body:
        options["repetition_penalty"] = body["repetition_penalty"]
    return gemma_mlx.generate(model, tokenizer, prompt, **options)


def events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def text_of(path: str, body: dict, response: httpx.Response) -> str:
    if body.get("stream"):
        chunks = events(response)
        if path == "/v1/messages":
            return "".join(
                c["delta"].get("text", "") for c in chunks if c["type"] == "content_block_delta"
            )
        return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    data = response.json()
    if path == "/v1/messages":
        return "".join(b["text"] for b in data["content"] if b["type"] == "text")
    return data["choices"][0]["message"]["content"]


MALFORMED = [
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [', 400),
    ("/v1/chat/completions", json.dumps({"model": NAME, "messages": "hi"}).encode(), 400),
    (
        "/v1/completions",
        json.dumps({"model": NAME, "prompt": "x", "max_tokens": "5"}).encode(),
        400,
    ),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": "x", "turbo": True}).encode(), 400),
    ("/v1/messages", json.dumps({"model": NAME, "messages": [], "max_tokens": 4}).encode(), 400),
    (
        "/v1/messages",
        json.dumps(
            {"model": NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "y" * 70000}]}
        ).encode(),
        413,
    ),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": "z" * 70000}).encode(), 413),
    ("/v1/completions", json.dumps({"model": "other", "prompt": "x"}).encode(), 404),
]


def test_load_cancellation_malformed_memory_and_sigterm(model_dir):
    model, tokenizer = load(model_dir)
    valid = valid_requests()
    expected = [solo(model, tokenizer, path, body) for path, body in valid]
    endless = {str(i): -100 for i in tokenizer.eos_token_ids}  # replies that never end early
    with server_process("--model", str(model_dir), *FLAGS) as (process, url):
        client = httpx.Client(base_url=url, timeout=120)
        for path, body in valid:  # warm up every path, then measure the idle memory
            assert client.post(path, json=body).status_code == 200
        time.sleep(1.0)
        idle = rss_bytes(process.pid)

        def run(job: int) -> tuple[str, object, object]:
            kind = job % 8
            with httpx.Client(base_url=url, timeout=120) as c:
                if kind < 5:  # valid, solo output known
                    index = (job * 7) % len(valid)
                    path, body = valid[index]
                    with c.stream("POST", path, json=body) as response:
                        response.read()
                        ok = response.status_code == 200
                        return (
                            "valid",
                            text_of(path, body, response) if ok else response.status_code,
                            expected[index],
                        )
                if kind == 5:  # cancelled after the first token
                    body = {
                        "model": NAME,
                        "prompt": TOPICS[job % 6],
                        "max_tokens": 400,
                        "stream": True,
                        "logit_bias": endless,
                    }
                    with c.stream("POST", "/v1/completions", json=body) as response:
                        for line in response.iter_lines():
                            if '"text":"' in line and '"text":""' not in line:
                                break
                    return "cancelled", response.status_code, 200
                path, content, status = MALFORMED[job % len(MALFORMED)]
                response = c.post(
                    path, content=content, headers={"content-type": "application/json"}
                )
                shape = response.json()
                assert ("error" in shape) and ("type" in shape) == (path == "/v1/messages")
                return "malformed", response.status_code, status

        start = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(run, range(64)))
        elapsed = time.perf_counter() - start
        for kind, got, want in results:
            assert got == want, kind
        counts = {k: sum(r[0] == k for r in results) for k in ("valid", "cancelled", "malformed")}
        assert counts == {"valid": 40, "cancelled": 8, "malformed": 16}
        assert client.get("/health").json() == {"status": "ok"}
        path, body = valid[0]
        assert text_of(path, body, client.post(path, json=body)) == expected[0]
        time.sleep(1.0)
        after = rss_bytes(process.pid)
        log = process.log_path.read_text()
        print(
            f"64 requests in {elapsed:.1f} s; RSS idle {idle / 2**20:.0f} MiB, after {after / 2**20:.0f} MiB"
        )
        assert log.count("finish=cancelled") == 8
        assert after <= 1.1 * idle

        # SIGTERM: the open stream ends with a final event, the process exits with status 0.
        body = {"model": NAME, "prompt": "the quick", "max_tokens": 900, "stream": True,
                "logit_bias": endless}  # fmt: skip
        lines = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                lines.append(line)
                if len(lines) == 4:
                    process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    final = json.loads(data[-2][6:])
    assert final["error"]["type"] == "server_error" and "shutting down" in final["error"]["message"]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")
