"""`BatchedEngine`: the generation engine, one thread that owns every MLX call and runs
`gemma_mlx.batching.BatchScheduler` (continuous batching) behind the `Engine` interface.

Requests join the batch at step boundaries: each step is one forward pass over every running
request (a decoding token, a verify of drafts, or a chunk of a prompt), so many clients share
one read of the weights. Each request keeps its own sampling, seed, stop strings and logits
processors; a seeded request gives the same tokens whatever else runs beside it. Up to
`max_batch` run at once while their KV caches fit `kv_budget` (`BatchScheduler`'s admission: the
rest queue, none fails); `max_queue` more may wait, beyond that `submit` refuses with a retry
estimate. A cancelled request leaves the batch before the next step.

The prefix cache: a prompt's longest cached prefix is fetched before it joins, and snapshots are
stored when a prompt is prefilled and when a request leaves (`BatchScheduler`'s hooks). A prompt
with images or audio is encoded here (`gemma_mlx.generate.prepare_prompt`, soft tokens memoised
by content hash) and prefilled alone, chunk by chunk between batch steps (the batched pass takes
token ids only), then joins the batch for decoding; its prefix-cache key replaces the first
placeholders of each item with values derived from the item's content hash, so a later prompt
with the same image reuses the prefix and one with another image of the same size does not.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from gemma_mlx.batching.scheduler import BatchScheduler
from gemma_mlx.decode import context_length, default_prefill_step_size, prefill
from gemma_mlx.errors import GemmaMLXError, PromptError
from gemma_mlx.generate import prepare_prompt
from gemma_mlx.media.prompt import PreparedPrompt
from gemma_mlx.server.engine import (
    CANCELLED,
    ERROR,
    SHUTDOWN,
    EngineClosedError,
    FinishEvent,
    GenerationRequest,
    QueueFullError,
    RequestStream,
    Usage,
)
from gemma_mlx.server.generation import (
    GenerationSettings,
    Reply,
    logits_processors,
)
from gemma_mlx.server.prefix_cache import PrefixCache

log = logging.getLogger("gemma_mlx.server")

# Placeholder positions per media item whose prefix-cache key carries the item's content hash
# (31 bits each, kept below 2**31 so keys fit int32): 124 bits tell two images apart.
KEYED_POSITIONS = 4
ENCODED_MEMO_ITEMS = 32  # soft tokens of recent images and clips kept for re-use


class _EncodedMemo(OrderedDict):
    """Soft tokens by content hash (`gemma_mlx.media.prepare`'s `encoded` memo), the most
    recently stored `limit` items."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: str, value: mx.array) -> None:
        super().__setitem__(key, value)
        while len(self) > self.limit:
            self.popitem(last=False)


def keyed_tokens(tokens: list[int], media: Any, vocab_size: int) -> list[int]:
    """The prefix-cache key of a prompt: its tokens, with the first placeholders of each media
    item replaced by ids above the vocabulary derived from the item's content hash."""
    if media is None:
        return list(tokens)
    keyed = list(tokens)
    for item in media.items:
        for j in range(min(KEYED_POSITIONS, item.end - item.begin)):
            digest = int(item.key[8 * j : 8 * j + 8], 16)
            keyed[item.begin + j] = vocab_size + digest % (2**31 - vocab_size)
    return keyed


@dataclass
class _Request:
    """A request inside the engine: its expanded prompt, prefix-cache key and reply so far."""

    stream: RequestStream
    tokens: list[int]
    keyed: list[int]
    media: Any
    max_tokens: int
    cache: list | None  # held while this engine prefills a media prompt
    cached: int
    started: float = field(default_factory=time.perf_counter)
    uid: int | None = None  # the scheduler's id, once in the batch
    generated: int = 0
    reply: Reply = field(init=False)

    def __post_init__(self) -> None:
        self.reply = Reply(self.stream.request.top_logprobs)

    @property
    def usage(self) -> Usage:
        return Usage(len(self.tokens), self.cached, self.generated)


class BatchedEngine:
    """Serves `GenerationRequest`s in one continuous batch on its own thread (module docstring)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prefix_cache: PrefixCache,
        settings: GenerationSettings | None = None,
        max_batch: int = 16,
        max_queue: int = 64,
    ):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(
                f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.prefix_cache = prefix_cache
        self.settings = settings or GenerationSettings()
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context_length = context_length(model)
        self.scheduler = self._new_scheduler()  # checks the settings before the thread starts
        self._memo = _EncodedMemo(ENCODED_MEMO_ITEMS)
        self._incoming: deque[RequestStream] = deque()
        self._prefilling: deque[_Request] = deque()  # media prompts this engine prefills
        self._by_uid: dict[int, _Request] = {}  # requests in the batch, still streaming
        self._keys: dict[int, tuple[int, list[int], int]] = {}  # uid -> (prompt, key, cached)
        self._count = 0  # requests accepted and not finished (changed under _cond)
        self._cond = threading.Condition()
        self._closing = False
        self._seconds_per_request = 1.0  # running mean, for Retry-After
        self._thread = threading.Thread(target=self._run, name="gemma-mlx-engine", daemon=True)
        self._thread.start()

    # --- the event loop's side ------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestStream:
        stream = RequestStream(request)
        with self._cond:
            if self._closing:
                raise EngineClosedError("the server is shutting down")
            if self._count >= self.max_batch + self.max_queue:
                raise QueueFullError(
                    f"{self._count} requests are running or waiting (--decode-concurrency "
                    f"{self.max_batch}, --max-queue {self.max_queue})",
                    retry_after=self._retry_after(),
                )
            self._count += 1
            self._incoming.append(stream)
            self._cond.notify()
        return stream

    def shutdown(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()

    def close(self) -> None:
        self.shutdown()
        self._thread.join()

    def _retry_after(self) -> int:
        """Seconds until a slot is likely free: the requests ahead drained at the measured pace,
        `max_batch` at a time."""
        ahead = max(1, self._count - self.max_batch + 1)
        return max(1, math.ceil(self._seconds_per_request * ahead / self.max_batch))

    # --- the engine thread ----------------------------------------------------------------

    def _new_scheduler(self) -> BatchScheduler:
        s = self.settings
        return BatchScheduler(
            self.model, self.tokenizer, max_batch=self.max_batch, kv_budget=s.kv_budget,
            prefill_step_size=s.prefill_step_size, draft=s.draft, num_draft=s.num_draft,
            model_path=getattr(self.model, "path", None), on_prefilled=self._on_prefilled,
            on_retired=self._on_retired,
        )  # fmt: skip

    def _busy(self) -> bool:
        return bool(self._incoming or self._prefilling or self.scheduler.has_work)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._closing or self._busy()):
                    self._cond.wait()
                if self._closing:
                    break
                incoming, self._incoming = list(self._incoming), deque()
            for stream in incoming:
                self._start(stream)
            self._drop_cancelled()
            if self._prefilling:
                self._prefill_media()
            if self.scheduler.has_work:
                self._step()
            if not self._busy():
                mx.clear_cache()  # idle: give freed buffers back
        for request in [*self._prefilling, *self._by_uid.values()]:
            self._finish(request, SHUTDOWN)
        with self._cond:
            waiting, self._incoming = list(self._incoming), deque()
        for stream in waiting:
            stream.push(FinishEvent(SHUTDOWN, Usage(len(stream.request.prompt), 0, 0)))
        mx.clear_cache()

    def _start(self, stream: RequestStream) -> None:
        """Encode the request's media, fetch its cached prefix, and send it to the batch (or,
        with media, to this engine's own prefill first)."""
        try:
            request = self._prepare(stream)
            if request.media is not None and request.cached < len(request.tokens) - 1:
                self._prefilling.append(request)
            else:
                self._join(request)
        except GemmaMLXError as e:
            self._refuse(stream, str(e), invalid=True)
        except Exception:
            log.exception("preparing a generation failed")
            self._refuse(stream, "the generation failed (see the server log)")

    def _prepare(self, stream: RequestStream) -> _Request:
        request = stream.request
        prepared = prepare_prompt(
            self.model, self.tokenizer, list(request.prompt), images=list(request.images),
            audio=list(request.audio), max_soft_tokens=self.settings.max_soft_tokens,
            encoded=self._memo,
        )  # fmt: skip
        tokens, media = prepared.tokens, prepared.media
        max_tokens = request.max_tokens
        if self.context_length is not None:
            if len(tokens) >= self.context_length:
                raise PromptError(
                    f"this model's context holds {self.context_length} tokens; the prompt has "
                    f"{len(tokens)} with its images and audio"
                )
            max_tokens = min(max_tokens, self.context_length - len(tokens))
        keyed = keyed_tokens(tokens, media, self.tokenizer.vocab_size)
        cache, cached = self.prefix_cache.fetch(keyed)
        return _Request(stream, tokens, keyed, media, max_tokens, cache, cached)

    def _prefill_media(self) -> None:
        """One prefill chunk of the oldest media prompt (chunks end where a fresh run's do, and
        never inside an image); once its prompt but the last token is in, it joins the batch."""
        request = self._prefilling[0]
        try:
            done = request.cache[0].offset
            end = len(request.tokens) - 1
            step = self.settings.prefill_step_size or default_prefill_step_size()
            stop = min(request.media.chunk_end(done, min(done + step, end)), end)
            prefill(self.model, request.cache, request.tokens[done:stop], stop - done,
                    media=request.media)  # fmt: skip
            if stop < end:
                return
            self._prefilling.popleft()
            self.prefix_cache.store(request.keyed[:end], request.cache)
            self._join(request)
        except GemmaMLXError as e:
            self._prefilling.popleft()
            self._finish(request, ERROR, error=str(e), invalid=True)
        except Exception:
            log.exception("prefilling a prompt failed")
            self._prefilling.popleft()
            self._finish(request, ERROR, error="the generation failed (see the server log)")

    def _join(self, request: _Request) -> None:
        """Submit the request to the batch scheduler (its options checked there)."""
        r, s = request.stream.request, request.stream.request.sampling
        uid = self.scheduler.submit(
            PreparedPrompt(request.tokens, request.media), request.max_tokens, temp=s.temperature, top_p=s.top_p,
            min_p=s.min_p, top_k=s.top_k, seed=s.seed, stop=r.stop, prompt_cache=request.cache,
            logits_processors=logits_processors(r, self.tokenizer, len(request.tokens)),
        )  # fmt: skip
        request.uid, request.cache = uid, None
        self._by_uid[uid] = request
        self._keys[uid] = (len(request.tokens), request.keyed, request.cached)

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._prefilling if r.stream.cancelled]:
            self._prefilling.remove(request)
            self._finish(request, CANCELLED)
        for uid, request in list(self._by_uid.items()):
            if request.stream.cancelled:
                self.scheduler.cancel(uid)
                self._finish(request, CANCELLED)

    def _step(self) -> None:
        """One batched pass; its tokens go to their streams. A failing pass fails every request
        in the batch (they shared it) and the batch starts afresh."""
        try:
            responses = self.scheduler.step()
        except Exception:
            log.exception("a batched generation step failed")
            for request in list(self._by_uid.values()):
                self._finish(request, ERROR, error="the generation failed (see the server log)")
            self._keys.clear()
            self.scheduler = self._new_scheduler()
            return
        for uid, response in responses:
            request = self._by_uid.get(uid)
            if request is not None:
                self._hand_out(request, response)

    def _hand_out(self, request: _Request, r: Any) -> None:
        request.generated += 1
        request.stream.push(request.reply.event(r))
        if r.finish_reason is None:
            return
        stop_string = request.reply.stop_string(self.tokenizer, r, request.stream.request.stop)
        self._finish(request, r.finish_reason, stop_string=stop_string)

    def _finish(self, request: _Request, reason: str, stop_string: str | None = None,
                error: str | None = None, invalid: bool = False) -> None:  # fmt: skip
        if request.uid is not None:
            self._by_uid.pop(request.uid, None)
        request.cache = None
        request.stream.push(FinishEvent(reason, request.usage, stop_string, error, invalid))
        self._done()
        elapsed = time.perf_counter() - request.started
        self._seconds_per_request = 0.8 * self._seconds_per_request + 0.2 * elapsed

    def _refuse(self, stream: RequestStream, error: str, invalid: bool = False) -> None:
        stream.push(FinishEvent(ERROR, Usage(len(stream.request.prompt), 0, 0), None, error,
                                invalid))  # fmt: skip
        self._done()

    def _done(self) -> None:
        with self._cond:
            self._count -= 1

    # --- the scheduler's hooks: prefix-cache snapshots ------------------------------------

    def _key(self, uid: int, tokens: list[int]) -> list[int] | None:
        entry = self._keys.get(uid)
        if entry is None:
            return None
        prompt, keyed, _ = entry
        return keyed + tokens[prompt:] if len(tokens) > prompt else keyed[: len(tokens)]

    def _on_prefilled(self, uid: int, tokens: list[int], cache: list) -> None:
        key = self._key(uid, tokens)
        if key is not None:
            self.prefix_cache.store(key, cache)

    def _on_retired(self, uid: int, tokens: list[int], cache: list) -> None:
        """Keep the prompt and reply the caches hold (a cancelled request's caches may hold a
        token it never saw: then nothing is kept)."""
        key = self._key(uid, tokens)
        entry = self._keys.pop(uid, None)
        if key is None or not cache:
            return
        held = cache[0].offset
        if entry[2] < held <= len(key):
            self.prefix_cache.store(key[:held], cache)
