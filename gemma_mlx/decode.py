"""The decoding core: prefill a prompt into the KV cache, then one forward pass per token.

Below every way of generating (plain, speculative, batched later): it knows models and caches,
not tokenizers, text or drafters.

- `prefill` feeds prompt tokens into the cache in chunks, computing no logits.
- `generate_tokens` yields `TokenStep`s: one forward pass per token, pipelined so the step for
  token n+1 is queued (`mx.async_eval`) before token n is handed out.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from gemma_mlx.errors import PromptError
from gemma_mlx.options import check_int
from gemma_mlx.sample import LogitsProcessor, Sampler, greedy

ProgressCallback = Callable[[int, int], None]
# A token generator's signature (generate_tokens and its drafting counterparts): (model, prompt,
# cache, sampler, logits_processors, max_tokens, prefill_step_size, progress) -> TokenSteps.
TokenGenerator = Callable[..., Iterator["TokenStep"]]


@dataclass
class TokenStep:
    """What a token generator yields: a token, its distribution, and who proposed it."""

    token: int
    logprobs: mx.array
    from_draft: bool = False


def default_prefill_step_size() -> int:
    """Chunk length for prompt processing: smaller on the CPU, where a chunk's attention
    scores and activations are not hidden behind fast memory."""
    return 512 if mx.default_device() == mx.cpu else 2048


def context_length(model: Any) -> int | None:
    """The longest sequence the model was trained for (`max_position_embeddings`), if known."""
    args = getattr(model, "args", None)
    value = getattr(args, "max_position_embeddings", None)
    return value if isinstance(value, int) else None


def log_softmax(logits: mx.array) -> mx.array:
    """Log-probabilities in float32 whatever the model's dtype: in bfloat16 `logits - logsumexp`
    rounds nearby logits of a flat row to one value, which a sampler's filters would then tie."""
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def pick(sampler: Sampler, logits: mx.array) -> tuple[mx.array, mx.array]:
    """The tokens `sampler` picks from `logits` [B, V], and the log-probabilities [B, V].

    Greedy takes the argmax of the logits themselves, as transformers and a speculative verify
    do (`logits - logsumexp` can round two float32 logits that differ to one value), so its
    log-probabilities stay lazy: nothing computes their exp over the vocabulary unless they
    are read (a 262,144-entry row costs more than the argmax on a CPU)."""
    logprobs = log_softmax(logits)
    return (mx.argmax(logits, axis=-1) if sampler is greedy else sampler(logprobs)), logprobs


def _accepts_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.__call__).parameters
    except (TypeError, ValueError):
        return False


def prefill(
    model: Any,
    cache: list,
    tokens: Sequence[int],
    step_size: int,
    progress: ProgressCallback | None = None,
    media: Any = None,
) -> None:
    """Feed `tokens` into `cache` in chunks of `step_size`; no logits are computed.

    Only the cache is evaluated, so the output projection of a chunk never runs. `media` (a
    `gemma4_multimodal.PromptMedia` of the whole prompt, whose first `cache[0].offset` tokens the
    cache already holds) gives the soft tokens of images and audio, and chunks end where
    `media.chunk_end` says, never inside an image whose tokens attend to each other both ways.
    """
    step_size = check_int("prefill_step_size", step_size, minimum=1)
    kwargs = {"logits_to_keep": 0} if _accepts_logits_to_keep(model) else {}
    if media is not None:
        kwargs["media"] = media
    base = cache[0].offset if cache and media is not None else 0
    total = len(tokens)
    start = 0
    while start < total:
        end = min(start + step_size, total)
        if media is not None:
            end = min(media.chunk_end(base + start, base + end) - base, total)
        chunk = mx.array(tokens[start:end], dtype=mx.int32)[None]
        model(chunk, cache=cache, **kwargs)
        mx.eval([c.state for c in cache])
        if progress is not None:
            progress(end, total)
        mx.clear_cache()
        start = end


def prefill_prompt(
    model: Any,
    prompt: Sequence[int],
    cache: list,
    prefill_step_size: int | None,
    progress: ProgressCallback | None,
    media: Any = None,
) -> Callable[[], None]:
    """Prefill all of `prompt` but its last token, after the `cache[0].offset` tokens the cache
    already holds; returns a callback that reports the prompt as done (call it when the first
    token is out, so a progress bar ends when the prompt's work does). `media`: see `prefill`."""
    done = cache[0].offset if cache else 0
    if not 0 <= done < len(prompt):
        raise PromptError(
            f"the cache holds {done} tokens; the prompt must extend it ({len(prompt)} tokens)"
        )
    total = len(prompt) - done

    def report(n: int, _: int) -> None:
        if progress is not None:
            progress(n, total)

    if prefill_step_size is None:
        prefill_step_size = default_prefill_step_size()
    prefill(model, cache, prompt[done:-1], prefill_step_size, report, media)
    return lambda: report(total, total)


def generate_tokens(
    model: Any,
    prompt: Sequence[int],
    cache: list,
    sampler: Sampler,
    logits_processors: Sequence[LogitsProcessor] = (),
    max_tokens: int = 256,
    prefill_step_size: int | None = None,
    progress: ProgressCallback | None = None,
) -> Iterator[TokenStep]:
    """Yield up to `max_tokens` tokens following `prompt`, whose first tokens may already be
    in `cache` (`cache[0].offset` of them); the rest is prefilled in chunks.

    On return the cache holds the prompt and every yielded token whose successor was queued:
    `prompt + tokens[: cache[0].offset - len(prompt)]`.
    """
    prompt_done = prefill_prompt(model, prompt, cache, prefill_step_size, progress)
    history = mx.array(prompt[:-1], dtype=mx.int32)

    def step(token: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal history
        logits = model(token[None], cache=cache)[:, -1, :]
        if logits_processors:
            history = mx.concatenate([history, token])
            for processor in logits_processors:
                logits = processor(history, logits)
        token, logprobs = pick(sampler, logits)
        return token, logprobs[0]

    y, logprobs = step(mx.array(prompt[-1:], dtype=mx.int32))
    mx.async_eval(y)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            next_y, next_logprobs = step(y)
            mx.async_eval(next_y)
        if n == 0:
            prompt_done()
        yield TokenStep(int(y.item()), logprobs)
        if n % 256 == 255:
            mx.clear_cache()
        if n + 1 < max_tokens:
            y, logprobs = next_y, next_logprobs
