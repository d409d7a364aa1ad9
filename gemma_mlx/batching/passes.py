"""The passes of the batch scheduler: what each sequence feeds, what its rows decide, and
handing the decision back to the sequence.

A `Pass` is one batched forward pass: its `Feed`s (a sequence's prefill chunk, or its newest
token and drafts) and, for every decoding sequence, a lazy `Choice`: its token (its logits
processors, then its sampler; greedy rows in one argmax), or the verify of its drafts. `commit`
reads a choice's values into the sequence: its tokens, and after a verify the rollback of its
caches and the update of its drafter.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from gemma_mlx.batching.sequence import BatchSequence
from gemma_mlx.decode import TokenStep, log_softmax
from gemma_mlx.generate import GenerationResponse
from gemma_mlx.ragged import Segment
from gemma_mlx.speculative import Proposal


@dataclass
class Feed:
    """A sequence's rows in a step's pass: a prefill chunk, or its newest token and drafts."""

    sequence: BatchSequence
    tokens: mx.array
    prefill: bool = False
    proposal: Proposal | None = None  # drafting sequences (possibly no drafts)
    history: list[int] | None = None  # decoding: the committed tokens before `tokens`

    @property
    def segment(self) -> Segment:
        n = self.tokens.shape[0]
        return Segment(self.sequence.cache, n, 0 if self.prefill else n)


@dataclass
class Pass:
    """A launched forward pass: its feeds, what it decides (lazy), when it was launched."""

    decode_feeds: list[Feed]
    prefill_feeds: list[Feed]
    written: list  # the cache arrays its prefill chunks write
    choices: list[Choice]
    hidden: mx.array
    rows: int
    start: float


@dataclass
class Choice:
    """What a decoding sequence's rows decide, lazily: `result` is [token] for plain decoding,
    [accepted, *drafts, token] for a verify; `logprobs` [rows, V] of the processed logits."""

    feed: Feed
    first_row: int
    logprobs: mx.array
    result: mx.array


def choose(feeds: list[Feed], logits: mx.array) -> list[Choice]:
    """Each decoding sequence's token (its processors, then its sampler; greedy rows in one
    argmax of their logits), or its verify of its drafts."""
    choices, plain, row = [], [], 0
    for f in feeds:
        rows = logits[row : row + f.tokens.shape[0]]
        s = f.sequence
        processed = s.processed(rows, f.history, f.tokens)
        if f.proposal is None:
            plain.append((f, row, processed))
        else:
            result = s.draft.verify(processed, f.proposal)
            choices.append(Choice(f, row, log_softmax(processed), result))
        row += f.tokens.shape[0]
    if plain:
        if len(plain) == len(feeds) == logits.shape[0] and not any(
            f.sequence.processors for f, _, _ in plain
        ):
            stacked = logits  # every row, one per sequence, as the model gave it
        else:
            stacked = mx.concatenate([p for _, _, p in plain])
        logprobs = log_softmax(stacked)  # lazy for greedy rows: see `decode.pick`
        best = mx.argmax(stacked, axis=-1).astype(mx.int32)
        for i, (f, first_row, _) in enumerate(plain):
            lp = logprobs[i : i + 1]
            s = f.sequence
            token = best[i : i + 1] if s.is_greedy else s.sampler(lp).astype(mx.int32)
            choices.append(Choice(f, first_row, lp, token))
    return choices


def commit(
    choice: Choice, values: list[int], hidden: mx.array
) -> list[tuple[int, GenerationResponse]]:
    """Hand a sequence its new tokens; after a verify, trim its caches by the rejected
    drafts and update its drafter."""
    s = choice.feed.sequence
    proposal = choice.feed.proposal
    if proposal is None:
        steps = [TokenStep(values[0], choice.logprobs[0])]
        return [(s.uid, r) for r in s.commit(steps)]
    k, n = proposal.tokens.shape[0], values[0]
    for c in s.cache:
        c.trim(k - n)
    new_tokens = [*values[1 : 1 + n], values[-1]]
    steps = [TokenStep(t, choice.logprobs[i], i < n) for i, t in enumerate(new_tokens)]
    responses = s.commit(steps)
    if not s.finished:
        row = choice.first_row + n
        s.draft.commit(k, n, hidden[row : row + 1])
    return [(s.uid, r) for r in responses]
