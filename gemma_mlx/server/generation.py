"""What a request's generation needs beyond `stream_generate`'s options: OpenAI's penalties, banned
tokens and Anthropic's thinking budget as logits processors, top log-probabilities, and which stop
string ended a reply. Runs on the engine's thread (it is MLX work).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from gemma_mlx.media.image import DEFAULT_SOFT_TOKENS
from gemma_mlx.sample import LogitsProcessor, make_logits_processors
from gemma_mlx.server.engine import GenerationRequest, TokenEvent
from gemma_mlx.tokenizer import ANSWER


@dataclass(frozen=True)
class GenerationSettings:
    """Server-wide settings of the batch engine (`gemma_mlx.batching.BatchScheduler`'s)."""

    prefill_step_size: int | None = None
    draft: Any = None  # speculative decoding: a drafter path, "prompt-lookup" or "auto"
    num_draft: int | str = "auto"
    kv_budget: int | None = None  # bytes for the running requests' caches (None: the default)
    max_soft_tokens: int = DEFAULT_SOFT_TOKENS  # tokens per image


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


def logits_processors(
    request: GenerationRequest, tokenizer: Any, n_prompt: int
) -> list[LogitsProcessor]:
    """The request's logits processors; `n_prompt`: its prompt's length once its media are
    expanded (the penalties count only what follows)."""
    s = request.sampling
    processors = make_logits_processors(
        dict(s.logit_bias) or None, s.repetition_penalty, s.repetition_context_size,
        tokenizer.vocab_size,
    )  # fmt: skip
    if s.presence_penalty or s.frequency_penalty:
        processors.append(make_penalties(s.presence_penalty, s.frequency_penalty, n_prompt))
    if request.banned_tokens:
        processors.append(make_ban(request.banned_tokens))
    m = tokenizer.markers
    if request.thinking_budget is not None and None not in (m.channel_open, m.channel_close):
        newlines = newline_tokens(tokenizer)
        budget = request.thinking_budget
        processors.append(make_thinking_budget(budget, m.channel_open, m.channel_close, newlines))
    return processors


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


@dataclass
class Reply:
    """A request's reply as it is handed out: the stream event of each generated token, and the
    answer channel's tokens and text, which a stop string is matched against at the end."""

    top_logprobs: int | None
    answer_tokens: list[int] = field(default_factory=list)
    answer_text: list[str] = field(default_factory=list)

    def event(self, r: Any) -> TokenEvent:
        """Record the generated token `r` (a `GenerationResponse`); its stream event."""
        if r.channel == ANSWER:
            self.answer_tokens.append(r.token)
            self.answer_text.append(r.text)
        k = self.top_logprobs
        if k is None:
            return TokenEvent(r.token, r.text, r.channel)
        lp = r.logprobs[r.token].item()
        return TokenEvent(r.token, r.text, r.channel, lp, top_logprobs(r.logprobs, k))

    def stop_string(self, tokenizer: Any, r: Any, stops) -> str | None:
        """The stop string that ended the reply at `r`, if a stop string did."""
        if r.finish_reason != "stop" or r.token in tokenizer.eos_token_ids:
            return None
        return matched_stop(tokenizer, self.answer_tokens, "".join(self.answer_text), stops)
