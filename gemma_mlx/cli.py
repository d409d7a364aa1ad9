"""`python -m gemma_mlx.generate` / `gemma-mlx`: generate text, or chat (`--chat`), in a terminal.

Generated text goes to stdout as it is produced (rich colour only on a terminal, plain text when
piped); statistics go to stderr in mlx-lm's wording. Bad input ends with one line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, ClassVar, TextIO

import mlx.core as mx

from gemma_mlx import _platform
from gemma_mlx.chat import ChatSession
from gemma_mlx.errors import GemmaMLXError
from gemma_mlx.generate import print_stats, stream_generate
from gemma_mlx.hub import load, resolve_model
from gemma_mlx.sample import OptionError, check_sampling_options
from gemma_mlx.tokenizer import ANSWER, THOUGHT, TOOL_CALL

PROG = "gemma-mlx"
EXIT_BAD_INPUT = 2


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
    if args.max_tokens < 1:
        raise OptionError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.repetition_penalty is not None and not args.repetition_penalty > 0:
        raise OptionError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    if args.repetition_context_size < 1:
        raise OptionError(
            f"--repetition-context-size must be >= 1, got {args.repetition_context_size}"
        )
    if args.prefill_step_size is not None and args.prefill_step_size < 1:
        raise OptionError(f"--prefill-step-size must be >= 1, got {args.prefill_step_size}")
    if any(not s for s in args.stop):
        raise OptionError("--stop strings must not be empty")


def read_prompt(args: argparse.Namespace) -> str | None:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if prompt is None and not args.chat:
        raise OptionError("no prompt: pass -p TEXT, or -p - to read it from stdin")
    if prompt is not None and not prompt.strip():
        raise OptionError("the prompt is empty")
    return prompt


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


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
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
        "draft": args.draft_model,
        "num_draft": args.num_draft,
    }


def load_model(args: argparse.Namespace):
    start = time.perf_counter()
    path = resolve_model(args.model)
    model, tokenizer = load(path)
    model.path = path  # where --draft-model auto looks for an assistant
    if args.verbose:
        print(f"BLAS: {_platform.describe_blas()}", file=sys.stderr)
        print(f"Device: {mx.default_device()}", file=sys.stderr)
        print(f"Model: {path} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return model, tokenizer


def uses_chat_template(args: argparse.Namespace, tokenizer) -> bool:
    wanted = args.chat or args.use_chat_template or args.system is not None
    if args.no_chat_template:
        if args.chat:
            raise OptionError("--chat needs the chat template; drop --no-chat-template")
        return False
    if tokenizer.chat_template is None:
        if wanted:
            raise OptionError(
                "this model has no chat template (a base model?): drop --chat/--system/"
                "--use-chat-template and give a plain completion prompt"
            )
        return False
    return wanted or tokenizer.instruction_tuned


def run_once(args, model, tokenizer, prompt: str, out: TextOutput) -> None:
    if uses_chat_template(args, tokenizer):
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = [*messages, {"role": "user", "content": prompt}]
    response = None
    for response in stream_generate(
        model,
        tokenizer,
        prompt,
        chat_template_kwargs={"enable_thinking": True} if args.think else None,
        **generation_options(args),
    ):
        out.write(response.channel, response.text)
    out.end()
    if response is not None:
        print_stats(response)


def run_chat(args, model, tokenizer, first: str | None, out: TextOutput) -> None:
    uses_chat_template(args, tokenizer)
    session = ChatSession(
        model,
        tokenizer,
        system=args.system,
        chat_template_kwargs={"enable_thinking": True} if args.think else None,
        **generation_options(args),
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
        command, _, argument = message.strip().partition(" ")
        if command in ("/quit", "/exit"):
            return
        if command == "/reset":
            session = ChatSession(model, tokenizer, args.system, session.chat_template_kwargs,
                                  **session.options)  # fmt: skip
        elif command == "/save":
            try:
                session.save(argument.strip())
                print(f"saved to {argument.strip()}", file=sys.stderr)
            except GemmaMLXError as e:
                print(f"{PROG}: error: {e}", file=sys.stderr)
        elif message.strip():
            response = None
            try:
                for response in session.stream(message):
                    out.write(response.channel, response.text)
            except KeyboardInterrupt:
                print(" [interrupted]", file=sys.stderr)
            out.end()
            if response is not None and args.verbose:
                print_stats(response)
        message = None


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_options(args)
        prompt = read_prompt(args)
        model, tokenizer = load_model(args)
        out = TextOutput(sys.stdout, None if args.thinking is None else args.thinking == "show")
        if args.chat:
            run_chat(args, model, tokenizer, prompt, out)
        else:
            run_once(args, model, tokenizer, prompt, out)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (GemmaMLXError, OSError) as e:
        message = " ".join(str(e).split())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `gemma-mlx` console script and `python -m gemma_mlx.generate`."""
    return run(argv)
