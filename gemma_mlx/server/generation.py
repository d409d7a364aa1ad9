"""One request's generation, as steps an engine can interleave: each `next()` is one prefill chunk
or one token. Runs on the engine's thread (it is all MLX work).

The prompt's longest cached prefix comes from the prefix cache, the rest is prefilled chunk by
chunk, and a snapshot is stored at the end of the prompt and at the end of the reply. Tokens come
from `gemma_mlx.generate.stream_generate` with the request's options, so the text is exactly what
`gemma_mlx.generate` gives for the same prompt and options.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from gemma_mlx.decode import default_prefill_step_size, prefill
from gemma_mlx.generate import stream_generate
from gemma_mlx.sample import LogitsProcessor, make_logits_processors, make_sampler
from gemma_mlx.server.engine import GenerationRequest, SamplingOptions, TokenEvent, Usage
from gemma_mlx.server.prefix_cache import PrefixCache
from gemma_mlx.tokenizer import ANSWER


@dataclass(frozen=True)
class GenerationSettings:
    """Server-wide settings every generation uses."""

    prefill_step_size: int | None = None
    draft: Any = None  # a drafter for speculative decoding (see gemma_mlx.drafters.make_drafter)
    num_draft: int | str = "auto"


def make_penalties(presence: float, frequency: float, n_prompt: int) -> LogitsProcessor:
    """OpenAI's presence and frequency penalties over the generated tokens (not the prompt):
    logit -= frequency * count + presence * (count > 0)."""

    def penalize(tokens: mx.array, logits: mx.array) -> mx.array:
        generated = tokens[n_prompt:]
        if generated.size == 0:
            return logits
        counts = mx.zeros((logits.shape[-1],), mx.float32).at[generated].add(1.0)
        penalty = frequency * counts + presence * (counts > 0).astype(mx.float32)
        return logits - penalty.astype(logits.dtype)

    return penalize


def make_ban(tokens: tuple[int, ...]) -> LogitsProcessor:
    """Never generate `tokens`."""
    ids = mx.array(tokens, dtype=mx.int32)

    def ban(_tokens: mx.array, logits: mx.array) -> mx.array:
        return logits.at[:, ids].add(-mx.inf)

    return ban


def make_thinking_budget(
    budget: int, channel_open: int, channel_close: int, newlines: frozenset[int]
) -> LogitsProcessor:
    """Close the thinking channel once it holds `budget` tokens (Anthropic's `budget_tokens`),
    counted after its header (`<|channel>thought` and the newline, a token in `newlines`)."""

    def limit(tokens: mx.array, logits: mx.array) -> mx.array:
        history = np.asarray(tokens)
        opens = np.flatnonzero(history == channel_open)
        if opens.size == 0 or np.any(history[opens[-1] :] == channel_close):
            return logits
        header = np.flatnonzero(np.isin(history[opens[-1] :], list(newlines)))
        if header.size == 0 or history.size - 1 - (opens[-1] + header[0]) < budget:
            return logits
        only_close = mx.arange(logits.shape[-1]) == channel_close
        return mx.broadcast_to(mx.where(only_close, 0.0, -mx.inf), logits.shape).astype(
            logits.dtype
        )

    return limit


_NEWLINES: dict[int, frozenset[int]] = {}


def newline_tokens(tokenizer: Any) -> frozenset[int]:
    """Ids of the tokens whose text holds a newline (computed once per vocabulary)."""
    key = id(tokenizer.backend)
    if key not in _NEWLINES:
        vocab = tokenizer.backend.get_vocab()
        _NEWLINES[key] = frozenset(i for t, i in vocab.items() if "\n" in t or t == "<0x0A>")
    return _NEWLINES[key]


def logits_processors(request: GenerationRequest, tokenizer: Any) -> list[LogitsProcessor]:
    s = request.sampling
    processors = make_logits_processors(
        dict(s.logit_bias) or None, s.repetition_penalty, s.repetition_context_size,
        tokenizer.vocab_size,
    )  # fmt: skip
    if s.presence_penalty or s.frequency_penalty:
        processors.append(
            make_penalties(s.presence_penalty, s.frequency_penalty, len(request.prompt))
        )
    if request.banned_tokens:
        processors.append(make_ban(request.banned_tokens))
    m = tokenizer.markers
    if request.thinking_budget is not None and None not in (m.channel_open, m.channel_close):
        newlines = newline_tokens(tokenizer)
        budget = request.thinking_budget
        processors.append(make_thinking_budget(budget, m.channel_open, m.channel_close, newlines))
    return processors


def _can_draft(s: SamplingOptions) -> bool:
    """Speculative decoding reproduces greedy and plain temperature sampling exactly."""
    return (s.top_k, s.top_p, s.min_p) == (0, 1.0, 0.0)


def top_logprobs(logprobs: mx.array, k: int) -> tuple[tuple[int, float], ...]:
    if k == 0:
        return ()
    ids = mx.argpartition(-logprobs, kth=k - 1)[:k]
    values = logprobs[ids]
    order = mx.argsort(-values)
    return tuple(zip(ids[order].tolist(), values[order].tolist(), strict=True))


def matched_stop(tokenizer: Any, answer_tokens: list[int], answer_text: str, stops) -> str | None:
    """The stop string that cut the answer after `answer_text` (what was handed out)."""
    raw = tokenizer.decode(answer_tokens)
    found = [(raw.find(s, max(0, len(answer_text) - 1)), i, s) for i, s in enumerate(stops)]
    found = [f for f in found if f[0] >= 0]
    return min(found)[2] if found else None


class Generation:
    """Steps of one request (`steps()`), then its `finish_reason`, `stop_string` and `usage`."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prefix_cache: PrefixCache,
        request: GenerationRequest,
        settings: GenerationSettings,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.prefix_cache = prefix_cache
        self.request = request
        self.settings = settings
        self.cached = 0
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        self.stop_string: str | None = None

    @property
    def usage(self) -> Usage:
        return Usage(len(self.request.prompt), self.cached, len(self.generated))

    def steps(self) -> Iterator[TokenEvent | None]:
        """None after each prefill chunk, a TokenEvent per generated token."""
        ids = list(self.request.prompt)
        cache, self.cached = self.prefix_cache.fetch(ids)
        step = self.settings.prefill_step_size or default_prefill_step_size()
        # Chunks end where a fresh run's do (multiples of `step`), so that after a cache hit the
        # forward passes have the shapes, and roundings, of a fresh run's but for the first one.
        bounds = [self.cached, *range((self.cached // step + 1) * step, len(ids) - 1, step)]
        for start, end in zip(bounds, [*bounds[1:], len(ids) - 1], strict=True):
            if start < end:
                prefill(self.model, cache, ids[start:end], step)
                yield None
        if len(ids) > 1:
            self.prefix_cache.store(ids[:-1], cache)
        responses = self._responses(ids, cache)
        answer_tokens: list[int] = []
        answer_text: list[str] = []
        try:
            for r in responses:
                self.generated.append(r.token)
                if r.channel == ANSWER:
                    answer_tokens.append(r.token)
                    answer_text.append(r.text)
                yield self._event(r)
                if r.finish_reason:
                    self.finish_reason = r.finish_reason
                    if r.finish_reason == "stop" and r.token not in self.tokenizer.eos_token_ids:
                        self.stop_string = matched_stop(
                            self.tokenizer, answer_tokens, "".join(answer_text), self.request.stop
                        )
        finally:
            responses.close()
            held = (ids + self.generated)[: cache[0].offset] if cache else []
            self.prefix_cache.store(held, cache)

    def _responses(self, ids: list[int], cache: list):
        s = self.request.sampling
        draft = self.settings.draft if _can_draft(s) else None
        return stream_generate(
            self.model,
            self.tokenizer,
            ids,
            self.request.max_tokens,
            sampler=make_sampler(s.temperature, s.top_p, s.min_p, s.top_k, s.seed),
            logits_processors=logits_processors(self.request, self.tokenizer),
            stop=self.request.stop,
            prompt_cache=cache,
            prefill_step_size=self.settings.prefill_step_size,
            draft=draft,
            num_draft=self.settings.num_draft,
        )

    def _event(self, r) -> TokenEvent:
        k = self.request.top_logprobs
        if k is None:
            return TokenEvent(r.token, r.text, r.channel)
        return TokenEvent(
            r.token, r.text, r.channel, r.logprobs[r.token].item(), top_logprobs(r.logprobs, k)
        )
