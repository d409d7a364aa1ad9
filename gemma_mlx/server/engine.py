"""The interface between the HTTP layer and a generation engine: requests in, events out.

The HTTP layer (`gemma_mlx.server.app`) only ever calls `Engine.submit` with a `GenerationRequest`
(prompt token ids and options, already validated) and reads the returned `RequestStream`:
`TokenEvent`s, then one `FinishEvent`. It cancels a request with `RequestStream.cancel()` and asks
the engine to stop with `Engine.shutdown()`. Nothing else crosses the boundary, so an engine that
batches many requests into one forward pass (`gemma_mlx.server.scheduler.BatchedEngine`) sits
behind it without any change to the HTTP code: it implements `Engine`, pushes the events into the
streams, and honours `cancelled` at its step boundaries.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from gemma_mlx.errors import GemmaMLXError

# Why a generation ended: the model's end of turn or a stop string, max_tokens, the client went
# away, the server is shutting down, or the engine failed on this request.
STOP, LENGTH, CANCELLED, SHUTDOWN, ERROR = "stop", "length", "cancelled", "shutdown", "error"


class QueueFullError(GemmaMLXError):
    """Every waiting slot is taken; the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class EngineClosedError(GemmaMLXError):
    """The engine is shutting down and accepts no new requests."""


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling and logits processing (`gemma_mlx.sample`'s options plus OpenAI's penalties)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: `prompt` token ids (already rendered), at most `max_tokens` new tokens.

    `top_logprobs`: None for no log-probabilities, k >= 0 for the chosen token's and the k most
    likely ones at every step. `banned_tokens` are never generated (e.g. tool calls when a request
    forbids them). `thinking_budget` caps the tokens spent in the thinking channel (None: no cap).
    `images`/`audio`: the files of the prompt's `<|image|>`/`<|audio|>` placeholders, in order
    (already fetched and checked; the engine encodes them).
    """

    prompt: tuple[int, ...]
    max_tokens: int
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None
    banned_tokens: tuple[int, ...] = ()
    thinking_budget: int | None = None
    images: tuple[bytes, ...] = ()
    audio: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """One generated token: its text delta (possibly empty) in `channel` (`gemma_mlx.tokenizer`'s
    ANSWER, THOUGHT or TOOL_CALL), and its log-probabilities when requested."""

    token: int
    text: str
    channel: str
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int  # prompt tokens taken from the prefix cache instead of being prefilled
    completion_tokens: int


@dataclass(frozen=True)
class FinishEvent:
    """The last event of every stream. `stop_string` is the stop string that ended the text;
    `error` the message when `reason` is ERROR (`invalid` when the request, not the server, was at
    fault)."""

    reason: str
    usage: Usage
    stop_string: str | None = None
    error: str | None = None
    invalid: bool = False


Event = TokenEvent | FinishEvent


class RequestStream:
    """Events of one request, pushed by the engine's thread, read on the event loop.

    Create it on the event loop (in `submit`). The engine calls `push` from any thread and checks
    `cancelled` between steps; the reader iterates with `async for` until the `FinishEvent`.
    """

    def __init__(self, request: GenerationRequest):
        self.request = request
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()
        self.finished = False  # set by the engine once it pushed the FinishEvent
        self.finish: FinishEvent | None = None  # set once the reader got it

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating (the client went away); the engine frees the request at its next step."""
        self._cancelled.set()

    def push(self, event: Event) -> None:
        """Hand an event to the reader (thread-safe; dropped once the event loop is closed)."""
        if isinstance(event, FinishEvent):
            self.finished = True
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is reading any more
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            if isinstance(event, FinishEvent):
                self.finish = event
            yield event
            if isinstance(event, FinishEvent):
                return


class Engine(Protocol):
    """What the HTTP layer needs from a generation engine (see the module docstring).

    `submit` is called on the event loop and must not block: it queues the request and returns
    its stream at once, or raises `QueueFullError` (HTTP 429) / `EngineClosedError` (HTTP 503).
    `shutdown` ends every queued and running request with a SHUTDOWN `FinishEvent` and refuses
    new ones; `close` waits for the engine to stop. `context_length` is the longest prompt plus
    generation the model takes (None: unknown).
    """

    context_length: int | None

    def submit(self, request: GenerationRequest) -> RequestStream: ...

    def shutdown(self) -> None: ...

    def close(self) -> None: ...
