"""Speculative decoding inside a batch: per-sequence drafts, one verify pass, per-sequence accepts.

Each drafting sequence has its own drafter (`gemma_mlx.drafters`: MTP assistant, small model,
prompt lookup) reading its own `DraftContext`, proposes its own number of drafts, and is verified
on its own rows of the batch's one forward pass with `gemma_mlx.kernels.verify` (greedy: drafts
kept while they equal the target's argmax; sampling: rejection sampling from the processed,
filtered distribution, with uniforms from the sequence's own random key). Its caches are trimmed
by its own rejected drafts. This is the single-sequence loop of `gemma_mlx.speculative`, one
sequence's rows at a time, so the tokens are the same.

How many drafts: a verify pass is shared. `DraftPlanner` measures what a pass costs by its number
of rows and, each step, gives drafts to the sequences most likely to keep them (a draft is kept
with probability alpha^j, alpha the sequence's measured acceptance, j its place in the run) for as
long as the expected tokens per second of the whole step grows. Speculation stops for a sequence
whose drafts do not pay, and for all when extra rows cost more than they bring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from gemma_mlx.kernels import verify as verify_kernels
from gemma_mlx.options import check_int
from gemma_mlx.sample import SamplingFilters
from gemma_mlx.speculative import (
    MAX_ADAPTIVE_DRAFT,
    DraftContext,
    Drafter,
    Proposal,
    SpeculationStats,
)


class SequenceDraft:
    """One sequence's drafter, its context, its acceptance estimate and its random key."""

    def __init__(
        self,
        drafter: Drafter,
        model: Any,
        cache: list,
        tokens: list[int],
        sampling: SamplingFilters | None,
        seed: int | None,
        decay: float = 0.95,
    ):
        self.drafter = drafter
        self.context = DraftContext(model, cache, tokens, None, sampling)
        self.stats = SpeculationStats()
        self.decay = decay
        self.hits, self.trials = 1.0, 2.0  # prior: alpha = 0.5
        if sampling is not None:
            self.key = mx.random.key(seed if seed is not None else _fresh_seed())

    @property
    def alpha(self) -> float:
        """Probability that a draft is kept, given the ones before it were."""
        return min(self.hits / self.trials, 0.999)

    @property
    def ready(self) -> bool:
        """Drafting needs the target's hidden state before the newest token: after one step."""
        return self.context.hidden is not None

    def propose(self, k: int) -> Proposal:
        return self.drafter.propose(self.context, k) if k > 0 else Proposal.empty()

    def verify(self, logits: mx.array, proposal: Proposal) -> mx.array:
        """[accepted n, *drafts, the target's token after them] from the sequence's processed
        verify rows `logits` [k + 1, V] (lazy: no host sync)."""
        sampling = self.context.sampling
        if sampling is None:
            n, following = verify_kernels.verify_greedy(logits, proposal.tokens)
        else:
            probs = sampling.distribution(logits)  # float32 [k + 1, V]
            self.key, key = mx.random.split(self.key)
            uniforms = mx.random.uniform(shape=(logits.shape[0],), key=key)
            n, following = verify_kernels.verify_sampling(
                probs, proposal.probs, proposal.tokens, uniforms
            )
        return mx.concatenate([n[None], proposal.tokens, following[None]])

    def commit(self, k: int, accepted: int, hidden: mx.array) -> None:
        """After the caches were trimmed and `context.tokens` extended: `hidden` [1, H] is the
        target's hidden state that predicted the newest token."""
        first = self.context.hidden is None
        self.context.hidden = hidden[None]
        if first:
            self.drafter.prefill(self.context)
            return
        self.stats.record(k, accepted)
        self.drafter.commit(self.context, k, accepted)
        if k:
            self.hits = self.hits * self.decay + accepted
            self.trials = self.trials * self.decay + accepted + (accepted < k)

    def close(self) -> None:
        self.context.cache = []


def _fresh_seed() -> int:
    return int(mx.random.randint(0, 2**31 - 1, ()).item())


class FixedDrafts:
    """The same number of drafts for every ready sequence (within what it may still generate)."""

    def __init__(self, k: int):
        self.max_draft = check_int("num_draft", k, minimum=0)

    def plan(self, alphas: Sequence[float], limits: Sequence[int], other_rows: int) -> list[int]:
        return [min(self.max_draft, limit) for limit in limits]

    def observe(self, rows: int, seconds: float) -> None:
        pass


class DraftPlanner:
    """Draft lengths for the drafting sequences of a step, knowing that the verify is shared.

    `cost(rows)`: the measured seconds of a decoding step by its number of rows (an average that
    fades with `decay`), interpolated between measured row counts and extrapolated along the
    least-squares line of the measured ones (never below a measured smaller count, and each row
    costing at least `min_row_cost` of the smallest measured step). For each total number of
    drafts D the best placement gives the D drafts most likely to be kept (a sequence's j-th
    draft is kept with probability alpha^j); the D with the most expected tokens per second wins.
    A neighbour of the chosen D is tried every `probe_every` steps so that the costs of other row
    counts stay measured.
    """

    def __init__(
        self,
        max_draft: int = MAX_ADAPTIVE_DRAFT,
        decay: float = 0.9,
        probe_every: int = 8,
        min_row_cost: float = 0.02,
        first_draft: int = 3,
    ):
        self.max_draft = max_draft
        self.first_draft = first_draft
        self.decay = decay
        self.probe_every = probe_every
        self.min_row_cost = min_row_cost
        self.times: dict[int, tuple[float, float]] = {}  # rows -> (weight, weighted seconds)
        self.steps = 0
        self.probe_up = True

    def cost(self, rows: int) -> float | None:
        if rows in self.times:
            weight, total = self.times[rows]
            return total / weight
        points = sorted((r, t / w) for r, (w, t) in self.times.items())
        if not points:
            return None
        floor = points[0][1] * self.min_row_cost
        below = [t for r, t in points if r < rows]
        above = [(r, t) for r, t in points if r > rows]
        if below and above:  # between two measured counts: interpolate
            (r0, t0), (r1, t1) = max((r, t) for r, t in points if r < rows), above[0]
            return t0 + (t1 - t0) * (rows - r0) / (r1 - r0)
        if len(points) == 1:
            r0, t0 = points[0]
            return t0 + floor * (rows - r0) if rows > r0 else t0
        n = len(points)
        mean_r = sum(r for r, _ in points) / n
        mean_t = sum(t for _, t in points) / n
        srr = sum((r - mean_r) ** 2 for r, _ in points)
        slope = max(sum((r - mean_r) * (t - mean_t) for r, t in points) / srr, floor)
        line = mean_t + slope * (rows - mean_r)
        return max(line, max(below, default=0.0)) if rows > points[-1][0] else line

    def plan(self, alphas: Sequence[float], limits: Sequence[int], other_rows: int) -> list[int]:
        """Drafts per sequence (at most `limits[i]`); `other_rows` are the step's rows that are
        not drafts (one per decoding sequence, plus any prefill chunk)."""
        self.steps += 1
        # Until two row counts are measured, try at most `first_draft` drafts per sequence.
        most = self.max_draft if len(self.times) >= 2 else min(self.first_draft, self.max_draft)
        limits = [min(limit, most) for limit in limits]
        # Marginal gains in the order a greedy placement takes them: each sequence's j-th draft
        # gains alpha^j, decreasing in j, so taking the largest gains first is optimal for every D.
        gains = sorted(
            ((alpha ** (j + 1), i) for i, alpha in enumerate(alphas) for j in range(limits[i])),
            reverse=True,
        )
        best_d, best_speed = 0, None
        expected = float(len(alphas))
        for d in range(len(gains) + 1):
            if d:
                expected += gains[d - 1][0]
            seconds = self.cost(other_rows + d)
            if seconds is None:  # nothing measured yet: measure a plain step first
                break
            speed = expected / seconds
            if best_speed is None or speed > best_speed:
                best_d, best_speed = d, speed
        if best_speed is not None and self.steps % self.probe_every == 0 and gains:
            self.probe_up = not self.probe_up
            best_d = max(0, min(best_d + (1 if self.probe_up else -1), len(gains)))
        ks = [0] * len(alphas)
        for _, i in gains[:best_d]:
            ks[i] += 1
        return ks

    def observe(self, rows: int, seconds: float) -> None:
        for key, (weight, total) in self.times.items():
            self.times[key] = (weight * self.decay, total * self.decay)
        weight, total = self.times.get(rows, (0.0, 0.0))
        self.times[rows] = (weight + 1.0, total + seconds)


def draft_planner(num_draft: int | str) -> FixedDrafts | DraftPlanner:
    """`num_draft`: drafts per sequence and step (an integer >= 0), or "auto" (`DraftPlanner`)."""
    return DraftPlanner() if num_draft == "auto" else FixedDrafts(num_draft)
