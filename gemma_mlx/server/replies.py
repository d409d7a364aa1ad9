"""A reply as the APIs present it: answer text, thinking, tool calls, log-probabilities and how it
ended, gathered from an engine's event stream (whole, or part by part while streaming)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from gemma_mlx.server.engine import (
    CANCELLED,
    ERROR,
    SHUTDOWN,
    FinishEvent,
    RequestStream,
    TokenEvent,
)
from gemma_mlx.server.errors import APIError
from gemma_mlx.server.tools import TEXT, THINKING, TOOL_USE, ReplyParser, ReplyPart, ToolCall
from gemma_mlx.tokenizer import ANSWER

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass(frozen=True)
class TokenLogprob:
    """A token's text and bytes (a byte-fallback token is its one byte) and log-probability."""

    text: str
    bytes: list[int]
    logprob: float


def token_piece(tokenizer: Any, token: int) -> tuple[str, list[int]]:
    """The text a single token stands for, and its UTF-8 bytes."""
    piece = tokenizer.backend.id_to_token(token) or ""
    match = _BYTE_TOKEN.match(piece)
    if match:  # a byte: a character if ASCII, else part of one (OpenAI writes "bytes:\\xNN")
        byte = int(match.group(1), 16)
        return (chr(byte) if byte < 0x80 else f"bytes:\\x{byte:02x}"), [byte]
    text = piece.replace("▁", " ")
    return text, list(text.encode("utf-8"))


def token_logprobs(tokenizer: Any, event: TokenEvent) -> tuple[TokenLogprob, list[TokenLogprob]]:
    """The chosen token's log-probability and the top alternatives', as the APIs show them."""

    def entry(token: int, logprob: float) -> TokenLogprob:
        return TokenLogprob(*token_piece(tokenizer, token), logprob)

    return entry(event.token, event.logprob), [entry(t, lp) for t, lp in event.top_logprobs]


def is_content(tokenizer: Any, event: TokenEvent) -> bool:
    """Whether a token is part of the answer text (logprobs list those, not thinking, tool-call or
    marker tokens)."""
    return event.channel == ANSWER and event.token not in tokenizer.special_ids


def finish_error(finish: FinishEvent) -> APIError | None:
    """The error a finished request answers with, if it did not end normally."""
    if finish.reason == ERROR:
        return APIError(400 if finish.invalid else 500, finish.error or "the generation failed")
    if finish.reason == SHUTDOWN:
        return APIError(503, "the server is shutting down; retry on another server or later")
    if finish.reason == CANCELLED:
        return APIError(499, "the request was cancelled")
    return None


@dataclass
class Reply:
    """Everything a non-streaming answer needs."""

    text: str = ""
    thinking: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[tuple[TokenLogprob, list[TokenLogprob]]] = field(default_factory=list)
    finish: FinishEvent | None = None

    def add(self, part: ReplyPart) -> None:
        if part.kind == TEXT:
            self.text += part.text
        elif part.kind == THINKING:
            self.thinking += part.text
        elif part.kind == TOOL_USE:
            self.calls.append(part.call)


async def reply_parts(
    stream: RequestStream, parser: ReplyParser
) -> AsyncIterator[tuple[TokenEvent | FinishEvent, list[ReplyPart]]]:
    """Each event with the reply parts it completes (the FinishEvent gets what was left open)."""
    async for event in stream:
        if isinstance(event, FinishEvent):
            yield event, parser.finish()
        else:
            yield event, parser.feed(event)


async def collect(stream: RequestStream, parser: ReplyParser, with_logprobs: bool) -> Reply:
    reply = Reply()
    async for event, parts in reply_parts(stream, parser):
        for part in parts:
            reply.add(part)
        if isinstance(event, FinishEvent):
            reply.finish = event
        elif with_logprobs and event.logprob is not None and is_content(parser.tokenizer, event):
            reply.logprobs.append(token_logprobs(parser.tokenizer, event))
    return reply
