"""Drafters for the speculative loop (`gemma_mlx.speculative`): a Gemma 4 MTP assistant, a separate small model, prompt lookup.

- `AssistantDrafter`: the assistant's queries attend to the target's own K/V (the last non-KV-shared
  target layer of each type), read from the target caches after they were trimmed to the committed
  tokens, so a rejected draft's K/V is never seen. Its query stands in for the newest token (not yet
  in the caches) at that token's position L (transformers' convention; mlx-vlm uses L - 1, equally
  lossless): full layers see positions [0, L), sliding layers the ones the target's own query at L
  sees, [L - W + 1, L).
- `ModelDrafter`: any causal LM with the target's vocabulary (e.g. E2B drafting for 31B) decoding
  ahead on its own cache, trimmed back to the accepted tokens after each round.
- `PromptLookupDrafter`: continues the most recent earlier occurrence of the context's last n-gram;
  free to run, good on code, edits and repetitive text.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from gemma_mlx.cache import positions_from
from gemma_mlx.decode import TokenStep, default_prefill_step_size, generate_tokens, prefill
from gemma_mlx.distributed.stage import PipelineModel
from gemma_mlx.models import gemma4_assistant
from gemma_mlx.models.gemma4_assistant import kv_producers
from gemma_mlx.sample import FilteredSampler, OptionError, Sampler, greedy
from gemma_mlx.speculative import (
    MAX_ADAPTIVE_DRAFT,
    DraftContext,
    Drafter,
    Proposal,
    SpeculationStats,
    check_trimmable,
    speculative_tokens,
)


def pick(
    logits: mx.array, ids: mx.array | None, sampling: FilteredSampler | None, vocab: int
) -> tuple[mx.array, mx.array | None]:
    """A draft token from one row of head scores, and the float32 [V] distribution it was drawn
    from: the target's filters applied to the drafter's scores (any draft distribution keeps
    rejection sampling exact; the same filters keep drafts where the target's mass is).

    `ids` maps the scores to token ids (a centroid head scores a subset); greedy when `sampling`
    is None.
    """
    if sampling is None:
        best = mx.argmax(logits, axis=-1)
        return (best if ids is None else ids[best]).astype(mx.int32), None
    probs = sampling.distribution(logits[None])[0]
    choice = mx.random.categorical(mx.log(probs), key=sampling.next_key())
    if ids is None:
        return choice.astype(mx.int32), probs
    return ids[choice].astype(mx.int32), mx.zeros((vocab,), mx.float32).at[ids].add(probs)


def committed_kv(cache, window: int | None) -> tuple[mx.array, mx.array]:
    """K/V of a target cache that a query at position `cache.offset` attends (window: sliding)."""
    keys, values = cache.fetch()
    first_stored = cache.offset - keys.shape[2]
    first = 0 if window is None else max(0, cache.offset - window + 1)
    return positions_from(keys, first - first_stored), positions_from(values, first - first_stored)


class AssistantDrafter:
    """Drafts with a Gemma 4 assistant (`gemma_mlx.models.gemma4_assistant.Model`)."""

    def __init__(self, assistant: gemma4_assistant.Model, target: nn.Module):
        self.assistant = assistant
        self.target = target
        self.producers = kv_producers(target.args)
        self._check_compatible()

    def _check_compatible(self) -> None:
        draft, target = self.assistant.args, self.target.args
        problems = []
        if draft.backbone_hidden_size != target.hidden_size:
            problems.append(
                f"backbone_hidden_size {draft.backbone_hidden_size} != target hidden_size "
                f"{target.hidden_size}"
            )
        if draft.text.vocab_size != target.vocab_size:
            problems.append(f"vocab_size {draft.text.vocab_size} != target {target.vocab_size}")
        for i, layer_type in enumerate(draft.text.layer_types):
            producer = self.producers.get(layer_type)
            if producer is None:
                problems.append(f"layer {i} is {layer_type}, the target has no such layer")
                continue
            ours = (draft.text.layer_head_dim(i), draft.text.n_kv_heads(i))
            theirs = (target.layer_head_dim(producer), target.n_kv_heads(producer))
            if ours != theirs:
                problems.append(
                    f"layer {i} ({layer_type}) has head_dim/KV heads {ours}, target layer "
                    f"{producer} has {theirs}"
                )
        if problems:
            raise ValueError("draft model does not fit the target: " + "; ".join(problems))

    def prefill(self, context: DraftContext) -> None:
        pass

    def propose(self, context: DraftContext, k: int) -> Proposal:
        window = self.target.args.sliding_window
        shared = {
            t: committed_kv(context.cache[i], window if self.target.args.is_sliding(i) else None)
            for t, i in self.producers.items()
        }
        position = context.cache[0].offset
        embed = self.target.model.embed
        x = embed(mx.array([[context.tokens[-1]]], mx.int32))
        h = context.hidden
        tokens, probs = [], []
        for _ in range(k):
            z, h = self.assistant(x, h, shared, position)
            if context.sampling is None:
                token, q = self.assistant.greedy_token(z)[0, 0], None
            else:
                ids, logits = self.assistant.head(z)
                token, q = pick(
                    logits[0, 0],
                    None if ids is None else ids[0, 0],
                    context.sampling,
                    self.target.args.vocab_size,
                )
            tokens.append(token)
            probs.append(q)
            x = embed(token.reshape(1, 1))
        return _proposal(tokens, probs)

    def commit(self, context: DraftContext, k: int, accepted: int) -> None:
        pass


class ModelDrafter:
    """Drafts by decoding greedily (or sampling) with a separate model over the same vocabulary."""

    def __init__(self, draft_model: nn.Module, max_draft: int = MAX_ADAPTIVE_DRAFT):
        self.model = draft_model
        self.max_draft = max_draft
        self.cache: list | None = None
        self.held = 0  # committed tokens in self.cache

    def prefill(self, context: DraftContext) -> None:
        vocab = self.model.args.vocab_size
        if vocab != context.model.args.vocab_size:
            raise ValueError(
                f"draft model vocabulary ({vocab}) differs from the target's "
                f"({context.model.args.vocab_size})"
            )
        self.cache = self.model.make_cache(max_trim=self.max_draft)
        check_trimmable(self.cache, self.max_draft)
        prefill(self.model, self.cache, context.tokens[:-1], default_prefill_step_size())
        self.held = len(context.tokens) - 1

    def propose(self, context: DraftContext, k: int) -> Proposal:
        k = min(k, self.max_draft)
        pending = mx.array(context.tokens[self.held :], mx.int32)[None]
        logits = self.model(pending, self.cache, logits_to_keep=1)[0, -1]
        tokens, probs = [], []
        for i in range(k):
            token, q = pick(logits, None, context.sampling, logits.shape[-1])
            tokens.append(token)
            probs.append(q)
            if i < k - 1:
                logits = self.model(token.reshape(1, 1), self.cache)[0, -1]
        return _proposal(tokens, probs)

    def commit(self, context: DraftContext, k: int, accepted: int) -> None:
        if k == 0:
            return
        # The cache holds the old committed tokens and drafts 1..k-1; keep the accepted ones.
        kept = min(accepted, k - 1)
        for c in self.cache:
            c.trim(k - 1 - kept)
        self.held = len(context.tokens) - accepted - 1 + kept


class PromptLookupDrafter:
    """Proposes the tokens that followed the latest earlier occurrence of the last n-gram.

    Longer n-grams are tried first (`max_ngram` down to `min_ngram`). An index of every n-gram seen
    makes each lookup O(1).
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(
                f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}"
            )
        self.sizes = range(max_ngram, min_ngram - 1, -1)
        self.follows: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after it
        self.indexed = 0

    def prefill(self, context: DraftContext) -> None:
        self.follows.clear()
        self.indexed = 0

    def propose(self, context: DraftContext, k: int) -> Proposal:
        tokens = context.tokens
        # Index the n-grams that end before the last token: the last one is the query.
        for end in range(self.indexed, len(tokens) - 1):
            for n in self.sizes:
                if end + 1 >= n:
                    self.follows[tuple(tokens[end + 1 - n : end + 1])] = end + 1
        self.indexed = max(self.indexed, len(tokens) - 1)
        for n in self.sizes:
            start = self.follows.get(tuple(tokens[-n:])) if len(tokens) >= n else None
            if start is not None:
                # A match inside the last k tokens means a period: continue it past the end.
                proposal = []
                for i in range(start, start + k):
                    proposal.append(tokens[i] if i < len(tokens) else proposal[i - len(tokens)])
                return Proposal(mx.array(proposal, mx.int32))
        return Proposal.empty()

    def commit(self, context: DraftContext, k: int, accepted: int) -> None:
        pass


def _proposal(tokens: list[mx.array], probs: list[mx.array | None]) -> Proposal:
    if not tokens:
        return Proposal.empty()
    stacked = None if probs[0] is None else mx.stack(probs)
    return Proposal(mx.stack(tokens).reshape(-1), stacked)


def assistant_beside(model_path: str | Path) -> Path | None:
    """The assistant checkpoint of a model directory: `<dir>-assistant` or `<dir>/assistant`."""
    path = Path(model_path)
    for candidate in (path.with_name(path.name + "-assistant"), path / "assistant"):
        if (candidate / "config.json").is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=2)
def _load_draft_model(path: Path) -> nn.Module:
    """Loaded once per process: a chat session drafts with the same model every turn."""
    from gemma_mlx.loading import load_model

    return load_model(path)


def make_drafter(
    draft: str | Path | nn.Module | Drafter | None,
    target: nn.Module,
    model_path: str | Path | None = None,
) -> Drafter | None:
    """Resolve a `draft=` option: None, "prompt-lookup", "auto", a path, a model, or a drafter.

    "auto" is the assistant that sits beside `model_path` (`<dir>-assistant` or `<dir>/assistant`),
    or no drafter when there is none. A path or model is an assistant if its config says so,
    otherwise a separate draft model.
    """
    if draft is None:
        return None
    if isinstance(draft, str) and draft == "prompt-lookup":
        return PromptLookupDrafter()
    if isinstance(draft, str) and draft == "auto":
        found = assistant_beside(model_path) if model_path is not None else None
        return None if found is None else make_drafter(found, target)
    if isinstance(draft, (str, Path)):
        draft = _load_draft_model(Path(draft).resolve())
    if isinstance(draft, gemma4_assistant.Model):
        if isinstance(target, PipelineModel):
            raise OptionError(
                "an MTP assistant reads the target's embedding and KV caches, which a pipeline "
                "spreads over its ranks: use prompt-lookup or a separate draft model"
            )
        return AssistantDrafter(draft, target)
    if isinstance(draft, nn.Module):
        return ModelDrafter(draft)
    if all(hasattr(draft, m) for m in ("prefill", "propose", "commit")):
        return draft
    raise ValueError(f"draft: expected a path, a model, 'prompt-lookup' or 'auto', got {draft!r}")


def sampling_options(sampler: Sampler) -> dict[str, float | int]:
    """The options of a sampler whose distribution rejection sampling reproduces exactly: greedy,
    or the built-in one (temperature, top-k, top-p, min-p)."""
    if sampler is greedy:
        return {"temperature": 0.0}
    if isinstance(sampler, FilteredSampler):
        return {
            "temperature": sampler.temp,
            "top_k": sampler.top_k,
            "top_p": sampler.top_p,
            "min_p": sampler.min_p,
            "seed": sampler.seed,
        }
    raise OptionError("drafting needs the built-in greedy or filtered sampler, not a custom one")


def speculative_steps(
    model: nn.Module,
    prompt: Sequence[int],
    cache: list,
    sampler: Sampler,
    logits_processors: Sequence,
    max_tokens: int,
    prefill_step_size: int | None,
    progress,
    *,
    draft,
    num_draft: int | str,
    stats: SpeculationStats,
    model_path: str | Path | None = None,
) -> Iterator[TokenStep]:
    """`generate_tokens`' arguments plus a `draft=` option (see `make_drafter`): the steps of
    speculative decoding, or plain decoding when "auto" finds no assistant."""
    drafter = make_drafter(draft, model, model_path)
    if drafter is None:
        return generate_tokens(
            model, prompt, cache, sampler, logits_processors, max_tokens, prefill_step_size,
            progress,
        )  # fmt: skip
    return speculative_tokens(
        model, prompt, cache, drafter, num_draft=num_draft,
        **sampling_options(sampler), logits_processors=logits_processors,
        max_tokens=max_tokens, prefill_step_size=prefill_step_size, progress=progress,
        stats=stats,
    )  # fmt: skip
