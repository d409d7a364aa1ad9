"""The server on a pipeline (`mlx.launch ... -- -m gemma_mlx.server`): rank 0 serves HTTP, the
other ranks follow it.

Every rank must make the same model calls in the same order, so the batching engine (whose
batches depend on when requests arrive) cannot run here: rank 0's `PipelineEngine` serves one
request at a time. For each one it sends the job (prompt token ids, every sampling option, the
seed it drew for an unseeded request) to the other ranks in two `all_sum`s, and every rank then
runs the same `stream_generate`: the same tokens, the same stop strings and end of the reply on
every rank. A client that goes away (or a server shutdown) ends the generation on every rank at
the same step: rank 0 raises the stop flag that travels in the next step's all_sum
(`PipelineModel.stop_requested`) and every rank's model call raises `StopRequested`.

While idle, rank 0 sends a heartbeat every quarter of the pipeline timeout, so the followers wait
under the watchdog like any step and rank 0 learns of a lost rank even between requests; it then
fails the requests in flight and stops the server (status 2). SIGTERM on rank 0 ends its streams,
sends the followers the end message, and every rank exits with status 0.

The prefix cache is off on a pipeline: each rank holds only its own layers' caches, and keeping
the ranks' caches in lock-step is not built. Images and audio are refused (text only).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx

from gemma_mlx.decode import context_length
from gemma_mlx.distributed.stage import PipelineError, PipelineModel, StopRequested
from gemma_mlx.errors import GemmaMLXError, PromptError
from gemma_mlx.generate import GenerationResponse, stream_generate
from gemma_mlx.sample import make_sampler
from gemma_mlx.server.engine import (
    CANCELLED,
    ERROR,
    SHUTDOWN,
    EngineClosedError,
    FinishEvent,
    GenerationRequest,
    QueueFullError,
    RequestStream,
    SamplingOptions,
    Usage,
)
from gemma_mlx.server.generation import (
    GenerationSettings,
    Reply,
    logits_processors,
)
from gemma_mlx.server.prefix_cache import PrefixCache

log = logging.getLogger("gemma_mlx.server")

# What rank 0 sends: a job, a heartbeat while idle, the end of serving.
JOB, IDLE, END = 1, 2, 3
SEED_LIMIT = 2**31


class JobChannel:
    """Rank 0's messages to every rank: a header [kind, length] then the bytes, each one
    `all_sum` (the other ranks add zeros), waited for under the pipeline's watchdog."""

    def __init__(self, model: PipelineModel):
        self.model = model

    def _sum(self, values: mx.array, waiting_for: str) -> mx.array:
        total = mx.distributed.all_sum(values, group=self.model.group)
        self.model.wait(waiting_for, total)
        return total

    def send(self, kind: int, payload: bytes = b"") -> None:
        """Rank 0: send a message to every rank."""
        self._sum(mx.array([kind, len(payload)], mx.int32), "the other ranks")
        if payload:
            self._sum(mx.array(list(payload), mx.int32), "the other ranks")

    def receive(self) -> tuple[int, bytes]:
        """The other ranks: rank 0's next message (a heartbeat comes within the timeout)."""
        kind, length = self._sum(mx.zeros((2,), mx.int32), "rank 0's next request").tolist()
        if not length:
            return kind, b""
        payload = self._sum(mx.zeros((length,), mx.int32), "rank 0's request")
        return kind, bytes(payload.tolist())


def encode_job(request: GenerationRequest) -> bytes:
    """A text request as JSON (`logit_bias` as pairs: JSON keys are strings)."""
    fields = dataclasses.asdict(dataclasses.replace(request, sampling=SamplingOptions()))
    fields["sampling"] = dataclasses.asdict(request.sampling) | {
        "logit_bias": [[int(k), float(v)] for k, v in request.sampling.logit_bias.items()]
    }
    del fields["images"], fields["audio"]
    return json.dumps(fields).encode()


def decode_job(payload: bytes) -> GenerationRequest:
    fields = json.loads(payload)
    sampling = fields.pop("sampling")
    sampling["logit_bias"] = {int(k): v for k, v in sampling["logit_bias"]}
    return GenerationRequest(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()},
        sampling=SamplingOptions(**sampling),
    )


def _can_draft(s: SamplingOptions) -> bool:
    """Speculative decoding reproduces greedy and plain temperature sampling exactly."""
    return (s.top_k, s.top_p, s.min_p) == (0, 1.0, 0.0)


def job_responses(
    model: PipelineModel,
    tokenizer: Any,
    request: GenerationRequest,
    settings: GenerationSettings,
    make_cache: Callable[[], list],
) -> Iterator[GenerationResponse]:
    """The generation every rank runs for a job (its seed already drawn by rank 0). It ends
    quietly where rank 0 stopped it, and logs how many tokens this rank generated: the same
    number on every rank."""
    s = request.sampling
    count, stopped = 0, False
    try:
        for response in stream_generate(
            model, tokenizer, list(request.prompt), request.max_tokens,
            sampler=make_sampler(s.temperature, s.top_p, s.min_p, s.top_k, s.seed),
            logits_processors=logits_processors(request, tokenizer, len(request.prompt)),
            stop=request.stop, prompt_cache=make_cache(),
            prefill_step_size=settings.prefill_step_size,
            draft=settings.draft if _can_draft(s) else None, num_draft=settings.num_draft,
        ):  # fmt: skip
            count += 1
            yield response
    except StopRequested:
        stopped = True
    finally:
        how = "stopped by rank 0" if stopped else "ended"
        log.info("pipeline rank %d: generation %s after %d tokens", model.rank, how, count)


class _Rank:
    """What every rank of a served pipeline holds (`BatchedEngine`'s arguments; of the prefix
    cache only how it makes caches: the cache itself is off; `max_batch` is ignored)."""

    def __init__(
        self,
        model: PipelineModel,
        tokenizer: Any,
        prefix_cache: PrefixCache,
        settings: GenerationSettings | None = None,
        max_batch: int = 1,
        max_queue: int = 64,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.make_cache = prefix_cache.make_cache
        self.settings = settings or GenerationSettings()
        self.max_queue = max_queue
        self.context_length = context_length(model)


class PipelineEngine(_Rank):
    """Rank 0's engine on a pipeline: the `Engine` interface, one request at a time (module
    docstring); `max_queue` requests may wait behind the running one."""

    def __init__(self, model: PipelineModel, *args: Any, **kwargs: Any):
        super().__init__(model, *args, **kwargs)
        self.heartbeat = model.watchdog.timeout / 4
        self.failure: PipelineError | None = None
        self._channel = JobChannel(model)
        self._waiting: deque[RequestStream] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._seconds_per_request = 1.0  # running mean, for Retry-After
        log.info("pipeline of %d ranks: one request at a time, no prefix cache", model.size)
        self._thread = threading.Thread(target=self._run, name="gemma-mlx-pipeline", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> RequestStream:
        stream = RequestStream(request)
        with self._cond:
            if self._closing:
                raise EngineClosedError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(
                    f"one request is running and {len(self._waiting)} waiting (a pipeline "
                    f"serves one at a time; --max-queue {self.max_queue})",
                    retry_after=max(1, round(self._seconds_per_request * len(self._waiting))),
                )
            self._waiting.append(stream)
            self._cond.notify()
        return stream

    def shutdown(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()

    def close(self) -> None:
        """Wait for the engine to stop; raises the `PipelineError` that stopped it, if any."""
        self.shutdown()
        self._thread.join()
        if self.failure is not None:
            raise self.failure

    # --- the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if not (self._closing or self._waiting):
                        self._cond.wait(self.heartbeat)
                    if self._closing:
                        break
                    stream = self._waiting.popleft() if self._waiting else None
                if stream is None:
                    self._channel.send(IDLE)
                else:
                    self._serve(stream)
                    mx.clear_cache()
            self._channel.send(END)
        except PipelineError as e:
            log.error("%s: stopping the server", e)
            self.failure = e
            with self._cond:
                self._closing = True
            os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful stop
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for stream in waiting:
            reason = SHUTDOWN if self.failure is None else ERROR
            stream.push(FinishEvent(reason, Usage(len(stream.request.prompt), 0, 0), None,
                                    None if self.failure is None else str(self.failure)))  # fmt: skip

    def _job(self, request: GenerationRequest) -> GenerationRequest:
        """The request as every rank runs it: text only, its length checked and clamped to the
        context, a seed drawn when it has none."""
        if request.images or request.audio:
            raise PromptError("images and audio are not available on a pipelined model")
        n = len(request.prompt)
        max_tokens = request.max_tokens
        if self.context_length is not None:
            if n >= self.context_length:
                raise PromptError(
                    f"this model's context holds {self.context_length} tokens; the prompt has {n}"
                )
            max_tokens = min(max_tokens, self.context_length - n)
        s = request.sampling
        seed = s.seed if s.seed is not None else int.from_bytes(os.urandom(4)) % SEED_LIMIT
        return dataclasses.replace(
            request, max_tokens=max_tokens, sampling=dataclasses.replace(s, seed=seed)
        )

    def _serve(self, stream: RequestStream) -> None:
        """One request on every rank; its FinishEvent pushed. Raises `PipelineError` only."""
        started = time.perf_counter()
        request = stream.request
        usage = Usage(len(request.prompt), 0, 0)
        try:
            job = self._job(request)
        except GemmaMLXError as e:
            stream.push(FinishEvent(ERROR, usage, None, str(e), invalid=True))
            return
        try:
            self._channel.send(JOB, encode_job(job))
            self.model.stop_requested = False
            finish = self._hand_out(stream, job)
        except PipelineError as e:  # a lost rank: this request fails, then the server stops
            stream.push(FinishEvent(ERROR, usage, None, str(e)))
            raise
        self._seconds_per_request = 0.8 * self._seconds_per_request + 0.2 * (
            time.perf_counter() - started
        )
        stream.push(finish)

    def _hand_out(self, stream: RequestStream, job: GenerationRequest) -> FinishEvent:
        """Run the generation, streaming its tokens; its FinishEvent. A cancel or shutdown
        raises the stop flag and keeps stepping (tokens dropped) until every rank stops."""
        generated, reply = 0, Reply(job.top_logprobs)
        ended: str | None = None  # why rank 0 asked the ranks to stop
        steps = job_responses(self.model, self.tokenizer, job, self.settings, self.make_cache)
        try:
            for r in steps:
                if ended is not None:
                    continue
                generated += 1
                stream.push(reply.event(r))
                usage = Usage(len(job.prompt), 0, generated)
                if r.finish_reason is not None:
                    stop_string = reply.stop_string(self.tokenizer, r, job.stop)
                    return FinishEvent(r.finish_reason, usage, stop_string)
                if stream.cancelled or self._closing:
                    ended = CANCELLED if stream.cancelled else SHUTDOWN
                    self.model.stop_requested = True
        except PipelineError:
            raise
        except GemmaMLXError as e:  # the same on every rank: the options or the prompt
            return FinishEvent(ERROR, Usage(len(job.prompt), 0, generated), None, str(e), True)
        except Exception:
            log.exception("a pipelined generation failed")
            return FinishEvent(ERROR, Usage(len(job.prompt), 0, generated), None,
                               "the generation failed (see the server log)")  # fmt: skip
        finally:
            steps.close()
        return FinishEvent(ended or CANCELLED, Usage(len(job.prompt), 0, generated))


class PipelineFollower(_Rank):
    """A rank > 0 of a served pipeline: runs each job rank 0 sends until rank 0 ends serving."""

    def follow(self) -> int:
        """Serve rank 0's jobs; 0 once rank 0 ends serving. Raises `PipelineError` when a rank
        is lost (the watchdog ends a process whose peer hangs)."""
        channel = JobChannel(self.model)
        while True:
            kind, payload = channel.receive()
            if kind == END:
                return 0
            if kind != JOB:
                continue
            job = decode_job(payload)
            try:
                steps = job_responses(
                    self.model, self.tokenizer, job, self.settings, self.make_cache
                )
                for _ in steps:
                    pass
            except PipelineError:
                raise
            except Exception:  # rank 0 meets the same error at the same point and reports it
                log.debug("a pipelined generation failed", exc_info=True)
            mx.clear_cache()


def pipeline_engine(
    model: PipelineModel, tokenizer: Any, prefix_cache: PrefixCache, *args: Any, **kwargs: Any
) -> PipelineEngine | PipelineFollower:
    """Rank 0's engine, or the follower of a rank > 0 (`BatchedEngine`'s arguments)."""
    role = PipelineEngine if model.rank == 0 else PipelineFollower
    return role(model, tokenizer, prefix_cache, *args, **kwargs)
