"""`python -m gemma_mlx.generate` / `gemma-mlx`: generate text, or chat (`--chat`), in a terminal.

Generated text goes to stdout as it is produced (rich colour only on a terminal, plain text when
piped); statistics go to stderr in mlx-lm's wording.

One error boundary (`run`): every failure ends with one line on stderr. Bad input and file
problems (a missing or damaged model, a full disk: the package's errors and OSError) name the
file, field or option and exit with status 2; anything else is a bug: one line with a hint to rerun
with --verbose, which prints the traceback, and exit status 1. Options are checked, and --image and
--audio files read and decoded, before the model is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, TextIO

import mlx.core as mx

from gemma_mlx import _platform
from gemma_mlx.cache import (
    DEFAULT_KV_GROUP_SIZE,
    DEFAULT_QUANTIZED_KV_START,
    KV_BITS,
    KV_GROUP_SIZES,
)
from gemma_mlx.chat import ChatSession, user_content
from gemma_mlx.drafters import assistant_beside, make_drafter
from gemma_mlx.errors import GemmaMLXError, OptionError
from gemma_mlx.generate import print_stats, stream_generate
from gemma_mlx.hub import load, resolve_model
from gemma_mlx.loading import load_model as load_model_directory
from gemma_mlx.media.audio import SAMPLING_RATE, read_audio
from gemma_mlx.media.image import DEFAULT_SOFT_TOKENS, SOFT_TOKEN_BUDGETS, open_image
from gemma_mlx.media.video import read_video
from gemma_mlx.options import check_number, check_seed, check_text
from gemma_mlx.outputs import check_target
from gemma_mlx.prompt_cache import cache_prompt, load_prompt_cache, save_prompt_cache
from gemma_mlx.sample import check_sampling_options
from gemma_mlx.tokenizer import ANSWER, THOUGHT, TOOL_CALL

PROG = "gemma-mlx"
EXIT_BAD_INPUT = 2
EXIT_INTERNAL_ERROR = 1
# Failures a user can act on; their messages name the file, field or option.
EXPECTED_ERRORS = (GemmaMLXError, OSError)
# --draft-model values that are not paths.
DRAFT_KEYWORDS = ("prompt-lookup", "auto")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Generate text with a Gemma model on MLX.")
    p.add_argument(
        "--model",
        help="model directory, .gguf file or Hugging Face repo id "
        "(default: the built-in Gemma 3 270M base model)",
    )
    p.add_argument(
        "--mmproj",
        metavar="MMPROJ.gguf",
        help="llama.cpp's vision/audio towers file of a Gemma 4 .gguf --model (converted with it)",
    )
    p.add_argument("-p", "--prompt", help="the prompt; '-' reads it from stdin")
    p.add_argument("-m", "--max-tokens", type=int, default=100, help="tokens to generate (100)")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="min probability relative to the top")
    p.add_argument("--repetition-penalty", type=float, help="penalty for repeated tokens (>1)")
    p.add_argument(
        "--repetition-context-size", type=int, default=20, help="tokens the penalty looks back"
    )
    p.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--system", help="system prompt (implies the chat template)")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat")
    template = p.add_mutually_exclusive_group()
    template.add_argument(
        "--no-chat-template", action="store_true", help="send the prompt as plain text"
    )
    template.add_argument(
        "--use-chat-template",
        action="store_true",
        help="wrap the prompt in the chat template (default only for instruction-tuned models)",
    )
    p.add_argument("--think", action="store_true", help="let the model think first (Gemma 4)")
    p.add_argument(
        "--thinking",
        choices=("show", "hide"),
        help="show or hide the thinking text (default: show on a terminal, hide when piped)",
    )
    p.add_argument(
        "--prefill-step-size", type=int, help="prompt tokens per forward pass (CPU 512, GPU 2048)"
    )
    p.add_argument(
        "--draft-model",
        metavar="PATH|prompt-lookup|auto",
        help="speculative decoding: a drafter (Gemma 4 assistant or small model) directory, "
        "prompt-lookup, or auto (the assistant beside --model, if any)",
    )
    p.add_argument(
        "--num-draft",
        type=_num_draft,
        default="auto",
        metavar="N|auto",
        help="drafts per round with --draft-model (auto: adapt to measured acceptance and cost)",
    )
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="an image for the prompt (repeatable; Gemma 4 with its vision tower)",
    )
    p.add_argument(
        "--audio",
        action="append",
        default=[],
        metavar="PATH",
        help="an audio clip for the prompt, up to 30 s (repeatable; Gemma 4 E2B, E4B, 12B)",
    )
    p.add_argument(
        "--video",
        action="append",
        default=[],
        metavar="PATH",
        help="a video file for the prompt: 32 sampled frames (repeatable; Gemma 4 vision)",
    )
    p.add_argument(
        "--max-soft-tokens",
        type=int,
        choices=SOFT_TOKEN_BUDGETS,
        default=DEFAULT_SOFT_TOKENS,
        help=f"tokens an image may take (default {DEFAULT_SOFT_TOKENS})",
    )
    p.add_argument(
        "--prompt-cache-file",
        metavar="FILE",
        help="start from a prompt cache (python -m gemma_mlx.cache_prompt); the prompt is plain "
        "text that continues the cached one",
    )
    p.add_argument(
        "--kv-bits",
        type=int,
        choices=KV_BITS,
        help="store the full-attention layers' keys and values in this many bits (less memory "
        "for long contexts; default: unquantized)",
    )
    p.add_argument(
        "--kv-group-size",
        type=int,
        choices=KV_GROUP_SIZES,
        default=DEFAULT_KV_GROUP_SIZE,
        help=f"values per quantization group with --kv-bits (default {DEFAULT_KV_GROUP_SIZE})",
    )
    p.add_argument(
        "--quantized-kv-start",
        type=int,
        default=DEFAULT_QUANTIZED_KV_START,
        metavar="N",
        help="with --kv-bits, keep the first N positions unquantized "
        f"(default {DEFAULT_QUANTIZED_KV_START})",
    )
    add_max_kv_size(p)
    p.add_argument("--verbose", action="store_true", help="also report BLAS, device and loading")
    return p


def _num_draft(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'auto', got {value!r}")
    return int(value)


def check_options(args: argparse.Namespace) -> None:
    """Reject bad option values before the (slow) model load."""
    check_sampling_options(args.temp, args.top_k, args.top_p, args.min_p)
    check_seed(args.seed, "--seed")
    if args.max_tokens < 1:
        raise OptionError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    penalty = args.repetition_penalty
    if penalty is not None and not check_number("--repetition-penalty", penalty) > 0:
        raise OptionError(f"--repetition-penalty must be > 0, got {penalty}")
    if args.repetition_context_size < 1:
        raise OptionError(
            f"--repetition-context-size must be >= 1, got {args.repetition_context_size}"
        )
    if args.prefill_step_size is not None and args.prefill_step_size < 1:
        raise OptionError(f"--prefill-step-size must be >= 1, got {args.prefill_step_size}")
    if args.quantized_kv_start < 0:
        raise OptionError(f"--quantized-kv-start must be >= 0, got {args.quantized_kv_start}")
    check_max_kv_size(args)
    if any(not check_text("--stop", s) for s in args.stop):
        raise OptionError("--stop strings must not be empty")
    if args.chat and args.no_chat_template:
        raise OptionError("--chat needs the chat template; drop --no-chat-template")
    if args.chat and args.video:
        raise OptionError("--video goes with one prompt (-p), not --chat")
    for option, value in (("--prompt", args.prompt), ("--system", args.system)):
        if value is not None:
            check_text(option, value)
    if args.prompt_cache_file is not None:
        check_prompt_cache_use(args)
    draft = args.draft_model
    if draft is not None and draft not in DRAFT_KEYWORDS and not (draft and Path(draft).is_dir()):
        raise OptionError(
            f"--draft-model {draft}: no such model directory (or use prompt-lookup or auto)"
        )


def add_max_kv_size(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-kv-size",
        type=int,
        metavar="N",
        help="full-attention layers keep only their last N positions (bounded memory; the model "
        "no longer sees what lies further back, so long-range recall is lost past N tokens)",
    )


def check_max_kv_size(args: argparse.Namespace) -> None:
    if args.max_kv_size is not None and args.max_kv_size < 1:
        raise OptionError(f"--max-kv-size must be >= 1, got {args.max_kv_size}")


def check_prompt_cache_use(args: argparse.Namespace) -> None:
    """--prompt-cache-file continues a plain-text prompt: no chat, template or media with it."""
    clashing = {
        "--chat": args.chat, "--system": args.system is not None,
        "--use-chat-template": args.use_chat_template, "--image": args.image,
        "--audio": args.audio, "--video": args.video,
    }  # fmt: skip
    for option, given in clashing.items():
        if given:
            raise OptionError(f"--prompt-cache-file continues a plain-text prompt: drop {option}")
    if not Path(args.prompt_cache_file).is_file():
        raise OptionError(f"--prompt-cache-file {args.prompt_cache_file}: no such file")


def read_media(args: argparse.Namespace) -> tuple[list[Any], list[Any]]:
    """The --image and --audio files, decoded (and checked: format, pixel count, length) before
    the model is loaded: (PIL images, (16 kHz samples, 16000) clips)."""
    images = [open_image(path) for path in args.image]
    audio = [(read_audio(path), SAMPLING_RATE) for path in args.audio]
    for path in args.video:  # checked now; decoded again when the prompt is prepared
        read_video(path)
    return images, audio


def read_prompt(args: argparse.Namespace) -> str | None:
    prompt = read_stdin() if args.prompt == "-" else args.prompt
    if prompt is None and not args.chat:
        raise OptionError("no prompt: pass -p TEXT, or -p - to read it from stdin")
    if prompt is not None and not prompt.strip():
        raise OptionError("the prompt is empty")
    return prompt


def read_stdin() -> str:
    """All of stdin, decoded as UTF-8 whatever the locale says."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OptionError(
            f"the prompt on stdin is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset "
            f"{e.start})"
        ) from e


class TextOutput:
    """Streams generated text: rich styles on a terminal, plain text otherwise."""

    STYLES: ClassVar[dict[str, str]] = {THOUGHT: "dim italic", TOOL_CALL: "cyan"}

    def __init__(self, stream: TextIO, show_thinking: bool | None):
        self.stream = stream
        self.tty = stream.isatty()
        self.show_thinking = self.tty if show_thinking is None else show_thinking
        self.console = None
        if self.tty:
            from rich.console import Console

            self.console = Console(file=stream, highlight=False, soft_wrap=True)
        self.channel = ANSWER
        self.at_line_start = True

    def write(self, channel: str, text: str) -> None:
        if not text or (channel == THOUGHT and not self.show_thinking):
            return
        if channel != self.channel and not self.at_line_start:
            self._emit("\n", None)
        self.channel = channel
        self._emit(text, self.STYLES.get(channel))

    def end(self) -> None:
        if not self.at_line_start:
            self._emit("\n", None)
        self.channel = ANSWER

    def _emit(self, text: str, style: str | None) -> None:
        if self.console is not None:
            self.console.print(text, end="", style=style, markup=False)
        else:
            self.stream.write(text)
        self.stream.flush()
        self.at_line_start = text.endswith("\n")


class PromptProgress:
    """A transient progress bar on stderr for prompts long enough to take a while."""

    MIN_TOKENS = 1024  # about 5 s of prefill for the 270M on two CPU cores

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.progress = None
        self.task = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total < self.MIN_TOKENS:
            return
        if self.progress is None and done < total:
            from rich.console import Console
            from rich.progress import Progress

            self.progress = Progress(console=Console(stderr=True), transient=True)
            self.progress.start()
            self.task = self.progress.add_task("Prompt", total=total)
        if self.progress is not None:
            self.progress.update(self.task, completed=done)
            if done >= total:
                self.progress.stop()
                self.progress = None


def generation_options(args: argparse.Namespace, draft: Any) -> dict[str, Any]:
    """`stream_generate` options from the command line; `draft` as `load_draft` resolved it."""
    return {
        "max_tokens": args.max_tokens,
        "temp": args.temp,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "repetition_context_size": args.repetition_context_size,
        "seed": args.seed,
        "stop": args.stop,
        "prefill_step_size": args.prefill_step_size,
        "prompt_progress": PromptProgress(sys.stderr.isatty()),
        "draft": draft,
        "num_draft": args.num_draft,
        "max_soft_tokens": args.max_soft_tokens,
        "kv_bits": args.kv_bits,
        "kv_group_size": args.kv_group_size,
        "quantized_kv_start": args.quantized_kv_start,
        "max_kv_size": args.max_kv_size,
    }


@contextlib.contextmanager
def step(what: str) -> Iterator[None]:
    """Name the step in an OSError that names no file (a full disk, ENOSPC, names none)."""
    try:
        yield
    except OSError as e:
        if isinstance(e, GemmaMLXError) or e.filename is not None:
            raise
        raise GemmaMLXError(f"{what}: {e.strerror or e}") from e


def load_model(args: argparse.Namespace):
    start = time.perf_counter()
    with step(f"preparing the model {args.model or '(built-in)'}"):
        path = resolve_model(args.model, args.mmproj)
    model, tokenizer = load(path, media=bool(args.image or args.audio or args.video))
    model.path = path  # where --draft-model auto looks for an assistant
    if args.verbose:
        print(f"BLAS: {_platform.describe_blas()}", file=sys.stderr)
        print(f"Device: {mx.default_device()}", file=sys.stderr)
        print(f"Model: {path} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return model, tokenizer


def load_draft(args: argparse.Namespace, model) -> Any:
    """--draft-model loaded and checked against the model before generation starts: None,
    "prompt-lookup" or a drafter model ("auto": the assistant beside the model, if any)."""
    draft = args.draft_model
    if draft == "auto":
        draft = assistant_beside(model.path)
    if draft is None or draft == "prompt-lookup":
        return draft
    draft_model = load_model_directory(draft)
    try:
        make_drafter(draft_model, model)
    except ValueError as e:
        if isinstance(e, GemmaMLXError):
            raise
        raise OptionError(f"--draft-model {draft}: {e}") from e
    return draft_model


def uses_chat_template(args: argparse.Namespace, tokenizer) -> bool:
    wanted = args.chat or args.use_chat_template or args.system is not None
    if args.no_chat_template:
        return False
    if tokenizer.chat_template is None:
        if wanted:
            raise OptionError(
                "this model has no chat template (a base model?): drop --chat/--system/"
                "--use-chat-template and give a plain completion prompt"
            )
        return False
    return wanted or tokenizer.instruction_tuned


def run_once(args, model, tokenizer, draft, prompt: str, media, out: TextOutput) -> None:
    images, audio = media
    videos = args.video
    prompt_cache = None
    if args.prompt_cache_file is not None:  # the prompt continues the cached one, as plain text
        prompt_cache = load_prompt_cache(args.prompt_cache_file, model)
    elif uses_chat_template(args, tokenizer):
        messages = [{"role": "system", "content": args.system}] if args.system else []
        content = user_content(prompt, images, audio, videos)
        prompt = [*messages, {"role": "user", "content": content}]
        images, audio, videos = [], [], []  # in the message's content parts
    response = None
    for response in stream_generate(
        model,
        tokenizer,
        prompt,
        chat_template_kwargs={"enable_thinking": True} if args.think else None,
        images=images,
        audio=audio,
        videos=videos,
        prompt_cache=prompt_cache,
        **generation_options(args, draft),
    ):
        out.write(response.channel, response.text)
    out.end()
    if response is not None:
        print_stats(response)


def run_chat(args, model, tokenizer, draft, first: str | None, media, out: TextOutput) -> None:
    """The REPL. A failed turn or /save prints its error and the conversation goes on. --image
    and --audio go with the first message."""
    uses_chat_template(args, tokenizer)
    session = ChatSession(
        model,
        tokenizer,
        system=args.system,
        chat_template_kwargs={"enable_thinking": True} if args.think else None,
        **generation_options(args, draft),
    )
    print("Chat: /reset starts over, /save PATH keeps the session, Ctrl-D quits.", file=sys.stderr)
    message = first
    while True:
        if message is None:
            try:
                message = input(">> ")
            except EOFError:
                print(file=sys.stderr)
                return
            except UnicodeDecodeError:
                report_error(OptionError("that line is not valid UTF-8"), args.verbose)
                continue
        command, _, argument = message.strip().partition(" ")
        if command in ("/quit", "/exit"):
            return
        if command == "/reset":
            session = ChatSession(model, tokenizer, args.system, session.chat_template_kwargs,
                                  **session.options)  # fmt: skip
        elif command == "/save":
            save_session(session, argument.strip(), args.verbose)
        elif message.strip() and chat_turn(session, message, out, args.verbose, *media):
            media = ([], [])  # they went with the first message
        message = None


def save_session(session: ChatSession, path: str, verbose: bool) -> None:
    """/save PATH: any failure, a bug included, is reported and the session is kept."""
    try:
        if not path:
            raise OptionError("/save needs a file name: /save PATH")
        with step(f"saving the session to {path}"):
            session.save(Path(path).expanduser())
        print(f"saved to {path}", file=sys.stderr)
    except Exception as e:
        report_error(e, verbose)


def chat_turn(
    session: ChatSession, message: str, out: TextOutput, verbose: bool, images=(), audio=()
) -> bool:
    """One turn; whether it went into the conversation (False when it failed)."""
    response = None
    try:
        for response in session.stream(message, images, audio):
            out.write(response.channel, response.text)
    except KeyboardInterrupt:
        print(" [interrupted]", file=sys.stderr)
    except GemmaMLXError as e:  # a message the context cannot hold, ...: the session goes on
        out.end()
        report_error(e, verbose)
        return False
    out.end()
    if response is not None and verbose:
        print_stats(response)
    return True


def report_error(error: BaseException, verbose: bool) -> int:
    """Print `error` as one line on stderr; return the exit status it calls for."""
    if isinstance(error, EXPECTED_ERRORS):
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if verbose:
        traceback.print_exception(type(error), error, error.__traceback__)
    hint = "" if verbose else " (rerun with --verbose for the traceback)"
    print(
        f"{PROG}: internal error: {type(error).__name__}: {one_line(error)}{hint}",
        file=sys.stderr,
    )
    return EXIT_INTERNAL_ERROR


def one_line(error: BaseException) -> str:
    """The error's message on one line; an OSError as `file: reason`."""
    if isinstance(error, OSError) and not isinstance(error, GemmaMLXError) and error.strerror:
        files = [f for f in (error.filename, error.filename2) if f is not None]
        message = ": ".join([*map(str, files), error.strerror]) if files else error.strerror
    else:
        message = str(error) or type(error).__name__
    return " ".join(message.split())


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_options(args)
        prompt = read_prompt(args)
        media = read_media(args)
        model, tokenizer = load_model(args)
        draft = load_draft(args, model)
        out = TextOutput(sys.stdout, None if args.thinking is None else args.thinking == "show")
        if args.chat:
            run_chat(args, model, tokenizer, draft, prompt, media, out)
        else:
            run_once(args, model, tokenizer, draft, prompt, media, out)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as e:  # Ctrl-C; SIGTERM while writing a file arrives as one too
        print(file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except Exception as e:
        return report_error(e, args.verbose)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `gemma-mlx` console script and `python -m gemma_mlx.generate`."""
    return run(argv)


def build_cache_prompt_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m gemma_mlx.cache_prompt",
        description="Prefill a prompt once and save its KV cache, for gemma-mlx "
        "--prompt-cache-file and load_prompt_cache.",
    )
    p.add_argument("--model", help="model directory, .gguf file or Hugging Face repo id "
                   "(default: the built-in Gemma 3 270M base model)")  # fmt: skip
    p.add_argument("-p", "--prompt", required=True,
                   help="the prompt, as plain text; '-' reads it from stdin")  # fmt: skip
    p.add_argument("--prompt-cache-file", required=True, metavar="FILE",
                   help="where to write the cache (safetensors)")  # fmt: skip
    p.add_argument("--force", action="store_true",
                   help="replace FILE if it exists (a file, not a link or a directory)")  # fmt: skip
    p.add_argument(
        "--prefill-step-size", type=int, help="prompt tokens per forward pass (CPU 512, GPU 2048)"
    )
    p.add_argument("--verbose", action="store_true", help="also report BLAS, device and loading")
    add_max_kv_size(p)
    # What `load_model` reads: a text model.
    p.set_defaults(image=[], audio=[], video=[], mmproj=None)
    return p


def run_cache_prompt(argv: Sequence[str] | None = None) -> int:
    """`python -m gemma_mlx.cache_prompt`: the same error boundary as `run`."""
    args = build_cache_prompt_parser().parse_args(argv)
    try:
        if args.prefill_step_size is not None and args.prefill_step_size < 1:
            raise OptionError(f"--prefill-step-size must be >= 1, got {args.prefill_step_size}")
        check_max_kv_size(args)
        target = Path(args.prompt_cache_file)
        check_target(target, directory=False, force=args.force)  # before the slow part
        prompt = read_stdin() if args.prompt == "-" else check_text("--prompt", args.prompt)
        if not prompt.strip():
            raise OptionError("the prompt is empty")
        model, tokenizer = load_model(args)
        tokens = tokenizer.encode(prompt)
        start = time.perf_counter()
        progress = PromptProgress(sys.stderr.isatty())
        cache = cache_prompt(model, tokens, args.prefill_step_size, progress, args.max_kv_size)
        elapsed = time.perf_counter() - start
        with step(f"writing {target}"):
            save_prompt_cache(target, cache, model, force=args.force)
    except KeyboardInterrupt as e:
        print(file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except Exception as e:
        return report_error(e, args.verbose)
    rate = len(tokens) / elapsed
    print(f"Prompt: {len(tokens)} tokens, {rate:.3f} tokens-per-sec", file=sys.stderr)
    print(f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB", file=sys.stderr)
    print(f"Saved to {target}", file=sys.stderr)
    return 0
