"""Text generation: `stream_generate` and `generate` (the command line is `gemma_mlx.cli`).

`stream_generate` turns the token steps of `gemma_mlx.decode.generate_tokens` (or, with a drafter,
of the speculative loop) into `GenerationResponse`s: detokenization, stop conditions, statistics
(mlx-lm's field names and wording).
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from gemma_mlx.decode import (
    ProgressCallback,
    TokenGenerator,
    TokenStep,
    context_length,
    generate_tokens,
)
from gemma_mlx.drafters import speculative_steps
from gemma_mlx.errors import PromptError
from gemma_mlx.sample import (
    LogitsProcessor,
    OptionError,
    Sampler,
    make_logits_processors,
    make_sampler,
)
from gemma_mlx.speculative import SpeculationStats
from gemma_mlx.tokenizer import ANSWER, Tokenizer

Prompt = str | Sequence[int] | mx.array | Sequence[Mapping[str, Any]]


@dataclass
class GenerationResponse:
    """One generated token and the text it completed (mlx-lm's fields, plus `channel`).

    `text` is the new text, possibly empty (an incomplete character is held back).
    `channel` is "answer", "thought" (Gemma 4 thinking) or "tool_call".
    `peak_memory` is in GB; `finish_reason` is "stop", "length" or None.
    """

    text: str
    token: int
    logprobs: mx.array
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None = None
    channel: str = ANSWER
    speculation: SpeculationStats | None = None  # drafts proposed/accepted when drafting, live


class StopStrings:
    """Cuts the text at the first stop string, holding back text that may begin one."""

    def __init__(self, stops: Sequence[str]):
        if any(not s for s in stops):
            raise OptionError("stop strings must not be empty")
        self.stops = list(stops)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to hand out, whether a stop string was found)."""
        if not self.stops:
            return text, False
        held = self._held + text
        cut = min((i for s in self.stops if (i := held.find(s)) >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return held[:cut], True
        keep = max(
            (k for s in self.stops for k in range(1, len(s)) if held.endswith(s[:k])), default=0
        )
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def encode_prompt(
    tokenizer: Tokenizer, prompt: Prompt, chat_template_kwargs: Mapping[str, Any] | None = None
) -> list[int]:
    """Token ids for a text, token ids, or a list of chat messages (rendered by the template)."""
    if isinstance(prompt, str):
        if not prompt:
            raise PromptError("the prompt is empty")
        return tokenizer.encode(prompt)
    if isinstance(prompt, mx.array):
        prompt = prompt.reshape(-1).tolist()
    prompt = list(prompt)
    if not prompt:
        raise PromptError("the prompt is empty")
    if all(isinstance(m, Mapping) for m in prompt):
        return tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, **(chat_template_kwargs or {})
        )
    vocab = tokenizer.vocab_size
    bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
    if bad:
        raise PromptError(
            f"prompt token {bad[0]!r} is not an id in the vocabulary (0..{vocab - 1})"
        )
    return prompt


def _check_length(model: Any, n_prompt: int, max_tokens: int) -> int:
    """`max_tokens` clipped to the context; a prompt that does not fit is an error."""
    if max_tokens < 1:
        raise OptionError(f"max tokens must be >= 1, got {max_tokens}")
    limit = context_length(model)
    if limit is None:
        return max_tokens
    if n_prompt >= limit:
        raise PromptError(
            f"the prompt has {n_prompt} tokens; this model's context holds {limit} "
            "(max_position_embeddings), including at least one generated token"
        )
    return min(max_tokens, limit - n_prompt)


def stream_generate(
    model: Any,
    tokenizer: Tokenizer,
    prompt: Prompt,
    max_tokens: int = 256,
    *,
    temp: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    logit_bias: Mapping[int, float] | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] = (),
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    prompt_cache: list | None = None,
    prefill_step_size: int | None = None,
    prompt_progress: ProgressCallback | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    token_generator: TokenGenerator | None = None,
    draft: Any = None,
    num_draft: int | str = "auto",
) -> Iterator[GenerationResponse]:
    """Generate from `prompt` (text, token ids, or chat messages), one response per token.

    Greedy by default. `sampler`/`logits_processors` replace the ones the sampling options would
    build. `prompt_cache` (from `model.make_cache()`) is extended in place: when it already holds
    the first tokens of the prompt, only the rest is prefilled. Generation stops at an
    end-of-turn/eos token ("stop"), a stop string ("stop") or after `max_tokens` ("length").
    `token_generator` replaces `generate_tokens` (same arguments), e.g. by a draft/verify loop.
    `draft` (a drafter model or path, "prompt-lookup", or "auto": the assistant beside the model
    directory) is that loop, with `num_draft` drafts per round or "auto" (`gemma_mlx.drafters`).
    """
    ids = encode_prompt(tokenizer, prompt, chat_template_kwargs)
    max_tokens = _check_length(model, len(ids), max_tokens)
    if sampler is None:
        sampler = make_sampler(temp, top_p=top_p, min_p=min_p, top_k=top_k, seed=seed)
    if logits_processors is None:
        logits_processors = make_logits_processors(
            logit_bias, repetition_penalty, repetition_context_size, tokenizer.vocab_size
        )
    stops = StopStrings([stop] if isinstance(stop, str) else list(stop))
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    n_prompt = len(ids) - (cache[0].offset if cache else 0)
    detokenizer = tokenizer.detokenizer(tokenizer.channel_after(ids))

    speculation = None
    if draft is not None:
        speculation = SpeculationStats()
        token_generator = functools.partial(
            speculative_steps, draft=draft, num_draft=num_draft, stats=speculation,
            model_path=getattr(model, "path", None),
        )  # fmt: skip
    steps = (token_generator or generate_tokens)(
        model, ids, cache, sampler, logits_processors, max_tokens, prefill_step_size,
        prompt_progress,
    )  # fmt: skip
    start = time.perf_counter()
    prompt_tps = 0.0
    for n, step in enumerate(steps, start=1):
        if not isinstance(step, TokenStep):
            step = TokenStep(*step)
        if n == 1:
            prompt_time = time.perf_counter() - start
            prompt_tps = n_prompt / prompt_time
            start = time.perf_counter()
        finish = None
        if step.token in tokenizer.eos_token_ids:
            channel, text = detokenizer.finalize()
            finish = "stop"
        else:
            channel, text = detokenizer.add_token(step.token)
            if n == max_tokens:
                text += detokenizer.finalize()[1]
                finish = "length"
        if channel == ANSWER:
            text, hit = stops.feed(text)
            if hit:
                finish = "stop"
            elif finish or detokenizer.channel != ANSWER:
                text += stops.flush()
        elapsed = time.perf_counter() - start
        yield GenerationResponse(
            text=text,
            token=step.token,
            logprobs=step.logprobs,
            from_draft=step.from_draft,
            prompt_tokens=n_prompt,
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
            channel=channel,
            speculation=speculation,
        )
        if finish:
            if hasattr(steps, "close"):  # stop a generator's queued work now, not at collection
                steps.close()
            return


def generate(
    model: Any,
    tokenizer: Tokenizer,
    prompt: Prompt,
    verbose: bool = False,
    include_thinking: bool = False,
    **options: Any,
) -> str:
    """The generated text (answer channel only, unless `include_thinking`); with `verbose`,
    stream it to stdout and print mlx-lm's statistics to stderr."""
    pieces = []
    response = None
    for response in stream_generate(model, tokenizer, prompt, **options):
        if response.channel == ANSWER or include_thinking:
            pieces.append(response.text)
            if verbose:
                print(response.text, end="", flush=True)
    if verbose and response is not None:
        print()
        print_stats(response)
    return "".join(pieces)


def print_stats(response: GenerationResponse, file=None) -> None:
    """mlx-lm's three statistics lines."""
    file = file or sys.stderr
    print(
        f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec",
        file=file,
    )
    print(
        f"Generation: {response.generation_tokens} tokens, "
        f"{response.generation_tps:.3f} tokens-per-sec",
        file=file,
    )
    print(f"Peak memory: {response.peak_memory:.3f} GB", file=file)
    spec = response.speculation
    if spec is not None:
        print(
            f"Drafts: {spec.accepted} of {spec.proposed} accepted ({spec.acceptance_rate:.1%}), "
            f"{spec.accepted_per_verify:.2f} per verify step; {spec.verify_steps} verify steps, "
            f"{spec.decode_steps} plain steps",
            file=file,
        )


if __name__ == "__main__":  # `python -m gemma_mlx.generate`: the command line
    from gemma_mlx.cli import main

    sys.exit(main())
