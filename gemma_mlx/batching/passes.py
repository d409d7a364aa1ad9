"""The passes of the batch scheduler: what each sequence feeds, what its rows decide, and
handing the decision back to the sequence.

A `Pass` is one batched forward pass: its `Feed`s (a sequence's prefill chunk, or its newest
token and drafts) and, for every decoding sequence, a lazy `Choice`: its token (its logits
processors, then its sampler; greedy rows in one argmax), or the verify of its drafts. `read`
brings every choice of a pass to the host at once; `commit` hands a choice's values to the
sequence: its tokens, and after a verify the rollback of its caches and the update of its
drafter. `pass_inputs` feeds a queued pass's tokens to the next one without reading them.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from gemma_mlx.batching.sequence import BatchSequence
from gemma_mlx.decode import TokenStep, log_softmax, pick
from gemma_mlx.generate import GenerationResponse
from gemma_mlx.ragged import Segment
from gemma_mlx.sample import greedy
from gemma_mlx.speculative import Proposal


@dataclass
class Feed:
    """A sequence's rows in a step's pass: a prefill chunk, or its newest token and drafts."""

    sequence: BatchSequence
    tokens: mx.array
    prefill: bool = False
    proposal: Proposal | None = None  # drafting sequences (possibly no drafts)
    history: list[int] | None = None  # decoding with processors: committed tokens before these
    # `tokens` is row i of (array, i), the tokens a queued pass chooses, not read yet. The
    # array, not that pass's `Choice`: a choice holds its feed, so feeds holding choices would
    # chain every pass (and its logits) to the next.
    after: tuple[mx.array, int] | None = None

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
    [accepted, *drafts, token] for a verify; `logprobs` [rows, V] of the processed logits.
    The plain choices of a pass share one array of tokens and one of log-probabilities
    (`values` and `logprobs`, theirs at row `at`), so that the pass is read, and the next one
    fed, without a slice per sequence."""

    feed: Feed
    first_row: int
    logprobs: mx.array
    values: mx.array
    at: int = 0
    size: int = 1

    @property
    def result(self) -> mx.array:
        if self.at == 0 and self.size == self.values.shape[0]:
            return self.values
        return self.values[self.at : self.at + self.size]


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
            choices.append(Choice(f, row, log_softmax(processed), result, size=result.shape[0]))
        row += f.tokens.shape[0]
    if plain:
        if len(plain) == len(feeds) == logits.shape[0] and not any(
            f.sequence.processors for f, _, _ in plain
        ):
            stacked = logits  # every row, one per sequence, as the model gave it
        else:
            stacked = mx.concatenate([p for _, _, p in plain])
        tokens, logprobs = pick(greedy, stacked)  # the other rows sample from `logprobs`
        tokens = tokens.astype(mx.int32)
        if not all(f.sequence.is_greedy for f, _, _ in plain):
            tokens = mx.concatenate(
                [
                    tokens[i : i + 1]
                    if f.sequence.is_greedy
                    else f.sequence.sampler(logprobs[i : i + 1]).astype(mx.int32)
                    for i, (f, _, _) in enumerate(plain)
                ]
            )
        for i, (f, first_row, _) in enumerate(plain):
            choices.append(Choice(f, first_row, logprobs, tokens, at=i))
    return choices


def value_arrays(choices: list[Choice]) -> list[mx.array]:
    """The arrays holding the choices' values, each once."""
    return list({id(c.values): c.values for c in choices}.values())


def read(choices: list[Choice]) -> list[list[int]]:
    """Every choice's values, with one host synchronization (none without choices)."""
    arrays = value_arrays(choices)
    if not arrays:
        return []
    flat = (arrays[0] if len(arrays) == 1 else mx.concatenate(arrays)).tolist()
    starts, start = {}, 0
    for a in arrays:
        starts[id(a)] = start
        start += a.shape[0]
    offsets = [starts[id(c.values)] + c.at for c in choices]
    return [flat[o : o + c.size] for o, c in zip(offsets, choices, strict=True)]


def pass_inputs(feeds: list[Feed]) -> mx.array:
    """The tokens a pass feeds [rows]: when every row is the token a queued pass chooses, in
    the order it chose them, that pass's own array of tokens (no slices, no concatenation)."""
    first = feeds[0].after
    if first is not None and len(feeds) == first[0].shape[0]:
        values = first[0]
        if all(f.after is not None and f.after[0] is values and f.after[1] == i
               for i, f in enumerate(feeds)):  # fmt: skip
            return values
    return mx.concatenate([f.tokens for f in feeds])


def commit(
    choice: Choice, values: list[int], hidden: mx.array
) -> list[tuple[int, GenerationResponse]]:
    """Hand a sequence its new tokens; after a verify, trim its caches by the rejected
    drafts and update its drafter."""
    s = choice.feed.sequence
    proposal = choice.feed.proposal
    if proposal is None:
        steps = [TokenStep(values[0], choice.logprobs[choice.at])]
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
