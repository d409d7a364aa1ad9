"""One request inside a batch: its caches, its committed tokens, how its next token is chosen, and
the text the tokens make.

The text side is `gemma_mlx.generate.stream_generate` itself, fed one `TokenStep` at a time: the
detokenizer, stop strings, end-of-turn tokens, `max_tokens` and every response field are exactly
what `gemma_mlx.generate` gives for the same prompt and options. The token side mirrors
`gemma_mlx.decode.generate_tokens`: the prompt but its last token is prefilled (here in chunks the
scheduler hands out), then each step feeds the newest token; logits processors see every
committed token, the sampler the log-probabilities of the processed logits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import mlx.core as mx

from gemma_mlx.batching.speculation import SequenceDraft
from gemma_mlx.decode import TokenStep
from gemma_mlx.errors import PromptError
from gemma_mlx.generate import GenerationResponse, stream_generate
from gemma_mlx.media.prompt import PreparedPrompt
from gemma_mlx.sample import LogitsProcessor, Sampler, greedy


class BatchSequence:
    """A request's state in the scheduler (`gemma_mlx.batching.scheduler`)."""

    def __init__(
        self,
        uid: int,
        model: Any,
        tokenizer: Any,
        ids: list[int],
        cache: list,
        max_tokens: int,
        sampler: Sampler,
        processors: Sequence[LogitsProcessor],
        stop: str | Sequence[str],
        kv_bytes: int,
    ):
        done = cache[0].offset if cache else 0
        if not 0 <= done < len(ids):
            raise PromptError(
                f"the cache holds {done} tokens; the prompt must extend it ({len(ids)} tokens)"
            )
        self.uid = uid
        self.prompt = ids
        self.cache = cache
        self.max_tokens = max_tokens
        self.sampler = sampler
        self.processors = list(processors)
        self.draft: SequenceDraft | None = None  # set by the scheduler when it speculates
        self.kv_bytes = kv_bytes
        self.tokens = list(ids)  # committed: the prompt, then every generated token
        self.prefilled = done  # prompt tokens in the caches while prefilling
        self.produced = 0
        self.in_flight = 0  # queued passes that decide its tokens, not read yet
        self.pending: Any = None  # the last of them's `Choice` of its token (plain decoding)
        self.cancelled = False
        self.finish_reason: str | None = None
        self._pending: deque[TokenStep] = deque()
        self._responses = stream_generate(
            model,
            tokenizer,
            PreparedPrompt(ids),  # rendered and checked by the scheduler, media already in cache
            max_tokens,
            sampler=sampler,
            logits_processors=self.processors,
            stop=stop,
            token_generator=self._feed,
        )

    # --- what the next pass feeds ---------------------------------------------------------

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt) - 1

    def prefill_chunk(self, budget: int) -> list[int]:
        """The next at most `budget` prompt tokens to write into the caches (none of the
        prompt's last token, which the first decoding step feeds)."""
        end = min(self.prefilled + budget, len(self.prompt) - 1)
        return self.prompt[self.prefilled : end]

    def prefilled_chunk(self, n: int) -> None:
        self.prefilled += n

    @property
    def unscheduled(self) -> int:
        """Tokens it may still generate beyond those of queued passes."""
        return self.max_tokens - self.produced - self.in_flight

    def scheduled(self, choice: Any) -> None:
        """A pass that decides its next token was queued; `choice` is its (lazy) choice of that
        token when the next pass may take it as input before it is read (plain decoding), else
        None."""
        self.in_flight += 1
        self.pending = choice

    def unschedule(self, choice: Any) -> None:
        """The pass that made `choice` was read."""
        self.in_flight -= 1
        if self.pending is choice:
            self.pending = None

    @property
    def is_greedy(self) -> bool:
        return self.sampler is greedy

    # --- choosing tokens ------------------------------------------------------------------

    def processed(self, logits: mx.array, history: list[int], inputs: mx.array) -> mx.array:
        """Its logits processors applied to each row of `logits` [n, V]: row i follows the
        committed tokens `history` and `inputs[: i + 1]` (the pass's inputs: the newest token,
        then any drafts)."""
        if not self.processors:
            return logits
        rows = []
        committed = mx.array(history, dtype=mx.int32)
        for i in range(logits.shape[0]):
            row = logits[i : i + 1]
            seen = mx.concatenate([committed, inputs[: i + 1]])
            for processor in self.processors:
                row = processor(seen, row)
            rows.append(row)
        return mx.concatenate(rows)

    # --- what the pass produced -------------------------------------------------------------

    def commit(self, steps: list[TokenStep]) -> list[GenerationResponse]:
        """Hand the new tokens to the text side; returns one response per token it took (fewer
        when it finished: end of turn, stop string or length)."""
        self.tokens.extend(step.token for step in steps)
        self.produced += len(steps)
        responses = []
        for step in steps:
            self._pending.append(step)
            response = next(self._responses)
            responses.append(response)
            if response.finish_reason is not None:
                self.finish_reason = response.finish_reason
                break
        return responses

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def close(self) -> None:
        """Stop the text side and let go of the caches."""
        self._responses.close()
        self.cache = []
        if self.draft is not None:
            self.draft.close()

    def _feed(self, *_generate_tokens_arguments: Any) -> Iterator[TokenStep]:
        """The token generator `stream_generate` pulls from: the steps `commit` queued."""
        while True:
            yield self._pending.popleft()
