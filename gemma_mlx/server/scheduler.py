"""`ThreadedEngine`: the generation engine, one thread that owns every MLX call.

Requests wait in a first-in-first-out queue (at most `max_queue` beyond the running ones: more
are refused with a retry estimate). Up to `max_active` of them run at once, interleaved one step at a time
(one prefill chunk or one token) in round-robin order, so a long reply or a long prompt never
holds the others up for more than a step. Cancelled requests leave at their next step, taking
their KV cache with them. Each request still runs alone through the model; batching them into one
forward pass is a different engine behind the same `Engine` interface.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from gemma_mlx.decode import context_length
from gemma_mlx.errors import GemmaMLXError
from gemma_mlx.server.engine import (
    CANCELLED,
    ERROR,
    SHUTDOWN,
    EngineClosedError,
    FinishEvent,
    GenerationRequest,
    QueueFullError,
    RequestStream,
    TokenEvent,
    Usage,
)
from gemma_mlx.server.generation import Generation, GenerationSettings
from gemma_mlx.server.prefix_cache import PrefixCache

log = logging.getLogger("gemma_mlx.server")


@dataclass
class _Running:
    stream: RequestStream
    generation: Generation
    steps: Iterator[TokenEvent | None]
    started: float


class ThreadedEngine:
    """Serves `GenerationRequest`s on its own thread (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prefix_cache: PrefixCache,
        settings: GenerationSettings | None = None,
        max_active: int = 4,
        max_queue: int = 64,
    ):
        if max_active < 1 or max_queue < 0:
            raise ValueError(
                f"max_active must be >= 1 and max_queue >= 0, got {max_active}, {max_queue}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.prefix_cache = prefix_cache
        self.settings = settings or GenerationSettings()
        self.max_active = max_active
        self.max_queue = max_queue
        self.context_length = context_length(model)
        self._waiting: deque[RequestStream] = deque()
        self._running = 0  # requests started and not finished (changed under _cond)
        self._cond = threading.Condition()
        self._closing = False
        self._seconds_per_request = 1.0  # running mean, for Retry-After
        self._thread = threading.Thread(target=self._run, name="gemma-mlx-engine", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> RequestStream:
        stream = RequestStream(request)
        with self._cond:
            if self._closing:
                raise EngineClosedError("the server is shutting down")
            if len(self._waiting) + self._running >= self.max_active + self.max_queue:
                raise QueueFullError(
                    f"{self._running} requests are running and {len(self._waiting)} waiting "
                    f"(--decode-concurrency {self.max_active}, --max-queue {self.max_queue})",
                    retry_after=self._retry_after(),
                )
            self._waiting.append(stream)
            self._cond.notify()
        return stream

    def shutdown(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()

    def close(self) -> None:
        self.shutdown()
        self._thread.join()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _retry_after(self) -> int:
        """Seconds until a waiting slot is likely free: the queue ahead drained at the measured
        pace."""
        ahead = len(self._waiting) + 1
        return max(1, math.ceil(self._seconds_per_request * ahead / self.max_active))

    def _run(self) -> None:
        active: deque[_Running] = deque()
        while True:
            with self._cond:
                while not (self._closing or self._waiting or active):
                    self._cond.wait()
                if self._closing:
                    break
                while self._waiting and len(active) < self.max_active:
                    active.append(self._start(self._waiting.popleft()))
                self._running = len(active)
            running = active.popleft()
            if self._advance(running):
                active.append(running)
                continue
            with self._cond:
                self._running = len(active)
            if not active:
                mx.clear_cache()  # idle: give freed buffers back
        for running in active:
            self._finish(running, SHUTDOWN)
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for stream in waiting:
            stream.push(FinishEvent(SHUTDOWN, Usage(len(stream.request.prompt), 0, 0)))
        mx.clear_cache()

    def _start(self, stream: RequestStream) -> _Running:
        generation = Generation(
            self.model, self.tokenizer, self.prefix_cache, stream.request, self.settings
        )
        return _Running(stream, generation, generation.steps(), time.perf_counter())

    def _advance(self, running: _Running) -> bool:
        """Run one step of a request; False once it is finished (its FinishEvent pushed)."""
        if running.stream.cancelled:
            self._finish(running, CANCELLED)
            return False
        try:
            event = next(running.steps)
        except StopIteration:
            self._finish(running, running.generation.finish_reason or ERROR)
            return False
        except GemmaMLXError as e:
            self._finish(running, ERROR, error=str(e), invalid=True)
            return False
        except Exception:
            log.exception("generation failed")
            self._finish(running, ERROR, error="the generation failed (see the server log)")
            return False
        if event is not None:
            running.stream.push(event)
        if running.generation.finish_reason is not None:
            self._finish(running, running.generation.finish_reason)
            return False
        return True

    def _finish(self, running: _Running, reason: str, error: str | None = None, invalid=False):
        try:
            running.steps.close()  # frees the cache, after snapshotting it into the prefix cache
        except Exception:
            log.exception("closing a generation failed")
        generation = running.generation
        running.stream.push(
            FinishEvent(reason, generation.usage, generation.stop_string, error, invalid)
        )
        elapsed = time.perf_counter() - running.started
        self._seconds_per_request = 0.8 * self._seconds_per_request + 0.2 * elapsed
