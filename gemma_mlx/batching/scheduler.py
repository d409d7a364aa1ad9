"""Continuous batching: many requests, one forward pass per step over all of them.

`BatchScheduler.submit` queues a request (prompt and `stream_generate`'s options) and returns its
id; every `step()` is one batched forward pass (`model.batched`, `gemma_mlx.ragged`) and returns
the responses it produced, a `gemma_mlx.generate.GenerationResponse` per new token, tagged with
the request's id. Within a step:

- Requests join at step boundaries, first come first served, while the memory budget
  (`gemma_mlx.batching.memory`) holds what all of them may grow to and at most `max_batch` run.
- Every decoding sequence feeds its newest token (plus its drafts when speculating); prompts are
  prefilled in chunks that share the pass, at most `prefill_step_size` prompt tokens per step in
  all, so a long prompt delays the others by at most one chunk per step.
- Each sequence picks its token with its own logits processors and sampler (a seeded sampler
  draws from its own key, so its tokens do not depend on its neighbours), or verifies its drafts
  (`gemma_mlx.batching.speculation`); greedy rows are chosen together.
- A sequence that finished (end of turn, stop string, length) or was cancelled leaves before the
  next step, and its memory goes back to the budget.
- Once prefilled, a sequence that decodes without drafts moves its caches into the batch's
  `CachePool` (`gemma_mlx.pooled_cache`) while the budget holds the pool: one cache write and one
  attention call per layer for all of them; it leaves with caches of its own again.

One host synchronization per step: the chosen tokens of every sequence come back in one array;
without drafts the next pass is queued before it (see `step`).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from gemma_mlx.batching.memory import (
    default_budget,
    pass_activation_bytes,
    pooled_kv_bytes,
    sequence_kv_bytes,
)
from gemma_mlx.batching.passes import (
    Feed,
    Pass,
    choose,
    commit,
    pass_inputs,
    read,
    value_arrays,
)
from gemma_mlx.batching.sequence import BatchSequence
from gemma_mlx.batching.speculation import SequenceDraft, draft_planner
from gemma_mlx.cache import (
    DEFAULT_MAX_TRIM,
    held_quantization,
    kv_quantization_of,
    quantize_caches,
)
from gemma_mlx.decode import default_prefill_step_size
from gemma_mlx.drafters import make_drafter
from gemma_mlx.errors import OptionError, OptionTypeError
from gemma_mlx.generate import GenerationResponse, check_generation_options, prepare_prompt
from gemma_mlx.generate import _check_length as clipped_to_context  # stream_generate's own rule
from gemma_mlx.media.prompt import PreparedPrompt
from gemma_mlx.options import check_callable, check_int
from gemma_mlx.pooled_cache import CachePool, is_pooled
from gemma_mlx.prompt_cache import PromptCache
from gemma_mlx.sample import FilteredSampler, greedy, make_logits_processors, make_sampler
from gemma_mlx.speculative import Drafter, check_trimmable

# (request id, tokens, caches): see `BatchScheduler`'s hooks.
CacheHook = Callable[[int, list[int], list], None]
# Options of `stream_generate` that belong to the scheduler, not to one request.
ENGINE_OPTIONS = ("draft", "num_draft", "token_generator", "prefill_step_size", "prompt_progress")
# Options of `stream_generate` for multimodal prompts, which the batched pass does not take.
MEDIA_OPTIONS = ("images", "audio")


@dataclass
class BatchCounters:
    """Work done so far: prompt tokens prefilled and the seconds of the steps that prefilled,
    tokens generated, and the tokens and seconds of the steps that only decoded."""

    prompt_tokens: int = 0
    prompt_time: float = 0.0
    generated_tokens: int = 0
    decode_tokens: int = 0
    decode_time: float = 0.0


class BatchScheduler:
    """Runs many generations through one batched forward pass per step (see the module docstring).

    `draft`/`num_draft`: speculative decoding for every request that can use it (greedy or the
    built-in sampler): `draft` as in `stream_generate` (a drafter model or path, "prompt-lookup",
    "auto"), or a function making each request's drafter from its prompt ids; "auto" draft
    lengths are planned for the whole batch (`gemma_mlx.batching.speculation`).
    `kv_budget`: the most bytes the running requests' caches and one pass's activations may
    take together (`memory_needed`; default: half of the memory beside the weights).
    `max_batch`: the most requests running at once. `on_prefilled(uid, tokens, cache)` is called
    when a request's caches hold its prompt but the last token, `on_retired(uid, tokens, cache)`
    when it leaves (`tokens`: prompt and generated; the caches hold the first
    `cache[0].offset`): a server's prefix cache stores snapshots there. Call every method from
    one thread (the one that runs MLX); `cancel` from any.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch: int = 32,
        kv_budget: int | None = None,
        prefill_step_size: int | None = None,
        draft: Any = None,
        num_draft: int | str = "auto",
        model_path: Any = None,
        on_prefilled: CacheHook | None = None,
        on_retired: CacheHook | None = None,
    ):
        if not callable(getattr(model, "batched", None)):
            raise OptionTypeError(
                f"continuous batching needs a gemma_mlx model (one with `batched`), got "
                f"{type(model).__name__}"
            )
        self.model = model
        self.on_prefilled = check_callable("on_prefilled", on_prefilled)
        self.on_retired = check_callable("on_retired", on_retired)
        self.tokenizer = tokenizer
        self.max_batch = check_int("max_batch", max_batch, minimum=1)
        self.chunk = check_int(
            "prefill_step_size", prefill_step_size or default_prefill_step_size(), minimum=1
        )
        self.model_path = model_path if model_path is not None else getattr(model, "path", None)
        self.make_drafter = self._drafter_factory(draft)
        self.planner = None if self.make_drafter is None else draft_planner(num_draft)
        self.max_trim = max(DEFAULT_MAX_TRIM, self.planner.max_draft if self.planner else 0)
        self.kv_budget = (
            default_budget(model) if kv_budget is None else check_int("kv_budget", kv_budget)
        )
        self.waiting: deque[BatchSequence] = deque()
        self.active: list[BatchSequence] = []
        self._uids = itertools.count()
        self._by_uid: dict[int, BatchSequence] = {}
        self.counters = BatchCounters()
        self.pool = CachePool()
        self._inflight: Pass | None = None  # queued, its tokens not read yet
        self._last_read = 0.0  # when a pass's tokens were last read

    # --- requests -------------------------------------------------------------------------

    def submit(self, prompt: Any, max_tokens: int = 256, **options: Any) -> int:
        """Queue a request; returns its id. `prompt` and `options` are `stream_generate`'s (but
        the engine options: drafting and prefill chunks are set on the scheduler); every option
        is checked here, so a bad request fails before it runs."""
        for name in ENGINE_OPTIONS:
            if name in options:
                raise OptionError(f"{name} is an option of the batch scheduler, not of a request")
        for name in MEDIA_OPTIONS:
            if options.get(name) is not None:
                raise OptionError(f"{name}: continuous batching takes text prompts only")
        from_file = isinstance(options.get("prompt_cache"), PromptCache)
        if options.get("max_kv_size") is not None or from_file:  # the batch attends whole caches
            raise OptionError("max_kv_size and prompt-cache files are for stream_generate only")
        check_generation_options(self.model, {"max_tokens": max_tokens, **options})
        ids = self._prompt_ids(prompt, options)
        max_tokens = clipped_to_context(self.model, len(ids), max_tokens)
        sampler = options.get("sampler") or make_sampler(
            options.get("temp", 0.0),
            top_p=options.get("top_p", 1.0),
            min_p=options.get("min_p", 0.0),
            top_k=options.get("top_k", 0),
            seed=options.get("seed"),
        )
        processors = options.get("logits_processors")
        if processors is None:
            processors = make_logits_processors(
                options.get("logit_bias"),
                options.get("repetition_penalty"),
                options.get("repetition_context_size", 20),
                self.tokenizer.vocab_size,
            )
        cache = options.get("prompt_cache")
        if cache is None:
            cache = self.model.make_cache(max_trim=self.max_trim)
        quantize_caches(cache, kv_quantization_of(options))
        uid = next(self._uids)
        kv_bytes = sequence_kv_bytes(
            self.model, len(ids) + max_tokens, self.max_trim, self.chunk, held_quantization(cache)
        )
        sequence = BatchSequence(
            uid, self.model, self.tokenizer, ids, cache, max_tokens, sampler, processors,
            options.get("stop", ()), kv_bytes,
        )  # fmt: skip
        needs = self.memory_needed([sequence])
        if needs > self.kv_budget:
            raise OptionError(
                f"request {uid} ({len(ids)} prompt tokens, max_tokens {max_tokens}) needs up to "
                f"{needs / 2**20:.1f} MiB for its KV cache and a pass, more than kv_budget "
                f"({self.kv_budget / 2**20:.1f} MiB) even alone: use a quantized KV cache "
                "(kv_bits), a shorter prompt or fewer max_tokens, or a larger kv_budget"
            )
        sequence.draft = self._draft_for(sequence, options.get("seed"))
        self.waiting.append(sequence)
        self._by_uid[uid] = sequence
        return uid

    def _prompt_ids(self, prompt: Any, options: dict[str, Any]) -> list[int]:
        """The prompt's token ids. Media are encoded and prefilled outside the batch (the batched
        pass takes token ids): a `PreparedPrompt` with media joins once `prompt_cache` holds
        them; any other prompt must be text only."""
        if isinstance(prompt, PreparedPrompt) and prompt.media is not None:
            cache = options.get("prompt_cache")
            held = cache[0].offset if cache else 0
            positions = prompt.media.positions
            if len(positions) and held <= int(positions[-1]):
                raise OptionError(
                    "prompt: a prompt with images or audio joins the batch once prompt_cache "
                    f"holds its media (it holds {held} tokens; the last soft token is at "
                    f"{int(positions[-1])})"
                )
            return list(prompt.tokens)
        kwargs = options.get("chat_template_kwargs")
        prepared = prepare_prompt(self.model, self.tokenizer, prompt, chat_template_kwargs=kwargs)
        if prepared.media is not None:
            raise OptionError("prompt: continuous batching takes text prompts only")
        return prepared.tokens

    def cancel(self, uid: int) -> None:
        """Stop a request; it leaves before the next step (safe to call from another thread)."""
        sequence = self._by_uid.get(uid)
        if sequence is not None:
            sequence.cancelled = True

    def memory_needed(
        self, sequences: list[BatchSequence], joining: Sequence[BatchSequence] = ()
    ) -> int:
        """The most bytes `sequences` can take running together: their caches at their final
        capacity (the pooled ones, and `joining`, as the pool holds them) and one pass over all
        of them (a prefill chunk, every decode and draft row)."""
        rows = len(sequences) * (1 + (self.planner.max_draft if self.planner else 0))
        longest = max(len(s.prompt) + s.max_tokens for s in sequences) + self.max_trim
        activations = pass_activation_bytes(self.model, self.chunk + rows, rows, longest)
        pooled = [s for s in sequences if _pooled(s) or any(s is j for j in joining)]
        own = sum(s.kv_bytes for s in sequences if s not in pooled)
        if pooled:
            positions = max(len(s.prompt) + s.max_tokens for s in pooled) + 1
            own += pooled_kv_bytes(self.model, len(pooled), positions, self.max_trim)
        return own + activations

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.active or self._inflight)

    def _drafter_factory(self, draft: Any) -> Callable[[list[int]], Drafter] | None:
        """A function making each request's drafter (prompt ids -> drafter), or None when
        `draft` asks for none ("auto" without an assistant beside the model)."""
        if draft is None:
            return None
        if all(hasattr(draft, m) for m in ("prefill", "propose", "commit")):
            raise OptionError(
                "draft: a drafter object holds one sequence's state; give the batch a function "
                "that makes one per request (prompt token ids -> drafter)"
            )
        if callable(draft) and not isinstance(draft, nn.Module):
            return draft
        if make_drafter(draft, self.model, self.model_path) is None:  # checks and loads it once
            return None
        return lambda _ids: make_drafter(draft, self.model, self.model_path)

    def _draft_for(self, sequence: BatchSequence, seed: int | None) -> SequenceDraft | None:
        """A drafter for a request that can draft exactly: greedy or the built-in sampler."""
        sampler = sequence.sampler
        if self.planner is None or not (sampler is greedy or isinstance(sampler, FilteredSampler)):
            return None
        check_trimmable(sequence.cache, self.planner.max_draft)
        drafter = self.make_drafter(list(sequence.prompt))
        sampling = None if sampler is greedy else sampler
        return SequenceDraft(drafter, self.model, sequence.cache, sequence.tokens, sampling, seed)

    # --- steps ----------------------------------------------------------------------------

    def run(self) -> Iterator[tuple[int, GenerationResponse]]:
        """Step until every request is done, yielding (request id, response) as they come."""
        while self.has_work:
            yield from self.step()

    def step(self) -> list[tuple[int, GenerationResponse]]:
        """One batched forward pass over every running request (see the module docstring);
        returns the responses of the pass that completed in this call.

        Without drafts the passes are pipelined like `gemma_mlx.decode.generate_tokens`: the
        next pass is queued (its inputs the previous pass's lazy tokens) before the previous
        one's tokens are read, so building a pass overlaps computing the last. A sequence that
        ends (end of turn, stop string) is then computed one step too far, and that step
        dropped. A verify needs its result before the next pass, so with drafts each pass is
        read before the next is built."""
        self._retire()
        self._admit()
        self._pool()
        out = []
        if self._inflight is not None and not self._pipelined:
            out += self._finish(self._inflight)
            self._inflight = None
            self._retire()
        launched = self._launch()
        if self._inflight is not None:
            out += self._finish(self._inflight)
        self._inflight = launched
        if launched is not None and not self._pipelined:
            out += self._finish(launched)
            self._inflight = None
        self._retire()
        return out

    @property
    def _pipelined(self) -> bool:
        return all(s.draft is None for s in self.active)

    def _launch(self) -> Pass | None:
        """Build the next pass over every running sequence and queue it (no host sync)."""
        decoding = [s for s in self.active if not s.prefilling and s.unscheduled > 0]
        decoding.sort(key=_slot_order)  # pooled rows first, in slot order: one write for all
        decode_feeds = self._decode_feeds(decoding)
        prefill_feeds = self._prefill_feeds()
        feeds = decode_feeds + prefill_feeds  # kept rows (decoding ones) first, in this order
        if not feeds:
            return None
        start = time.perf_counter()
        inputs = pass_inputs(feeds)
        logits, hidden = self.model.batched(inputs, [f.segment for f in feeds], return_hidden=True)
        choices = choose(decode_feeds, logits)
        for f in prefill_feeds:
            f.sequence.prefilled_chunk(f.tokens.shape[0])  # this pass writes them
            if self.on_prefilled is not None and not f.sequence.prefilling:
                self.on_prefilled(f.sequence.uid, f.sequence.prompt[:-1], f.sequence.cache)
        for choice in choices:
            choice.feed.sequence.scheduled(choice if choice.feed.proposal is None else None)
        written = [c.state for f in prefill_feeds for c in f.sequence.cache]
        mx.async_eval(value_arrays(choices), written)
        return Pass(decode_feeds, prefill_feeds, written, choices, hidden, inputs.shape[0], start)

    def _finish(self, done: Pass) -> list[tuple[int, GenerationResponse]]:
        """Read a pass's tokens (the one host sync of a step) and hand them out."""
        if not done.choices:
            mx.eval(done.written)
        out = []
        for choice, values in zip(done.choices, read(done.choices), strict=True):
            s = choice.feed.sequence
            s.unschedule(choice)
            if not s.finished:  # else it ended (or was cancelled) while this pass ran
                out += commit(choice, values, done.hidden)
        now = time.perf_counter()
        seconds = now - max(done.start, self._last_read)  # passes overlap: count each second once
        self._last_read = now
        prefilled = sum(f.tokens.shape[0] for f in done.prefill_feeds)
        self._count(out, prefilled, seconds)
        if self.planner is not None and done.decode_feeds and not prefilled:
            self.planner.observe(done.rows, seconds)
        return out

    def _count(self, out: list, prefilled: int, seconds: float) -> None:
        counters = self.counters
        counters.generated_tokens += len(out)
        if prefilled:
            counters.prompt_tokens += prefilled
            counters.prompt_time += seconds
        else:
            counters.decode_tokens += len(out)
            counters.decode_time += seconds

    def _decode_feeds(self, decoding: list[BatchSequence]) -> list[Feed]:
        """The newest token of every decoding sequence, and the drafts the planner grants."""
        ready = [s for s in decoding if s.draft is not None and s.draft.ready and s.unscheduled > 1]
        ks = dict.fromkeys(map(id, decoding), 0)
        if ready:
            plan = self.planner.plan(
                [s.draft.alpha for s in ready], [s.unscheduled - 1 for s in ready], len(decoding)
            )
            ks.update(zip(map(id, ready), plan, strict=True))
        feeds = []
        for s in decoding:
            if s.pending is not None:  # the token the queued pass chooses
                history = list(s.tokens) if s.processors else None
                after = (s.pending.values, s.pending.at)
                feeds.append(Feed(s, s.pending.result, history=history, after=after))
                continue
            last = mx.array(s.tokens[-1:], dtype=mx.int32)
            history = s.tokens[:-1] if s.processors else None
            if s.draft is None:
                feeds.append(Feed(s, last, history=history))
            else:
                proposal = s.draft.propose(ks[id(s)])
                inputs = mx.concatenate([last, proposal.tokens])
                feeds.append(Feed(s, inputs, proposal=proposal, history=history))
        return feeds

    def _prefill_feeds(self) -> list[Feed]:
        budget, feeds = self.chunk, []
        for s in self.active:
            if budget == 0:
                break
            if s.prefilling:
                chunk = s.prefill_chunk(budget)
                feeds.append(Feed(s, mx.array(chunk, dtype=mx.int32), prefill=True))
                budget -= len(chunk)
        return feeds

    def _admit(self) -> None:
        while self.waiting and len(self.active) < self.max_batch:
            head = self.waiting[0]
            if not head.cancelled and self.memory_needed([*self.active, head]) > self.kv_budget:
                return
            self.waiting.popleft()
            if head.cancelled:
                self._forget(head)
            else:
                self.active.append(head)

    def _pool(self) -> None:
        """Move prefilled sequences that decode without drafts into the pool, while the budget
        holds it."""
        joining: list[BatchSequence] = []
        for s in self.active:
            if (
                s.draft is None
                and not s.prefilling
                and not _pooled(s)
                and self.pool.accepts(s.cache)
                and self.memory_needed(self.active, joining=[*joining, s]) <= self.kv_budget
            ):
                joining.append(s)
        if joining:
            pooled = self.pool.join([s.cache for s in joining])
            for s, cache in zip(joining, pooled, strict=True):
                s.cache = cache

    def _retire(self) -> None:
        done = [s for s in self.active if s.finished]
        leaving = [s.cache for s in done if _pooled(s)]
        for s in done:
            self.active.remove(s)
            if _pooled(s):  # caches of its own only for the hook that keeps them
                s.cache = self.pool.own_caches(s.cache) if self.on_retired is not None else []
            self._forget(s)
        if leaving:
            self.pool.remove(leaving)

    def _forget(self, sequence: BatchSequence) -> None:
        if self.on_retired is not None:
            self.on_retired(sequence.uid, list(sequence.tokens), sequence.cache)
        sequence.close()
        self._by_uid.pop(sequence.uid, None)


def _pooled(sequence: BatchSequence) -> bool:
    return is_pooled(sequence.cache)


def _slot_order(sequence: BatchSequence) -> tuple[int, int]:
    return (0, sequence.cache[0].slot.index) if _pooled(sequence) else (1, 0)
