"""Helpers for the server tests: the real server on a free loopback port (on a thread of this
process, or as a subprocess), a model whose greedy reply follows a script, and a Gemma 4-style
chat template with tools for the tiny tokenizer."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from benchmarks.serve import Server, free_port, running
from gemma_mlx.server.__main__ import build, build_parser, make_server, serve

ROOT = Path(__file__).resolve().parents[1]

# Gemma 4's conversation format with tools, written for these tests: tools declared in the system
# turn, calls as <|tool_call>call:NAME{key:<|"|>value<|"|>}<tool_call|>, results as tool_response
# blocks in the next turn, thinking switched on by <|think|> in the system turn.
TOOLS_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% if enable_thinking or system or tools %}{{ '<|turn>system\n' }}"
    "{% if enable_thinking %}{{ '<|think|>\n' }}{% endif %}{{ system }}"
    "{% for tool in tools or [] %}{{ '<|tool>declaration:' + tool['function']['name'] + '{description:<|\"|>'"
    " + tool['function']['description'] + '<|\"|>}<tool|>' }}{% endfor %}"
    "{{ '<turn|>\n' }}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'tool' %}"
    "{{ '<|turn>user\n<|tool_response>response:' + message['name'] + '{value:<|\"|>' + message['content']"
    " + '<|\"|>}<tool_response|><turn|>\n' }}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<|turn>' + role + '\n' }}"
    "{% for call in message.get('tool_calls') or [] %}{{ '<|tool_call>call:' + call['function']['name'] + '{' }}"
    "{% for key, value in call['function']['arguments'] | dictsort %}"
    "{{ key + ':<|\"|>' + value + '<|\"|>' }}{{ ',' if not loop.last }}{% endfor %}"
    "{{ '}<tool_call|>' }}{% endfor %}"
    "{{ message['content'] | trim }}{{ '<turn|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\n' }}{% endif %}"
)


class ScriptedModel:
    """A model whose greedy choice at the positions `script` names is the scripted token (its
    logits there get a large bonus); elsewhere it is the wrapped model. The script is keyed by
    absolute position, so it survives prefix-cache hits that skip the prompt's start."""

    def __init__(self, inner: Any, script: dict[int, int] | None = None):
        self.inner = inner
        self.args = inner.args
        self.model = inner.model  # what memory estimates read (the embedding's dtype)
        self.script = script or {}

    def make_cache(self, max_trim: int = 32) -> list:
        return self.inner.make_cache(max_trim=max_trim)

    def parameters(self):
        return self.inner.parameters()

    def __call__(self, inputs: mx.array, cache=None, logits_to_keep: int | None = None):
        start = cache[0].offset if cache else 0
        logits = self.inner(inputs, cache=cache, logits_to_keep=logits_to_keep)
        return logits + self._bonus([(start + inputs.shape[1], logits.shape[1])], logits)[None]

    def batched(self, inputs: mx.array, segments: list, return_hidden: bool = False):
        """`gemma4.Model.batched` with the script's bonus on each segment's kept rows."""
        ends = [(s.cache[0].offset + s.length, s.keep) for s in segments]
        logits, hidden = self.inner.batched(inputs, segments, return_hidden=True)
        logits = logits + self._bonus(ends, logits)
        return (logits, hidden) if return_hidden else logits

    def _bonus(self, ends: list[tuple[int, int]], logits: mx.array) -> mx.array:
        """Rows of +1e4 on the scripted token of each position: `ends` holds (position after
        the last fed token, rows kept) per sequence, their rows in order in `logits`."""
        bonus = np.zeros(logits.shape[-2:], np.float32)
        row = 0
        for end, rows in ends:
            for r in range(rows):
                token = self.script.get(end - rows + r + 1)
                if token is not None:
                    bonus[row, token] = 1e4
                row += 1
        return mx.array(bonus)

    def follow(self, prompt: Sequence[int], reply: Sequence[int]) -> None:
        """Make the greedy reply to `prompt` start with `reply`."""
        self.script = {len(prompt) + i: t for i, t in enumerate(reply)}


@dataclass
class Running:
    url: str
    server: Any
    engine: Any
    routes: Any


@contextmanager
def serving(model: Any, tokenizer: Any, *flags: str) -> Iterator[Running]:
    """The server (command-line `flags`) on a free loopback port, on a thread of this process;
    stopped the way SIGTERM stops it."""
    args = build_parser().parse_args(list(flags))
    app, routes, engine = build(args, model, tokenizer)
    server = make_server(app, routes, engine, "warning")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    thread = threading.Thread(target=serve, args=(server, engine, [sock]), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield Running(f"http://127.0.0.1:{port}", server, engine, routes)
    finally:
        server.handle_exit(signal.SIGTERM, None)
        thread.join(60)


@contextmanager
def server_process(*flags: str, timeout: float = 180) -> Iterator[tuple[subprocess.Popen, str]]:
    """`python -m gemma_mlx.server` in a subprocess on a free port: (process, base url); its
    output in `process.log_path`."""
    port = free_port()
    command = [sys.executable, "-m", "gemma_mlx.server", "--port", str(port), *flags]
    server = Server("gemma_mlx", command, {"PYTHONUNBUFFERED": "1"}, "")
    url = f"http://127.0.0.1:{port}"
    with running(server, url, timeout) as process:
        yield process, url


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")
