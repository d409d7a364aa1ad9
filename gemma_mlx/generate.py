"""Text generation: `stream_generate` and `generate` (the command line is `gemma_mlx.cli`).

`stream_generate` turns the token steps of `gemma_mlx.decode.generate_tokens` (or, with a drafter,
of the speculative loop) into `GenerationResponse`s: detokenization, stop conditions, statistics
(mlx-lm's field names and wording). Images and audio (Gemma 4 with its towers) are encoded and
placed by `prepare_prompt` and prefilled with the prompt; decoding then runs as for text.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from gemma_mlx.cache import (
    DEFAULT_KV_GROUP_SIZE,
    DEFAULT_QUANTIZED_KV_START,
    kv_quantization,
    quantize_caches,
)
from gemma_mlx.decode import (
    ProgressCallback,
    TokenGenerator,
    TokenStep,
    context_length,
    generate_tokens,
    prefill_prompt,
)
from gemma_mlx.drafters import speculative_steps
from gemma_mlx.errors import OptionError, OptionTypeError, PromptError
from gemma_mlx.media.image import DEFAULT_SOFT_TOKENS, SOFT_TOKEN_BUDGETS
from gemma_mlx.media.layout import TextCodec, with_placeholders
from gemma_mlx.media.messages import attach_media, media_list, media_parts, video_parts
from gemma_mlx.media.prompt import PreparedPrompt, media_args, prepare
from gemma_mlx.memory_guard import check_context
from gemma_mlx.options import check_callable, check_int, check_text
from gemma_mlx.prompt_cache import PromptCache, make_prompt_cache
from gemma_mlx.sample import (
    LogitsProcessor,
    Sampler,
    check_sampling_options,
    make_logits_processors,
    make_sampler,
)
from gemma_mlx.speculative import SpeculationStats
from gemma_mlx.tokenizer import ANSWER, Tokenizer

Prompt = str | Sequence[int] | mx.array | Sequence[Mapping[str, Any]] | PreparedPrompt


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

    def __init__(self, stops: str | Sequence[str]):
        stops = [stops] if isinstance(stops, str) else stops
        if not isinstance(stops, Sequence):
            raise OptionTypeError(f"stop must be a string or a list of strings, got {stops!r}")
        self.stops = [check_text("stop string", s) for s in stops]
        if any(not s for s in self.stops):
            raise OptionError("stop strings must not be empty")
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
        if not check_text("the prompt", prompt):
            raise PromptError("the prompt is empty")
        return tokenizer.encode(prompt)
    if isinstance(prompt, mx.array):
        prompt = prompt.reshape(-1).tolist()
    if not isinstance(prompt, Sequence):
        raise OptionTypeError(
            f"prompt must be a string, token ids or chat messages, got {type(prompt).__name__}"
        )
    prompt = list(prompt)
    if not prompt:
        raise PromptError("the prompt is empty")
    if _is_messages(prompt):
        text = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, **(chat_template_kwargs or {})
        )
        return tokenizer.encode(check_text("the rendered chat", text), add_special_tokens=False)
    vocab = tokenizer.vocab_size
    bad = [t for t in prompt if not _is_int(t) or not 0 <= t < vocab]
    if bad:
        raise PromptError(
            f"prompt token {bad[0]!r} is not an id in the vocabulary (0..{vocab - 1})"
        )
    return prompt


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_messages(prompt: Any) -> bool:
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, str)
        and bool(prompt)
        and all(isinstance(m, Mapping) for m in prompt)
    )


def prepare_prompt(
    model: Any,
    tokenizer: Tokenizer,
    prompt: Prompt,
    images: Any = (),
    audio: Any = (),
    max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    encoded: dict[str, mx.array] | None = None,
    videos: Any = (),
) -> PreparedPrompt:
    """The prompt's token ids with its images, audio and videos encoded
    (`gemma_mlx.media.prepare`).

    Chat messages take theirs from their content parts (`images`/`audio` given apart go in front of
    the last user message's text; videos only as `{"type": "video", "video": path}` parts); a text
    or token prompt takes `images`, `audio` and `videos` at its `<|image|>`/`<|audio|>`/`<|video|>`
    placeholders, or at its start when it has none.
    `encoded` is a memo of soft tokens by content hash (a chat session's); a `PreparedPrompt` is
    returned as it is.
    """
    images, audio = media_list("images", images), media_list("audio", audio)
    videos = media_list("videos", videos)
    if isinstance(prompt, PreparedPrompt):
        if images or audio or videos:
            raise OptionError("a PreparedPrompt holds its media already: pass no images or audio")
        return prompt
    if _is_messages(prompt):
        if videos:
            raise OptionError(
                "give videos as content parts of the messages ({'type': 'video', 'video': path})"
            )
        videos = video_parts(prompt)
    in_parts = media_parts(prompt) if _is_messages(prompt) else ([], [])
    if _is_messages(prompt) and (images or audio):
        if any(in_parts):
            raise OptionError(
                "give images and audio as content parts of the messages or as images=/audio=, "
                "not both"
            )
        prompt = attach_media(prompt, images, audio)
        in_parts = (images, audio)
    images, audio = in_parts if any(in_parts) else (images, audio)
    placeholders = {}
    kinds = (("images", "image", images), ("audio", "audio", audio), ("videos", "video", videos))
    for needs, kind, items in kinds:
        if items:  # a text-only model is refused before anything is rendered or read
            placeholders[kind] = getattr(media_args(model, needs).tokens, kind), len(items)
    ids = encode_prompt(tokenizer, prompt, chat_template_kwargs)
    _check_length(model, len(ids), 1)  # before encoding anything: media only add tokens
    if not any(in_parts) and not _is_messages(prompt):  # parts: the template wrote them
        for placeholder, count in placeholders.values():
            ids = with_placeholders(ids, placeholder, count, tokenizer.bos_token_id)
    tokens, media = prepare(
        model, ids, images, audio, max_soft_tokens, encoded, videos,
        TextCodec.of(tokenizer),
    )  # fmt: skip
    return PreparedPrompt(tokens, media)


def check_generation_options(model: Any, options: Mapping[str, Any]) -> None:
    """Check `stream_generate` keyword options before any work starts: an unknown name, a value of
    the wrong type or out of range raises an OptionError naming the option."""
    try:
        bound = inspect.signature(stream_generate).bind(model, None, None, **options)
    except TypeError as e:
        raise OptionTypeError(f"generation options: {e}") from e
    bound.apply_defaults()
    _check_options(bound.arguments)


def _check_options(options: Mapping[str, Any]) -> None:
    """The checks of `check_generation_options` on all of `stream_generate`'s arguments."""
    check_int("max_tokens", options["max_tokens"], minimum=1)
    if options["sampler"] is None:
        sampling = [options[k] for k in ("temp", "top_k", "top_p", "min_p", "seed")]
        check_sampling_options(*sampling)
    if options["logits_processors"] is None:
        make_logits_processors(
            options["logit_bias"], options["repetition_penalty"], options["repetition_context_size"]
        )
    elif not all(callable(p) for p in _sequence("logits_processors", options["logits_processors"])):
        raise OptionTypeError("logits_processors must be a list of callables")
    StopStrings(options["stop"])
    media_list("images", options["images"])
    media_list("audio", options["audio"])
    media_list("videos", options["videos"])
    if options["max_soft_tokens"] not in SOFT_TOKEN_BUDGETS:
        raise OptionError(
            f"max_soft_tokens must be one of {', '.join(map(str, SOFT_TOKEN_BUDGETS))}, "
            f"got {options['max_soft_tokens']!r}"
        )
    for name in ("sampler", "prompt_progress", "token_generator"):
        check_callable(name, options[name])
    if options["prefill_step_size"] is not None:
        check_int("prefill_step_size", options["prefill_step_size"], minimum=1)
    kwargs = options["chat_template_kwargs"]
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise OptionTypeError(f"chat_template_kwargs must be a mapping, got {kwargs!r}")
    _check_prompt_cache(options["model"], options["prompt_cache"])
    if options["max_kv_size"] is not None:
        check_int("max_kv_size", options["max_kv_size"], minimum=1)
    _check_draft(options["draft"], options["num_draft"])
    kv_quantization(options["kv_bits"], options["kv_group_size"], options["quantized_kv_start"])


def _sequence(name: str, value: Any) -> Sequence:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise OptionTypeError(f"{name} must be a list, got {value!r}")
    return value


def _check_prompt_cache(model: Any, cache: Any) -> None:
    """A prompt cache must be `model.make_cache()`'s list, all layers at the same length: an empty
    or foreign list would make the model run without the prompt."""
    if cache is None:
        return
    want = len(model.make_cache())
    if len(_sequence("prompt_cache", cache)) != want:
        raise OptionError(
            f"prompt_cache has {len(cache)} entries, this model needs {want} "
            "(make it with model.make_cache())"
        )
    offsets = {getattr(c, "offset", None) for c in cache}
    if len(offsets) != 1 or not all(_is_int(o) for o in offsets):
        raise OptionError("prompt_cache: its layers hold different numbers of tokens")


def _check_draft(draft: Any, num_draft: Any) -> None:
    if num_draft != "auto":
        check_int("num_draft", num_draft, minimum=0)
    if draft is None or isinstance(draft, (str, os.PathLike)):
        return
    drafter = all(hasattr(draft, m) for m in ("prefill", "propose", "commit"))
    if not isinstance(draft, nn.Module) and not drafter:
        raise OptionTypeError(
            f"draft must be a path, a model, 'prompt-lookup', 'auto' or a drafter, got {draft!r}"
        )


def _check_length(model: Any, n_prompt: int, max_tokens: int) -> int:
    """`max_tokens` clipped to the context; a prompt that does not fit is an error."""
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
    images: Any = (),
    audio: Any = (),
    max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    max_kv_size: int | None = None,
    videos: Any = (),
) -> Iterator[GenerationResponse]:
    """Generate from `prompt` (text, token ids, chat messages or a `PreparedPrompt`), one
    response per token.

    Greedy by default. `sampler`/`logits_processors` replace the ones the sampling options would
    build. `prompt_cache` (from `model.make_cache()`) is extended in place: when it already holds
    the first tokens of the prompt, only the rest is prefilled; a `PromptCache`
    (`load_prompt_cache`) knows its tokens, and `prompt` is then what follows them. Generation
    stops at an end-of-turn/eos token ("stop"), a stop string ("stop") or after `max_tokens`
    ("length"); a context that would not fit in memory is refused first (`memory_guard`).
    `token_generator` replaces `generate_tokens` (same arguments), e.g. by a draft/verify loop.
    `draft` (a drafter model or path, "prompt-lookup", or "auto": the assistant beside the model
    directory) is that loop, with `num_draft` drafts per round or "auto" (`gemma_mlx.drafters`).
    `images`/`audio` (a model loaded with its towers): sources for the prompt's placeholders, or
    content parts of chat messages (`prepare_prompt`), and `videos` (files: 32 sampled frames
    of 70 soft tokens each, `gemma_mlx.media.video`); an image takes up to `max_soft_tokens`
    (70, 140, 280, 560 or 1120) tokens. Drafting works with them: drafts are verified by the model,
    which alone sees the images. `kv_bits` (8 or 4) stores the full-attention layers' keys and
    values quantized in groups of `kv_group_size`, from position `quantized_kv_start` on
    (`gemma_mlx.cache.QuantizedKVCache`); a given `prompt_cache` is converted in place.
    `max_kv_size`: full-attention layers keep only their last N positions (`make_prompt_cache`):
    memory, but attention past N tokens back is lost; a given `prompt_cache` keeps its own kinds.
    """
    _check_options(locals())  # every argument, before any work
    if isinstance(prompt_cache, PromptCache):  # from a file: the prompt continues its tokens
        media = media_list("images", images) + media_list("audio", audio)
        media += media_list("videos", videos)
        prompt = prompt_cache.continued(tokenizer, prompt, media)
    prepared = prepare_prompt(
        model, tokenizer, prompt, images, audio, max_soft_tokens, chat_template_kwargs,
        videos=videos,
    )  # fmt: skip
    ids = prepared.tokens
    max_tokens = _check_length(model, len(ids), max_tokens)
    if sampler is None:
        sampler = make_sampler(temp, top_p=top_p, min_p=min_p, top_k=top_k, seed=seed)
    if logits_processors is None:
        logits_processors = make_logits_processors(
            logit_bias, repetition_penalty, repetition_context_size, tokenizer.vocab_size
        )
    stops = StopStrings(stop)
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model, max_kv_size)
    quantization = kv_quantization(kv_bits, kv_group_size, quantized_kv_start)
    quantize_caches(cache, quantization)
    check_context(model, len(ids) + max_tokens, cache, prefill_step_size, max_kv_size, quantization)
    n_prompt = len(ids) - (cache[0].offset if cache else 0)
    detokenizer = tokenizer.detokenizer(tokenizer.channel_after(ids))

    speculation = None
    if draft is not None:
        speculation = SpeculationStats()
        token_generator = functools.partial(
            speculative_steps, draft=draft, num_draft=num_draft, stats=speculation,
            model_path=getattr(model, "path", None),
        )  # fmt: skip
    generator = token_generator or generate_tokens
    if prepared.media is not None:
        generator = after_media_prefill(generator, prepared.media)
    steps = generator(
        model, ids, cache, sampler, logits_processors, max_tokens, prefill_step_size,
        prompt_progress,
    )  # fmt: skip
    if isinstance(cache, PromptCache):
        steps = cache.tracking(steps, ids)
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


def after_media_prefill(generator: TokenGenerator, media: Any) -> TokenGenerator:
    """`generator` (any token generator) run after a prefill that places `media`'s soft tokens:
    it then starts from the prompt's last token, which is text, so it needs no media itself."""

    def steps(
        model: Any,
        prompt: Sequence[int],
        cache: list,
        sampler: Sampler,
        logits_processors: Sequence[LogitsProcessor],
        max_tokens: int,
        prefill_step_size: int | None,
        progress: ProgressCallback | None,
    ) -> Iterator[TokenStep]:
        prompt_done = prefill_prompt(model, prompt, cache, prefill_step_size, progress, media)
        yield from generator(
            model, prompt, cache, sampler, logits_processors, max_tokens, prefill_step_size,
            lambda done, total: prompt_done(),
        )  # fmt: skip

    return steps


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
