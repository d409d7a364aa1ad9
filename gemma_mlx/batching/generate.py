"""`batch_generate`: a list of prompts through the continuous-batching scheduler, texts in order.

mlx-lm's function of the same name takes token-id prompts and returns a `BatchResponse` (`texts`,
`stats`); ours also takes text or chat messages, every `stream_generate` option (one value for
all prompts; `max_tokens` may be a list, one per prompt), and speculative decoding (`draft`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from gemma_mlx.batching.scheduler import BatchScheduler
from gemma_mlx.errors import OptionError, OptionTypeError
from gemma_mlx.options import check_int
from gemma_mlx.speculative import SpeculationStats
from gemma_mlx.tokenizer import ANSWER


@dataclass
class BatchStats:
    """Where the time went. Steps that prefilled a prompt chunk count as prompt time; the
    generation speed is that of the steps that only decoded (`decode_tokens` in
    `generation_time`), the aggregate of every running sequence."""

    prompt_tokens: int = 0
    prompt_time: float = 0.0
    generation_tokens: int = 0  # every generated token
    decode_tokens: int = 0
    generation_time: float = 0.0
    peak_memory: float = 0.0  # GB
    speculation: SpeculationStats | None = None  # drafts of every request together

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_time if self.prompt_time else 0.0

    @property
    def generation_tps(self) -> float:
        """Aggregate decoding speed: generated tokens per second of the batch."""
        return self.decode_tokens / self.generation_time if self.generation_time else 0.0


@dataclass
class BatchResponse:
    """The generated texts in prompt order, their token ids and why each ended."""

    texts: list[str]
    stats: BatchStats
    token_ids: list[list[int]] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)


def batch_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    max_tokens: int | Sequence[int] = 256,
    *,
    verbose: bool = False,
    include_thinking: bool = False,
    max_batch: int = 32,
    kv_budget: int | None = None,
    prefill_step_size: int | None = None,
    draft: Any = None,
    num_draft: int | str = "auto",
    **options: Any,
) -> BatchResponse:
    """Generate for every prompt at once (continuous batching, `gemma_mlx.batching.scheduler`).

    `prompts`: a list of prompts as `stream_generate` takes them (text, token ids, chat
    messages). `options` are `stream_generate`'s (temperature, stop strings, seed, ...), the same
    for every prompt; `max_tokens` is one number or one per prompt. `draft`/`num_draft`:
    speculative decoding, per sequence, verified in one pass for the batch. `max_batch`,
    `kv_budget` (bytes), `prefill_step_size`: see `BatchScheduler`. Texts hold the answer channel
    only unless `include_thinking`. Every prompt and option is checked before any work starts.
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise OptionTypeError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
    if isinstance(max_tokens, Sequence):
        if len(max_tokens) != len(prompts):
            raise OptionError(
                f"max_tokens has {len(max_tokens)} entries for {len(prompts)} prompts"
            )
        limits = [check_int("max_tokens", m, minimum=1) for m in max_tokens]
    else:
        limits = [max_tokens] * len(prompts)
    scheduler = BatchScheduler(
        model, tokenizer, max_batch=max_batch, kv_budget=kv_budget,
        prefill_step_size=prefill_step_size, draft=draft, num_draft=num_draft,
    )  # fmt: skip
    uids = [scheduler.submit(p, m, **options) for p, m in zip(prompts, limits, strict=True)]
    drafts = [s.draft for s in scheduler.waiting if s.draft is not None]
    order = {uid: i for i, uid in enumerate(uids)}
    texts: list[list[str]] = [[] for _ in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * len(prompts)
    mx.reset_peak_memory()
    for uid, response in scheduler.run():
        i = order[uid]
        tokens[i].append(response.token)
        if response.channel == ANSWER or include_thinking:
            texts[i].append(response.text)
        if response.finish_reason is not None:
            reasons[i] = response.finish_reason
            if verbose:
                done = sum(r is not None for r in reasons)
                print(f"[batch_generate] Finished {done}/{len(prompts)}", end="\r", file=sys.stderr)
    counters = scheduler.counters
    stats = BatchStats(
        prompt_tokens=counters.prompt_tokens,
        prompt_time=counters.prompt_time,
        generation_tokens=counters.generated_tokens,
        decode_tokens=counters.decode_tokens,
        generation_time=counters.decode_time,
        peak_memory=mx.get_peak_memory() / 1e9,
        speculation=_total(drafts) if drafts else None,
    )
    if verbose:
        _print_stats(stats)
    return BatchResponse(["".join(t) for t in texts], stats, tokens, reasons)


def _total(drafts: list[Any]) -> SpeculationStats:
    total = SpeculationStats()
    for d in drafts:
        s = d.stats
        total.verify_steps += s.verify_steps
        total.decode_steps += s.decode_steps
        total.proposed += s.proposed
        total.accepted += s.accepted
        total.draft_lengths += s.draft_lengths
    return total


def _print_stats(stats: BatchStats) -> None:
    print(file=sys.stderr)
    print(
        f"[batch_generate] Prompt: {stats.prompt_tokens} tokens, "
        f"{stats.prompt_tps:.3f} tokens-per-sec",
        file=sys.stderr,
    )
    print(
        f"[batch_generate] Generation: {stats.generation_tokens} tokens, "
        f"{stats.generation_tps:.3f} tokens-per-sec",
        file=sys.stderr,
    )
    print(f"[batch_generate] Peak memory: {stats.peak_memory:.3f} GB", file=sys.stderr)
    spec = stats.speculation
    if spec is not None:
        print(
            f"[batch_generate] Drafts: {spec.accepted} of {spec.proposed} accepted "
            f"({spec.acceptance_rate:.1%})",
            file=sys.stderr,
        )
