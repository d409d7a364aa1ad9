"""One rank's part of a pipelined model, called like the whole model on every rank.

Every rank runs the same program (the decoding loop, a speculative loop, `generate`); the model
call is where they meet. Rank 0 embeds the tokens (and computes E2B/E4B's per-layer inputs), each
rank runs its layers with the model's own layer code and sends the hidden states (and the
per-layer inputs the later ranks still need) to the next; the last rank applies the final norm
and the head, and its logits (and hidden states, when asked) reach every rank through one
`all_sum` to which the other ranks add zeros. So every rank returns the same logits, samples the
same token (their random generators are seeded alike at load) and returns the same text.

Each call evaluates its own work under the watchdog's deadline, so a rank that died or hangs ends
the others instead of blocking them. That gives up the overlap of building step n+1 while step n
runs: small beside a multi-Mac step.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from gemma_mlx.cache import (
    DEFAULT_MAX_TRIM,
    KVCache,
    RotatingKVCache,
    attention_mask,
    window_start,
)
from gemma_mlx.distributed.split import Split
from gemma_mlx.distributed.watchdog import Watchdog
from gemma_mlx.errors import GemmaMLXError
from gemma_mlx.models.base import softcap
from gemma_mlx.models.gemma4 import FULL, SLIDING, Model, TextModel


class PipelineError(GemmaMLXError, RuntimeError):
    """A pipeline rank lost a peer, or was asked for something a pipeline cannot do."""


class StopRequested(Exception):
    """Rank 0 asked every rank to end the current generation (its client went away): raised by
    the model call on every rank at the same step."""


class PipelineModel(nn.Module):
    """Layers `split.layers[rank]` of `model`, plus the embedding (rank 0) and the final norm and
    head (last rank); `model(tokens, cache, logits_to_keep, return_hidden)` as `Model`."""

    def __init__(
        self, model: Model, split: Split, group: mx.distributed.Group, watchdog: Watchdog
    ) -> None:
        super().__init__()
        self.args = model.args
        self.model_type = model.model_type
        self.split = split
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.watchdog = watchdog
        self.start, self.end = split.layers[self.rank]
        self.is_first, self.is_last = self.rank == 0, self.rank == self.size - 1
        text = model.model
        self.layers = text.layers[self.start : self.end]
        self.dtype = mx.float32
        # Rank 0 sets it to end the current generation on every rank at the next step that
        # returns logits (`gemma_mlx.distributed.serving`): it travels in the logits' all_sum.
        self.stop_requested = False
        if self.is_first:
            self.embed_tokens = text.embed_tokens
            if self.args.hidden_size_per_layer_input:
                self.embed_tokens_per_layer = text.embed_tokens_per_layer
                self.per_layer_model_projection = text.per_layer_model_projection
                self.per_layer_projection_norm = text.per_layer_projection_norm
        if self.is_last:
            self.norm = text.norm
            if self.args.tie_word_embeddings:
                self.embed_tokens = text.embed_tokens
            else:
                self.lm_head = model.lm_head

    # The model's own helpers, run on this stage's modules of the same names.
    embed = TextModel.embed
    per_layer_inputs = TextModel.per_layer_inputs
    _window = TextModel._window

    @property
    def kv_layers(self) -> range:
        """This rank's layers that own KV (every rank has at least one): its caches."""
        return range(self.start, min(self.end, self.args.first_kv_shared_layer))

    def make_cache(self, max_trim: int = DEFAULT_MAX_TRIM) -> list[KVCache | RotatingKVCache]:
        return [
            RotatingKVCache(self.args.sliding_window, max_trim)
            if self.args.is_sliding(i)
            else KVCache()
            for i in self.kv_layers
        ]

    def rank_0_value(self, value: float) -> float:
        """Rank 0's `value` on every rank (one small `all_sum`): for choices that would otherwise
        differ by rank and change the next step's shape, e.g. the adaptive draft length, which
        each rank would fit to its own clock."""
        mine = mx.array([value if self.is_first else 0.0], mx.float32)
        total = mx.distributed.all_sum(mine, group=self.group)
        self.wait("the other ranks' timing", total)
        return total.item()

    def wait(self, waiting_for: str, *arrays: mx.array) -> None:
        """Evaluate `arrays` (work that waits on other ranks) under the watchdog's deadline; a
        lost peer raises `PipelineError`."""
        with self.watchdog.step(waiting_for):
            try:
                mx.eval(*arrays)
            except RuntimeError as e:
                raise PipelineError(
                    f"pipeline rank {self.rank} of {self.size}: {e} (another rank ended)"
                ) from e

    def batched(self, *_, **__):
        raise PipelineError("batched generation is not available on a pipelined model")

    def __call__(
        self,
        inputs: mx.array,
        cache: list | None = None,
        logits_to_keep: int | None = None,
        return_hidden: bool = False,
    ) -> mx.array | tuple[mx.array, mx.array]:
        """`Model.__call__` across the ranks: every rank returns the same logits (and hidden
        states), evaluated."""
        B, T = inputs.shape
        keep = logits_to_keep
        kept = T if keep is None else len(range(T)[T - keep :])
        h, sent = self._layers(inputs, cache, keep)
        V, H = self.args.vocab_size, self.args.hidden_size
        if self.is_last:
            h = self.norm(h[:, h.shape[1] - keep :] if keep is not None else h)
            logits = self._head(h).astype(self.dtype)
        else:
            logits = mx.zeros((B, kept, V), self.dtype)
            h = mx.zeros((B, kept, H), self.dtype)
        stop = None
        if kept:
            # One collective (two may be evaluated in a different order on each rank): the
            # logits, the hidden states when asked, and rank 0's stop flag.
            flag = mx.full((B, kept, 1), float(self.is_first and self.stop_requested), self.dtype)
            message = mx.concatenate([logits, h, flag] if return_hidden else [logits, flag], -1)
            if sent:  # the zeros go out only after this rank's hidden states did
                message = mx.depends(message, sent)
            message = mx.distributed.all_sum(message, group=self.group)
            logits, stop = message[..., :V], message[0, 0, -1]
            h = message[..., V:-1] if return_hidden else h
        state = [a for c in (cache or []) for a in c.state]
        stops = [] if stop is None else [stop]
        self.wait(f"the pipeline step of {T} token(s)", logits, h, *sent, *state, *stops)
        if stop is not None and stop.item():
            raise StopRequested(f"pipeline rank {self.rank}: rank 0 ended the generation")
        return (logits, h) if return_hidden else logits

    def _head(self, h: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            logits = self.embed_tokens.as_linear(h)
        else:
            logits = self.lm_head(h)
        return softcap(logits, self.args.final_logit_softcapping)

    def _layers(
        self, inputs: mx.array, cache: list | None, keep: int | None
    ) -> tuple[mx.array, list[mx.array]]:
        """This rank's layers, as `TextModel.__call__` runs them: the hidden states after them
        (unnormed) and the sends to the next rank."""
        args = self.args
        B, T = inputs.shape
        P = args.hidden_size_per_layer_input
        if self.is_first:
            h = self.embed(inputs)
            ple = self.per_layer_inputs(inputs, h) if P else None
        else:
            # One message: two sends between the same ranks may be evaluated in either order.
            H, rest = args.hidden_size, args.num_hidden_layers - self.start
            width = H + (rest * P if P else 0)
            message = mx.distributed.recv(
                (B, T, width), self.dtype, self.rank - 1, group=self.group
            )
            h = message[..., :H]
            ple = message[..., H:].reshape(B, T, rest, P) if P else None
        ple_first = 0 if self.is_first else self.start  # ple[:, :, 0] is this layer's input
        start = cache[0].offset if cache else 0
        key_starts = {t: window_start(start, self._window(t)) for t in (SLIDING, FULL)}
        query_start = start

        def masks() -> dict[str, str | mx.array | None]:
            return {
                t: attention_mask(query_start, start + T, key_starts[t], self._window(t))
                for t in (SLIDING, FULL)
            }

        layer_masks = masks()
        shared: dict[str, tuple[mx.array, mx.array]] = {}
        first_shared = args.first_kv_shared_layer
        for i in range(self.start, self.end):
            if i == first_shared and keep is not None and keep < T:
                # Shared layers write no cache: only the kept positions need them (always on the
                # last rank: the KV-shared layers and their producers are one block).
                if keep == 0:
                    return h[:, T:], []
                h = h[:, T - keep :]
                ple = ple[:, T - keep :] if ple is not None else None
                query_start = start + T - keep
                layer_masks = masks()
            layer_type = args.layer_types[i]
            owns_kv = i < first_shared
            h, kv = self.layers[i - self.start](
                h,
                query_start,
                layer_masks[layer_type],
                cache[i - self.start] if (cache and owns_kv) else None,
                None if owns_kv else shared[layer_type],
                ple[:, :, i - ple_first] if ple is not None else None,
            )
            if owns_kv:
                shared[layer_type] = kv
        if self.is_last:
            return h, []
        message = h
        if ple is not None:  # the per-layer inputs of the later ranks' layers
            rest = ple[:, :, self.end - ple_first :]
            message = mx.concatenate([h, rest.reshape(B, T, -1).astype(h.dtype)], axis=-1)
        message = message.astype(self.dtype)
        return h, [mx.distributed.send(message, self.rank + 1, group=self.group)]
