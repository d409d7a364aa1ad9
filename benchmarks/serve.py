"""Serving speed: gemma_mlx's server against mlx-lm's, same weights, same run.

    python -m benchmarks.serve [--model M] [--vs mlx-lm] [--vs mlx-lm+route]
                               [--clients 1,4,16] [--max-tokens 32] [--agent-turns 8]

Each server runs alone as a subprocess (`python -m gemma_mlx.server`, `mlx_lm.server`) on the
same model directory (default: the built-in Gemma 3 270M's converted directory; when that keeps
Q6_K blocks mlx-lm cannot load, the GGUF converted again with `requant_bits=8` for both), one
after the other, and gets the same requests: streamed `/v1/completions` (the built-in model is a base model)
from 1, 4 and 16 concurrent clients, each client sending as many requests as the largest client
count divided by its own count (16 requests per scenario at the defaults), distinct text prompts;
then an agent workload: one conversation of `--agent-turns` turns, each request re-sending the
whole history (the previous prompt, the reply, a new message). Measured per scenario: time to
first token (first streamed text) and aggregate generated tokens per second (all completion
tokens over the scenario's wall time); for the agent, prompt and cached tokens per turn as each
server reports them.

On the CPU backend both servers compute in float32 with OpenBLAS: mlx-lm's model gets our
loader's treatment (`benchmarks.engines.MlxLm` does the same), its products run as OpenBLAS sgemm
(`mlx-lm`) or through our few-row routing (`mlx-lm+route`). Both servers batch concurrent
requests into one forward pass per step (ours: `gemma_mlx.batching.BatchScheduler`). Results append to `benchmarks/results/serve-<machine>.jsonl` and are written as
`serve-<machine>.md`; `python -m benchmarks.report` adds them to the report.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks import store
from gemma_mlx.errors import GemmaMLXError
from gemma_mlx.outputs import write_file_atomically

SERVE = "serve"  # the "benchmark" field of these records
SCHEMA = 1
EXIT_BAD_INPUT = 2
PEERS = ("mlx-lm", "mlx-lm+route")
TEXT = Path(__file__).parent / "prompt.txt"
ROOT = Path(__file__).resolve().parents[1]


class ServeBenchmarkError(GemmaMLXError):
    pass


@dataclass(frozen=True)
class Server:
    name: str
    command: list[str]
    env: dict[str, str]
    description: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def servers(
    model_dir: Path, peers: Sequence[str], max_tokens: int, ports: list[int]
) -> list[Server]:
    """Our server, then each peer, on `ports` (one each)."""
    import mlx_lm

    from benchmarks.engines import package_version

    ours = Server(
        "gemma_mlx",
        [sys.executable, "-m", "gemma_mlx.server", "--model", str(model_dir), "--port", str(ports[0]),
         "--max-tokens", str(max_tokens), "--decode-concurrency", "16", "--log-level", "WARNING"],
        {},
        "python -m gemma_mlx.server: continuous batching (gemma_mlx.batching), one forward pass "
        "over every running request per step",
    )  # fmt: skip
    out = [ours]
    for peer, port in zip(peers, ports[1:], strict=True):
        routed = peer.endswith("+route")
        out.append(
            Server(
                peer,
                [sys.executable, "-m", "benchmarks.serve", "--run-mlx-lm-server", "--model",
                 str(model_dir), "--port", str(port), "--max-tokens", str(max_tokens)],
                {} if routed else {"GEMMA_MLX_ROUTE": "off"},
                f"mlx_lm.server {package_version('mlx-lm')} ({mlx_lm.__name__}): continuous "
                "batching of concurrent requests; weights given our loader's treatment; "
                + ("few-row products routed (ours)" if routed else "products as OpenBLAS sgemm"),
            )
        )  # fmt: skip
    return out


def run_mlx_lm_server(model: str, port: int, max_tokens: int) -> None:
    """`mlx_lm.server` on `model`, its weights given our loader's treatment (on the CPU: dense
    float32) so that both servers multiply the same numbers. Runs in its own process."""
    import gemma_mlx  # noqa: F401  (OpenBLAS under MLX, as for our server)

    # isort: split
    import mlx.core as mx
    import mlx_lm.server as mlx_lm_server

    from gemma_mlx.loading import dequantize_modules

    original = mlx_lm_server.load

    def load(*args: Any, **kwargs: Any):
        model, tokenizer, *rest = original(*args, **kwargs)
        if mx.default_device() == mx.cpu:
            dequantize_modules(model, mx.float32)
            model.set_dtype(mx.float32)
        mx.eval(model.parameters())
        return (model, tokenizer, *rest)

    mlx_lm_server.load = load
    sys.argv = ["mlx_lm.server", "--model", model, "--port", str(port), "--max-tokens",
                str(max_tokens), "--log-level", "WARNING"]  # fmt: skip
    mlx_lm_server.main()


# Quantization modes `mlx_lm.load` knows; ours add e.g. `gguf_q6_k` (a GGUF's Q6_K blocks, kept
# exactly by the default conversion).
MLX_LM_MODES = {"affine", "mxfp4", "nvfp4", "mxfp8"}


def mlx_lm_loads(model_dir: Path) -> bool:
    """Whether every weight of a converted directory is stored in a mode mlx-lm can load."""
    quantization = json.loads((model_dir / "config.json").read_text()).get("quantization") or {}
    entries = [quantization, *(v for v in quantization.values() if isinstance(v, dict))]
    return {e.get("mode", "affine") for e in entries} <= MLX_LM_MODES


def served_directory(model: str | None, peers: Sequence[str], workdir: Path) -> Path:
    """The directory every server loads. Against a peer, when the model's own conversion keeps
    weights mlx-lm cannot load (a GGUF's Q6_K blocks), the GGUF converted again with Q6_K
    requantized to 8 bits (`requant_bits=8`, the mlx-lm-compatible conversion) into `workdir`:
    both servers then load the same weights."""
    from gemma_mlx.convert import convert

    from gemma_mlx.builtin import builtin_gguf
    from gemma_mlx.hub import resolve_model

    model_dir = resolve_model(model)
    if not peers or mlx_lm_loads(model_dir):
        return model_dir
    if model is not None and not model.endswith(".gguf"):
        raise ServeBenchmarkError(
            f"{model}: mlx-lm cannot load this directory's quantization; give --model the .gguf "
            "it came from, or a directory converted with --requant-bits 8"
        )
    gguf = builtin_gguf() if model is None else Path(model)
    convert(gguf, workdir / "requant8", progress=False, requant_bits=8)
    return workdir / "requant8"


@contextmanager
def running(server: Server, url: str, timeout: float = 600) -> Iterator[subprocess.Popen]:
    """`server` started as a subprocess, once `url`/health answers; stopped with SIGTERM. Its
    output goes to a file (`process.log_path`), so a chatty server never blocks on a pipe."""
    import httpx

    with tempfile.NamedTemporaryFile("w+", prefix=f"serve-{server.name}-", suffix=".log") as log:
        process = subprocess.Popen(
            server.command, cwd=ROOT, env={**os.environ, **server.env}, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        process.log_path = Path(log.name)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    output = process.log_path.read_text()[-2000:]
                    raise ServeBenchmarkError(f"{server.name} exited: {output}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise ServeBenchmarkError(f"{server.name} did not start within {timeout} s")
                time.sleep(0.5)
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass
class Result:
    ttft: float
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int
    text: str


def complete(url: str, model: str, prompt: str, max_tokens: int) -> Result:
    """One streamed completion: time to the first text, and the usage the server reports."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    ttft, text, usage = None, [], {}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=None) as response:
        if response.status_code != 200:
            raise ServeBenchmarkError(f"{url}: HTTP {response.status_code}: {response.read()!r}")
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    text.append(choice["text"])
            usage = chunk.get("usage") or usage
    details = usage.get("prompt_tokens_details") or {}
    return Result(
        ttft if ttft is not None else time.perf_counter() - start,
        usage.get("completion_tokens", len(text)),
        usage.get("prompt_tokens", 0),
        details.get("cached_tokens", 0),
        "".join(text),
    )


def prompts(count: int, first: int = 0, words: int = 60) -> list[str]:
    """Text prompts `first .. first + count - 1`: slices of benchmarks/prompt.txt that start at
    different words, so that no two share a prefix for a prompt cache to reuse."""
    text = TEXT.read_text().split()
    span = max(1, len(text) - words)
    return [" ".join(text[(i * 13) % span :][:words]) for i in range(first, first + count)]


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def concurrent(url: str, model: str, clients: int, texts: list[str], max_tokens: int):
    """`clients` threads sharing the prompts `texts`: (results, wall seconds)."""
    start = time.perf_counter()

    def client(i: int) -> list[Result]:
        return [complete(url, model, t, max_tokens) for t in texts[i::clients]]

    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    return results, time.perf_counter() - start


def agent(url: str, model: str, messages: list[str], max_tokens: int):
    """One conversation, each request re-sending the history: (results, wall seconds)."""
    history, results = "", []
    start = time.perf_counter()
    for message in messages:
        history += f"\n\nUser: {message}\nAssistant:"
        result = complete(url, model, history, max_tokens)
        history += result.text
        results.append(result)
    return results, time.perf_counter() - start


def record(base: dict[str, Any], scenario: str, clients: int, results: list[Result], wall: float):
    tokens = sum(r.completion_tokens for r in results)
    return base | {
        "scenario": scenario,
        "clients": clients,
        "requests": len(results),
        "ttft_s": _spread([r.ttft for r in results]),
        "completion_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "prompt_tokens": [r.prompt_tokens for r in results],
        "cached_tokens": [r.cached_tokens for r in results],
    }


def markdown(records: list[dict[str, Any]]) -> list[str]:
    """The serving table (newest record of each machine, model, engine and scenario); no lines
    without records."""
    if not records:
        return []
    newest: dict[tuple, dict[str, Any]] = {}
    for r in records:
        key = (r["machine"]["label"], r["model"]["label"], r["engine"]["name"], r["scenario"])
        if key not in newest or r["time"] >= newest[key]["time"]:
            newest[key] = r
    lines = [
        "## Serving",
        "",
        "`python -m benchmarks.serve --vs mlx-lm`: each server alone, same weights, streamed "
        "completions at temperature 0. TTFT: time to the first streamed text (median, min-max). "
        "tok/s: all generated tokens over the scenario's wall time. Agent: one conversation, "
        "each turn re-sending the history; prompt tokens processed = prompt - cached, summed.",
        "",
        "| machine | model | engine | scenario | requests | TTFT s | tok/s | prompt tokens "
        "processed / sent |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = {
        key: (*key[:3], r["scenario"].startswith("agent"), r["clients"])
        for key, r in newest.items()
    }
    for key in sorted(newest, key=order.__getitem__):  # scenarios by client count, agent last
        r = newest[key]
        ttft = r["ttft_s"]
        sent = sum(r["prompt_tokens"])
        processed = sent - sum(r["cached_tokens"])
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {r['requests']} "
            f"| {ttft['median']:.2f} ({ttft['min']:.2f}-{ttft['max']:.2f}) "
            f"| {r['tokens_per_s']:.2f} | {processed} / {sent} |"
        )
    engines = sorted({(r["engine"]["name"], r["engine"]["runs"]) for r in newest.values()})
    lines += ["", *[f"- **{name}**: {runs}" for name, runs in engines], ""]
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.serve", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", help="model directory or .gguf (default: the built-in 270M)")
    p.add_argument("--vs", action="append", default=[], choices=PEERS, help="peer server(s)")
    p.add_argument("--clients", default="1,4,16", help="concurrent clients per scenario")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per reply")
    p.add_argument("--agent-turns", type=int, default=8, help="turns of the agent workload")
    p.add_argument("--results-dir", type=Path, default=store.RESULTS_DIR)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--run-mlx-lm-server", action="store_true", help=argparse.SUPPRESS)
    return p


def benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every server up at once (each on its own port, idle while another is measured), scenario
    by scenario in turn, so that load from other processes falls on all of them alike."""
    from benchmarks.machine import describe
    from benchmarks.run import git_commit

    clients = [int(c) for c in args.clients.split(",")]
    if not clients or min(clients) < 1 or args.max_tokens < 1 or args.agent_turns < 1:
        raise ServeBenchmarkError("--clients, --max-tokens and --agent-turns must be >= 1")
    machine = describe(measure_bandwidth=False)
    ports = [free_port() for _ in range(1 + len(args.vs))]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    scenarios = [(f"{n} clients", n) for n in clients] + [(f"agent {args.agent_turns} turns", 1)]
    records = []
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serve-")))
        model_dir = served_directory(args.model, args.vs, workdir)
        model = str(model_dir)
        label = Path(args.model).name if args.model else "builtin-270m"
        if model_dir.parent == workdir:
            label += " (Q6_K as 8-bit)"
        base = {
            "benchmark": SERVE, "schema": SCHEMA,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "machine": machine.as_dict(),
            "model": {"label": label, "path": model}, "max_tokens": args.max_tokens,
        }  # fmt: skip
        started = servers(model_dir, args.vs, args.max_tokens, ports)
        for server, url in zip(started, urls, strict=True):
            stack.enter_context(running(server, url))
            complete(url, model, prompts(1, first=400)[0], 4)  # warm-up
        for k, (scenario, n) in enumerate(scenarios):
            texts = prompts(max(clients), first=k * max(clients))
            for server, url in zip(started, urls, strict=True):
                if scenario.startswith("agent"):
                    turns = prompts(args.agent_turns, first=k * max(clients), words=24)
                    results, wall = agent(url, model, turns, args.max_tokens)
                else:
                    results, wall = concurrent(url, model, n, texts, args.max_tokens)
                engine = {"engine": {"name": server.name, "runs": server.description}}
                records.append(record(base | engine, scenario, n, results, wall))
                store.append(results_file(args.results_dir, machine.label), records[-1:])
                print(
                    f"{server.name}: {scenario}: {records[-1]['tokens_per_s']:.2f} tok/s",
                    flush=True,
                )
    return records


def results_file(results_dir: Path, label: str) -> Path:
    """Where a machine's serving records go; each is appended as soon as it is measured."""
    return results_dir / f"serve-{label}.jsonl"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.run_mlx_lm_server:
        run_mlx_lm_server(args.model, args.port, args.max_tokens)
        return 0
    try:
        records = benchmark(args)
    except GemmaMLXError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    label = records[0]["machine"]["label"]
    everything = [r for r in store.read_all(args.results_dir) if r.get("benchmark") == SERVE]
    mine = [r for r in everything if r["machine"]["label"] == label]
    text = "\n".join(["# Serving benchmark", "", *markdown(mine)])
    target = args.results_dir / f"serve-{label}.md"
    write_file_atomically(target, lambda path: path.write_text(text), force=True)
    print("\n".join(markdown(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
