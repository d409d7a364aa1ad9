"""The server on a pipeline (`gemma_mlx.distributed.serving`): two `python -m gemma_mlx.server`
ranks on 127.0.0.1 with MLX's ring backend (what `mlx.launch` starts), driven by the official
openai client against rank 0. Replies equal `gemma_mlx.generate` in one process; a cancelled
stream stops every rank at the same step (the next request is still answered right, which it
could not be if the ranks had fallen out of step); SIGTERM on rank 0 ends every rank with
status 0; a killed rank ends the server with an error."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from test_distributed import free_ports
from tiny_chat_model import write_model

import gemma_mlx

NAME = "tiny"
MESSAGES = [{"role": "user", "content": "the quick brown fox"}]
PENALTY = {"repetition_penalty": 3.0}  # varied greedy text from a random tiny model
PROMPT = "hello world, this is"
TIMEOUT = 6.0  # GEMMA_MLX_PIPELINE_TIMEOUT: rank 0's idle heartbeat every 1.5 s


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("pipeline-server") / "m")


def launch(model_dir: Path, tmp_path: Path) -> tuple[list[subprocess.Popen], str, list[Path]]:
    """Two server ranks (rank 0 on a free port); their processes, rank 0's URL, their logs."""
    ring, port = free_ports(2), free_ports(1)[0]
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ring]))
    env = os.environ | {"MLX_HOSTFILE": str(hostfile), "GEMMA_MLX_PIPELINE_TIMEOUT": str(TIMEOUT)}
    command = [sys.executable, "-m", "gemma_mlx.server", "--model", str(model_dir),
               "--served-model-name", NAME, "--port", str(port)]  # fmt: skip
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    processes = [
        subprocess.Popen(
            command, env=env | {"MLX_RANK": str(r)}, stdout=log.open("w"), stderr=subprocess.STDOUT
        )
        for r, log in enumerate(logs)
    ]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in processes), [log.read_text() for log in logs]
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return processes, url, logs
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("the pipelined server did not start")


def stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_server_on_two_ranks(model_dir, tmp_path):
    model, tokenizer = gemma_mlx.load(str(model_dir))
    chat = gemma_mlx.generate(model, tokenizer, MESSAGES, max_tokens=16, temp=0.0, **PENALTY)
    completion = gemma_mlx.generate(model, tokenizer, PROMPT, max_tokens=12, temp=0.0)
    assert len(set(chat)) > 8, "precondition: a varied reply"
    never_stop = {str(i): -100 for i in tokenizer.eos_token_ids}
    del model
    processes, url, logs = launch(model_dir, tmp_path)
    try:
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        reply = oa.chat.completions.create(
            model=NAME, messages=MESSAGES, max_tokens=16, temperature=0, extra_body=PENALTY
        )
        assert reply.choices[0].message.content == chat
        # a stream cancelled after its first text, while the ranks are generating
        body = {"model": NAME, "prompt": PROMPT, "max_tokens": 500, "stream": True,
                "logit_bias": never_stop}  # fmt: skip
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if '"text":"' in line and '"text":""' not in line:
                    break
        time.sleep(TIMEOUT / 4)  # a heartbeat while idle
        reply = oa.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0)
        assert reply.choices[0].text == completion
        assert reply.usage.completion_tokens == 12
        processes[0].send_signal(signal.SIGTERM)  # shutdown: rank 0 tells rank 1
        codes = [p.wait(timeout=30) for p in processes]
        assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]
        # every rank ran the same generations and stopped the cancelled one at the same step
        ends = [re.findall(r"generation (.*) after (\d+) tokens", log.read_text()) for log in logs]
        assert ends[0] == ends[1] and len(ends[0]) == 3, ends
        assert ends[0][1][0] == "stopped by rank 0" and int(ends[0][1][1]) < 500, ends
    finally:
        stop(processes)


def test_a_lost_rank_ends_the_server(model_dir, tmp_path):
    processes, _, logs = launch(model_dir, tmp_path)
    try:
        processes[1].kill()
        started = time.monotonic()
        code = processes[0].wait(timeout=30)
        output = logs[0].read_text()
        assert code == 2 and "another rank ended" in output, output[-3000:]
        assert time.monotonic() - started < TIMEOUT + 5  # a heartbeat finds it, or the watchdog
    finally:
        stop(processes)
