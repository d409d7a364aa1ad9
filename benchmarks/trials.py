"""One timed generation, and the statistics over several (mlx-lm's `benchmark` definitions).

- time to first token (TTFT): from the call to the first token handed out; it covers the prompt
  and the first decode step, as mlx-lm's `prompt_tps` does;
- prefill tokens/s: prompt tokens / TTFT;
- decode tokens/s: tokens after the first / time from the first token to the last;
- peak memory (MLX engines): the engine's weights plus the most memory the trial allocated above
  what was in use when it started. Both MLX engines share this process, so MLX's own peak would
  count the other engine's weights too.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

TokenCallback = Callable[[int], None]


@dataclass
class Trial:
    prompt_tokens: int
    ttft: float
    decode_time: float
    tokens: list[int]
    drafted: int  # tokens that came from a draft model (speculative decoding)
    peak_memory_gb: float | None

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.ttft

    @property
    def decode_tps(self) -> float:
        return (len(self.tokens) - 1) / self.decode_time if len(self.tokens) > 1 else 0.0


def run_trial(engine, prompt: list[int], max_tokens: int, on_token: TokenCallback | None = None):
    """Generate `max_tokens` tokens after `prompt` with `engine`, timing every stage."""
    if engine.measures_memory:
        mx.clear_cache()
        baseline = mx.get_active_memory()
        mx.reset_peak_memory()
    tokens: list[int] = []
    drafted = 0
    first = None
    start = time.perf_counter()
    for token, from_draft in engine.stream(prompt, max_tokens):
        if first is None:
            first = time.perf_counter()
        tokens.append(token)
        drafted += from_draft
        if on_token is not None:
            on_token(len(tokens))
    end = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{engine.name} produced no token")
    peak = None
    if engine.measures_memory:
        peak = (engine.weight_nbytes + mx.get_peak_memory() - baseline) / 1e9
    return Trial(len(prompt), first - start, end - first, tokens, drafted, peak)


@dataclass
class Spread:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


@dataclass
class Series:
    """The trials of one engine on one prompt."""

    trials: list[Trial] = field(default_factory=list)

    def spread(self, metric: str) -> Spread | None:
        values = [getattr(t, metric) for t in self.trials]
        if any(v is None for v in values) or not values:
            return None
        return Spread.of(values)

    def ratio(self, other: Series, metric: str) -> Spread:
        """Trial-by-trial `self / other` (runs were interleaved, so pairs share conditions)."""
        pairs = zip(self.trials, other.trials, strict=True)
        return Spread.of([getattr(a, metric) / getattr(b, metric) for a, b in pairs])
