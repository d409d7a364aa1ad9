"""`python -m gemma_mlx.server` / `gemma-mlx-server`: serve a model over OpenAI's and Anthropic's
HTTP APIs (mlx-lm's server flags where they fit).

Bad options end with one line on stderr and exit status 2. SIGINT or SIGTERM stop accepting
connections, end the requests in flight with a final event, and exit with status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from gemma_mlx.cache import KV_BITS, kv_quantization, quantize_caches
from gemma_mlx.distributed.serving import PipelineFollower, pipeline_engine
from gemma_mlx.distributed.stage import PipelineError, PipelineModel
from gemma_mlx.errors import GemmaMLXError
from gemma_mlx.machine_memory import physical_memory
from gemma_mlx.media.image import DEFAULT_SOFT_TOKENS, SOFT_TOKEN_BUDGETS
from gemma_mlx.media.untrusted import SourcePolicy
from gemma_mlx.sample import OptionError, check_sampling_options
from gemma_mlx.server.app import DEFAULT_MAX_BODY_BYTES, Routes, create_app
from gemma_mlx.server.engine import Engine, SamplingOptions
from gemma_mlx.server.generation import GenerationSettings
from gemma_mlx.server.media import MediaPolicy
from gemma_mlx.server.prefix_cache import PrefixCache
from gemma_mlx.server.prefix_disk import DiskTier
from gemma_mlx.server.prompts import Defaults, ServedModel
from gemma_mlx.server.scheduler import BatchedEngine

PROG = "gemma-mlx-server"
EXIT_BAD_INPUT = 2
BUILTIN_NAME = "gemma-3-270m"
API_KEY_ENV = "GEMMA_MLX_API_KEY"
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)

log = logging.getLogger("gemma_mlx.server")


def parse_size(text: str) -> int:
    """Bytes from `123`, `512MB`, `2GiB`, `1.5G` (decimal units; `i` for binary ones)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size like 4GB or 512MiB, got {text!r}")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** "_kmgt".index(unit.lower() or "_"))


def default_cache_bytes() -> int:
    """A tenth of the machine's memory: room for a few long conversations beside the model."""
    return physical_memory() // 10


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Serve a Gemma model over OpenAI- and Anthropic-style HTTP.")
    p.add_argument("--model", help="model directory, .gguf file or Hugging Face repo id "
                   "(default: the built-in Gemma 3 270M base model)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (8080)")
    p.add_argument("--served-model-name", action="append", default=[], metavar="NAME",
                   help="a name clients use for the model (repeatable; default: --model as "
                   f"given and its directory name, or {BUILTIN_NAME})")  # fmt: skip
    p.add_argument("--api-key", help=f"require this key (Authorization: Bearer KEY or x-api-key) "
                   f"on every endpoint but /health; also read from ${API_KEY_ENV}")  # fmt: skip
    p.add_argument("--chat-template", help="a chat template (a file, or the template text) "
                   "replacing the model's")  # fmt: skip
    p.add_argument("--chat-template-args", type=json.loads, default={}, metavar="JSON",
                   help='default template arguments, e.g. \'{"enable_thinking": true}\'')  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=512, help="default reply length (512)")
    p.add_argument("--temp", type=float, default=0.0, help="default temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="default top-p (1: off)")
    p.add_argument("--top-k", type=int, default=0, help="default top-k (0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="default min-p (0: off)")
    p.add_argument("--prefill-step-size", type=int, help="prompt tokens per forward pass")
    p.add_argument("--draft-model", metavar="PATH|prompt-lookup|auto",
                   help="speculative decoding for greedy and plain-temperature requests")  # fmt: skip
    p.add_argument("--num-draft", "--num-draft-tokens", default="auto", metavar="N|auto",
                   help="drafts per round (auto: adapt to measured acceptance)")  # fmt: skip
    p.add_argument("--decode-concurrency", type=int, default=16, metavar="N",
                   help="requests generating at once, in one batched pass per step (16)")  # fmt: skip
    p.add_argument("--kv-bits", type=int, choices=KV_BITS,
                   help="store the full-attention layers' keys and values in this many bits "
                   "(default: unquantized)")  # fmt: skip
    p.add_argument("--kv-budget", type=parse_size, metavar="SIZE",
                   help="memory the running requests' KV caches may take, e.g. 4GB; requests "
                   "beyond it wait (default: half the memory beside the weights)")  # fmt: skip
    p.add_argument("--allow-local-media", action="store_true",
                   help="let requests name image and audio files on this machine")  # fmt: skip
    p.add_argument("--allow-remote-media", action="store_true",
                   help="let requests name http(s) image URLs, fetched by the server")  # fmt: skip
    p.add_argument("--max-soft-tokens", type=int, default=DEFAULT_SOFT_TOKENS,
                   choices=SOFT_TOKEN_BUDGETS, metavar="N",
                   help=f"tokens an image takes, one of {SOFT_TOKEN_BUDGETS} "
                   f"({DEFAULT_SOFT_TOKENS})")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests that may wait beyond those; more get 429 (64)")  # fmt: skip
    p.add_argument("--prompt-cache-bytes", type=parse_size, metavar="SIZE",
                   help="prefix cache budget, e.g. 2GB; 0 turns it off (default: a tenth of "
                   "the machine's memory)")  # fmt: skip
    p.add_argument("--prompt-cache-dir", metavar="DIR",
                   help="also keep prefix-cache snapshots in files here: they outlive memory "
                   "and restarts (files of other models are ignored)")  # fmt: skip
    p.add_argument("--prompt-cache-disk-bytes", type=parse_size, metavar="SIZE",
                   help="disk budget of --prompt-cache-dir, least recently used files removed "
                   "first (default: a quarter of the disk's free space)")  # fmt: skip
    p.add_argument("--max-body-bytes", type=parse_size, default=DEFAULT_MAX_BODY_BYTES,
                   metavar="SIZE", help="larger request bodies get 413 (8MiB)")  # fmt: skip
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])  # fmt: skip
    return p


def check_options(args: argparse.Namespace) -> None:
    """Reject bad values before the (slow) model load."""
    check_sampling_options(args.temp, args.top_k, args.top_p, args.min_p)
    for name in ("max_tokens", "decode_concurrency", "port"):
        if getattr(args, name) < 1:
            raise OptionError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_queue < 0:
        raise OptionError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.prefill_step_size is not None and args.prefill_step_size < 1:
        raise OptionError(f"--prefill-step-size must be >= 1, got {args.prefill_step_size}")
    if not isinstance(args.chat_template_args, dict):
        raise OptionError("--chat-template-args must be a JSON object")
    if args.num_draft != "auto" and not str(args.num_draft).isdigit():
        raise OptionError(f"--num-draft must be a number or 'auto', got {args.num_draft!r}")


def model_names(args: argparse.Namespace) -> tuple[str, ...]:
    if args.served_model_name:
        return tuple(dict.fromkeys(args.served_model_name))
    if args.model is None:
        return (BUILTIN_NAME,)
    return tuple(dict.fromkeys([args.model, Path(args.model).name]))


def chat_template(value: str) -> str:
    """--chat-template: a file's text, or the template itself (anything with a Jinja tag)."""
    if "{{" in value or "{%" in value:
        return value
    return Path(value).read_text(encoding="utf-8")


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    from gemma_mlx.hub import load as load_model
    from gemma_mlx.hub import resolve_model

    path = resolve_model(args.model)
    model, tokenizer = load_model(path)
    model.path = path  # where --draft-model auto looks for an assistant
    return model, tokenizer


def build(
    args: argparse.Namespace, model: Any, tokenizer: Any
) -> tuple[ASGIApp, Routes, BatchedEngine]:
    """(app, routes, engine) for a loaded model and the parsed options."""
    if args.chat_template:
        tokenizer = dataclasses.replace(tokenizer, chat_template=chat_template(args.chat_template))
    budget = default_cache_bytes() if args.prompt_cache_bytes is None else args.prompt_cache_bytes
    num_draft = args.num_draft if args.num_draft == "auto" else int(args.num_draft)
    quantization = kv_quantization(args.kv_bits)

    def make_cache() -> list:  # every request's caches, in the prefix cache too
        return quantize_caches(model.make_cache(), quantization)

    # under mlx.launch: rank 0 serves one request at a time, the other ranks follow it
    engine_class = pipeline_engine if isinstance(model, PipelineModel) else BatchedEngine
    engine = engine_class(
        model,
        tokenizer,
        PrefixCache(make_cache, budget, prefix_disk(args, model, make_cache)),
        GenerationSettings(
            args.prefill_step_size,
            args.draft_model,
            num_draft,
            kv_budget=args.kv_budget,
            max_soft_tokens=args.max_soft_tokens,
        ),
        max_batch=args.decode_concurrency,
        max_queue=args.max_queue,
    )
    sampling = SamplingOptions(args.temp, args.top_p, args.top_k, args.min_p)
    defaults = Defaults(args.max_tokens, sampling, args.chat_template_args)
    media = MediaPolicy(getattr(model, "media_args", None),
                        SourcePolicy(args.allow_local_media, args.allow_remote_media),
                        args.max_soft_tokens)  # fmt: skip
    served = ServedModel(model_names(args), tokenizer, engine.context_length, defaults, media)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app, routes = create_app(engine, served, api_key, args.max_body_bytes)
    return app, routes, engine


def prefix_disk(
    args: argparse.Namespace, model: Any, make_cache: Callable[[], list]
) -> DiskTier | None:
    """The prefix cache's disk tier of --prompt-cache-dir, if given."""
    if args.prompt_cache_dir is None:
        return None
    directory = Path(args.prompt_cache_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OptionError(f"--prompt-cache-dir {directory}: {e.strerror or e}") from e
    budget = args.prompt_cache_disk_bytes
    if budget is None:
        budget = shutil.disk_usage(directory).free // 4
    return DiskTier(directory, budget, model, make_cache)


class GracefulServer(uvicorn.Server):
    """uvicorn's server, except that the first SIGINT/SIGTERM first calls `on_exit` on the event
    loop (the engine ends every stream with a final event), and the process then exits normally
    instead of re-raising the signal. A second SIGINT/SIGTERM stops at once."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self.on_exit = on_exit
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.should_exit:
            self.force_exit = True
            return
        self.should_exit = True
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.on_exit)


def make_server(
    app: ASGIApp, routes: Routes, engine: Engine, log_level: str = "info", **config: Any
) -> GracefulServer:
    """The HTTP server for an app from `build` (`config`: uvicorn's, e.g. host and port)."""

    def stop() -> None:
        routes.closing = True
        engine.shutdown()

    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                            log_level=log_level.lower(), timeout_graceful_shutdown=10, **config)  # fmt: skip
    return GracefulServer(config, stop)


def serve(
    server: GracefulServer, engine: Engine, sockets: list[socket.socket] | None = None
) -> None:
    """Run until SIGINT/SIGTERM (or `server.handle_exit`), then close the engine."""
    try:
        server.run(sockets=sockets)
    finally:
        server.on_exit()
        engine.close()


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    try:
        check_options(args)
        if args.host not in LOOPBACK and not (args.api_key or os.environ.get(API_KEY_ENV)):
            print(
                f"{PROG}: warning: listening on {args.host} without --api-key: anyone who can "
                "reach this machine can use the model",
                file=sys.stderr,
            )
        start = time.perf_counter()
        model, tokenizer = load(args)
        app, routes, engine = build(args, model, tokenizer)
        if isinstance(engine, PipelineFollower):  # a rank > 0 of a pipeline: no HTTP
            return engine.follow()
    except (GemmaMLXError, OSError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    log.info(
        "serving %s on http://%s:%d (loaded in %.1f s)", ", ".join(model_names(args)),
        args.host, args.port, time.perf_counter() - start,
    )  # fmt: skip
    server = make_server(app, routes, engine, args.log_level, host=args.host, port=args.port)
    try:
        serve(server, engine)
    except PipelineError as e:  # a rank of the pipeline was lost: the server stopped
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `gemma-mlx-server` console script and `python -m gemma_mlx.server`."""
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
