"""Speculative decoding: draft k tokens, verify them in one target forward pass, keep what is exact.

`speculative_tokens` is a token-step generator, the drafting counterpart of
`gemma_mlx.decode.generate_tokens`, that yields `TokenStep(token, logprobs, from_draft)`:

- Greedy (temperature 0): drafts are accepted while they equal the target's argmax, then the target's
  own token follows, so the output is the target's greedy output token for token. (A K-token
  verify pass rounds differently from K one-token passes, by ~1e-5 on the CPU backend: only a
  top-2 tie that close could tell them apart.)
- Sampling: Leviathan et al.'s rejection sampling (accept d with probability min(1, p(d)/q(d)),
  resample a rejection from norm(max(p - q, 0))), which leaves the target's distribution unchanged.
  p is the distribution the plain sampler would draw from: each verify row's logits after the
  logits processors, then temperature, top-k, top-p and min-p (`SamplingFilters`), renormalised,
  in float32 whatever the model's dtype; q is whatever the drafter drew from.
- After each verify every target cache is trimmed by the rejected drafts (exact at any length: the
  rotating caches keep `max_trim` extra positions), before anything reads it again.
- One host synchronization per round: the accepted count and the tokens come back in one array.
- The draft length is fixed or adaptive (`AdaptiveDraftLength`): it follows the measured acceptance
  and the measured cost of a round against a plain decode step, down to 0 (speculation off).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn

from gemma_mlx.decode import TokenStep, log_softmax, prefill_prompt
from gemma_mlx.distributed.stage import PipelineModel
from gemma_mlx.kernels import verify as verify_kernels
from gemma_mlx.sample import FilteredSampler, greedy, make_sampler


@dataclass
class DraftContext:
    """What a drafter may read: the target, its caches and the committed tokens."""

    model: nn.Module  # the target
    cache: list  # the target's caches, holding every committed token but the last
    tokens: list[int]  # committed tokens (prompt + output); the last is not in `cache` yet
    hidden: mx.array | None  # target final-normed hidden state that predicted tokens[-1], [1, 1, H]
    sampling: FilteredSampler | None  # the target's sampling distribution; None: greedy


@dataclass
class Proposal:
    tokens: mx.array  # [k] int32 drafts
    probs: mx.array | None = None  # [k, V] float32: what they were drawn from; None: one-hot

    @classmethod
    def empty(cls) -> Proposal:
        return cls(mx.zeros((0,), mx.int32))


class Drafter(Protocol):
    """Proposes tokens to verify. The loop calls prefill once, then propose/commit every round."""

    def prefill(self, context: DraftContext) -> None: ...

    def propose(self, context: DraftContext, k: int) -> Proposal:
        """At most k drafts following context.tokens (lazy arrays: no host sync)."""
        ...

    def commit(self, context: DraftContext, k: int, accepted: int) -> None:
        """The round proposed k drafts, `accepted` of them were kept; context.tokens is updated."""
        ...


# Longest draft the adaptive controller tries; the target caches must trim this many positions.
MAX_ADAPTIVE_DRAFT = 8


@dataclass
class SpeculationStats:
    """What the drafts bought: filled in by `speculative_tokens` as it runs."""

    verify_steps: int = 0  # rounds that verified at least one draft
    decode_steps: int = 0  # rounds without drafts (plain decoding)
    proposed: int = 0
    accepted: int = 0
    draft_lengths: list[int] = field(default_factory=list)  # k of every round, 0 = plain decode

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def accepted_per_verify(self) -> float:
        """Mean accepted drafts per verify step (the target's own token comes on top)."""
        return self.accepted / self.verify_steps if self.verify_steps else 0.0

    def record(self, k: int, n: int) -> None:
        self.draft_lengths.append(k)
        if k:
            self.verify_steps += 1
            self.proposed += k
            self.accepted += n
        else:
            self.decode_steps += 1


# --- draft length ---------------------------------------------------------------------------


class FixedDraftLength:
    """Always `k` drafts per round."""

    def __init__(self, k: int):
        self.max_draft = k

    def choose(self) -> int:
        return self.max_draft

    def observe(self, k: int, accepted: int, seconds: float) -> None:
        pass


class AdaptiveDraftLength:
    """Picks k to maximize the expected tokens per second of a round, from measurements.

    Model: each draft is accepted with probability `alpha` given the ones before it, so a round with
    k drafts yields (1 - alpha^(k+1)) / (1 - alpha) tokens. A plain decode step (k = 0) costs what
    its rounds measured; a verify round costs `a + b k` seconds, fitted by least squares to the
    measured rounds with k >= 1 only, because a verify differs from a decode step in kind, not
    just by k (on the CPU a 2-row product costs ~1.7 one-row ones, then little per row). The first
    observed round is a plain step, so that k = 0 is never extrapolated. Older rounds fade with
    `decay`. k = 0 wins, and speculation stays off, while drafting loses. A neighbour of the best k
    is probed every `probe_every` rounds so that both estimates stay current; while speculation is
    off the probes back off exponentially (up to every `max_probe_every` rounds). Timing noise (a
    busy CPU) can make longer rounds look free, which would push k to the maximum however poor
    the drafts: each draft is taken to cost at least `min_draft_cost` of a decode step, and a
    verify round at least a decode step plus its drafts.
    """

    def __init__(
        self,
        max_draft: int = MAX_ADAPTIVE_DRAFT,
        decay: float = 0.95,
        probe_every: int = 8,
        max_probe_every: int = 128,
        min_draft_cost: float = 0.02,
    ):
        self.max_draft = max_draft
        self.min_draft_cost = min_draft_cost
        self.decay = decay
        self.probe_every = probe_every
        self.max_probe_every = max_probe_every
        self.hits, self.trials = 1.0, 2.0  # prior: alpha = 0.5
        self.times: dict[int, tuple[float, float]] = {}  # k -> (weight, weighted seconds)
        self.best = min(3, max_draft)
        self.rounds = 0
        self.interval = probe_every
        self.next_probe = probe_every
        self.probe_up = True

    @property
    def alpha(self) -> float:
        return min(self.hits / self.trials, 0.999)

    def cost(self) -> tuple[float, float, float] | None:
        """(plain step, a, b): the measured k = 0 round and the fitted verify cost a + b k; None
        until a plain step and two draft lengths (one where `max_draft` is 1) are measured."""
        points = [(w, k, t / w) for k, (w, t) in self.times.items() if k]
        if 0 not in self.times or len(points) < min(2, self.max_draft):
            return None
        weight, total = self.times[0]
        step = total / weight
        sw = sum(w for w, _, _ in points)
        mk = sum(w * k for w, k, _ in points) / sw
        mt = sum(w * t for w, _, t in points) / sw
        skk = sum(w * (k - mk) ** 2 for w, k, _ in points)
        slope = sum(w * (k - mk) * (t - mt) for w, k, t in points) / skk if skk else 0.0
        b = max(slope, self.min_draft_cost * step)
        return step, max(mt - b * mk, step), b

    def expected_speed(self, k: int, cost: tuple[float, float, float]) -> float:
        step, a, b = cost
        if k == 0:
            return 1.0 / step
        alpha = self.alpha
        return (1 - alpha ** (k + 1)) / (1 - alpha) / (a + b * k)

    def choose(self) -> int:
        self.rounds += 1
        if 0 not in self.times:  # measure a plain step first
            return 0
        cost = self.cost()
        if cost is None:  # measure two draft lengths
            return self.best if len(self.times) == 1 else (1 if self.best != 1 else 2)
        self.best = max(range(self.max_draft + 1), key=lambda k: self.expected_speed(k, cost))
        if self.rounds < self.next_probe:
            return self.best
        if self.best == 0:
            self.interval = min(2 * self.interval, self.max_probe_every)
        else:
            self.interval = self.probe_every
        self.next_probe = self.rounds + self.interval
        self.probe_up = not self.probe_up
        step = 1 if self.probe_up or self.best == 1 else -1
        return max(1, min(self.best + step, self.max_draft))

    def observe(self, k: int, accepted: int, seconds: float) -> None:
        for key, (weight, total) in self.times.items():
            self.times[key] = (weight * self.decay, total * self.decay)
        weight, total = self.times.get(k, (0.0, 0.0))
        self.times[k] = (weight + 1.0, total + seconds)
        if k:
            self.hits = self.hits * self.decay + accepted
            self.trials = self.trials * self.decay + accepted + (accepted < k)


def draft_length_controller(num_draft: int | str) -> FixedDraftLength | AdaptiveDraftLength:
    """`num_draft`: a number of drafts per round (>= 0), or "auto"."""
    if num_draft == "auto":
        return AdaptiveDraftLength()
    if isinstance(num_draft, bool) or not isinstance(num_draft, int) or num_draft < 0:
        raise ValueError(f"num_draft must be an integer >= 0 or 'auto', got {num_draft!r}")
    return FixedDraftLength(num_draft)


# --- the loop ------------------------------------------------------------------------------


def check_trimmable(cache: list, k: int) -> None:
    short = [getattr(c, "max_trim_kept", k) for c in cache if getattr(c, "max_trim_kept", k) < k]
    if short:
        raise ValueError(
            f"num_draft: up to {k} drafts need caches made with make_cache(max_trim >= {k}), "
            f"these keep {min(short)} extra positions"
        )


def _process(
    logits: mx.array, history: Sequence[int], drafts: mx.array, processors: Sequence
) -> mx.array:
    """Apply logits processors to each verify row, row i seeing the history plus drafts[:i]."""
    if not processors:
        return logits
    rows = []
    past = mx.array(history, mx.int32)
    for i in range(logits.shape[0]):
        row = logits[i : i + 1]
        seen = mx.concatenate([past, drafts[:i]])
        for processor in processors:
            row = processor(seen, row)
        rows.append(row)
    return mx.concatenate(rows)


def speculative_tokens(
    model: nn.Module,
    prompt: Sequence[int],
    cache: list,
    drafter: Drafter,
    *,
    num_draft: int | str = "auto",
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
    logits_processors: Sequence = (),
    max_tokens: int = 256,
    prefill_step_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    stats: SpeculationStats | None = None,
) -> Iterator[TokenStep]:
    """Yield up to `max_tokens` `TokenStep`s after `prompt`, drafting with `drafter`.

    The counterpart of `gemma_mlx.decode.generate_tokens` (same prompt-cache and prefill
    behaviour): greedy at `temperature` 0, else rejection sampling from the distribution the
    sampler of `make_sampler(temperature, top_p, min_p, top_k)` draws from; its random stream
    (drafts and acceptance) starts from `seed`, so a seeded run repeats. `cache` must trim
    `num_draft` positions (`make_cache(max_trim=...)`). `stats` (optional) is updated after every
    round.
    """
    # make_sampler checks and spells the options as plain decoding does; its distribution and its
    # own random stream are used.
    sampler = make_sampler(temperature, top_p=top_p, min_p=min_p, top_k=top_k, seed=seed)
    sampling = None if sampler is greedy else sampler
    controller = draft_length_controller(num_draft)
    check_trimmable(cache, controller.max_draft)
    stats = stats if stats is not None else SpeculationStats()
    prompt_done = prefill_prompt(model, prompt, cache, prefill_step_size, progress)

    # The first round feeds the prompt's last token without drafts: the MTP drafter needs the
    # target's hidden state of the position before the newest token.
    context = DraftContext(model, cache, list(prompt), None, sampling)
    produced = 0
    while produced < max_tokens:
        start = time.perf_counter()
        k = 0 if context.hidden is None else min(controller.choose(), max_tokens - produced - 1)
        proposal = drafter.propose(context, k) if k > 0 else Proposal.empty()
        k = proposal.tokens.shape[0]
        inputs = mx.concatenate([mx.array(context.tokens[-1:], mx.int32), proposal.tokens])
        logits, hidden = model(inputs[None], cache, return_hidden=True)
        logits = _process(logits[0], context.tokens, proposal.tokens, logits_processors)
        if sampling is None:
            n, following = verify_kernels.verify_greedy(logits, proposal.tokens)
        else:
            probs = sampling.distribution(logits)  # float32 [k + 1, V]
            uniforms = mx.random.uniform(shape=(k + 1,), key=sampling.next_key())
            n, following = verify_kernels.verify_sampling(
                probs, proposal.probs, proposal.tokens, uniforms
            )
        result = mx.concatenate([n[None], proposal.tokens, following[None]]).tolist()  # the sync
        n = result[0]
        new_tokens = [*result[1 : 1 + n], result[-1]]
        for c in cache:
            c.trim(k - n)
        context.tokens.extend(new_tokens)
        first = context.hidden is None
        context.hidden = hidden[:, n : n + 1]
        if first:
            drafter.prefill(context)
            prompt_done()
        else:
            seconds = time.perf_counter() - start
            if isinstance(model, PipelineModel):  # every rank must choose the same next k
                seconds = model.rank_0_value(seconds)
            controller.observe(k, n, seconds)
            stats.record(k, n)
            drafter.commit(context, k, n)
        for i, token in enumerate(new_tokens):
            try:
                yield TokenStep(token, log_softmax(logits[i]), i < n)
            except GeneratorExit:  # keep generate_tokens' contract: the cache holds a prefix
                for c in cache:  # of prompt + yielded tokens
                    c.trim(max(0, len(new_tokens) - 2 - i))
                raise
        produced += len(new_tokens)


__all__ = [
    "MAX_ADAPTIVE_DRAFT",
    "AdaptiveDraftLength",
    "DraftContext",
    "Drafter",
    "FixedDraftLength",
    "Proposal",
    "SpeculationStats",
    "speculative_tokens",
]
