"""Anthropic's Messages API, `/v1/messages`: requests, prompts, answers and streams.

Shapes follow the official `anthropic` client's types: content blocks `text`, `thinking`
(Gemma's thinking channel; no signature, since nothing here is signed) and `tool_use`, tool
results as `tool_result` blocks, and streams in Anthropic's event order: `message_start`, then per
block `content_block_start` (a `ping` after the first), its deltas and `content_block_stop`, then
`message_delta` and `message_stop`. Usage counts prompt tokens from the prefix cache as
`cache_read_input_tokens` and only the rest as `input_tokens`, as Anthropic does.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gemma_mlx.server import sse
from gemma_mlx.server.engine import LENGTH, FinishEvent, GenerationRequest, RequestStream, Usage
from gemma_mlx.server.errors import invalid
from gemma_mlx.server.media import MediaFiles
from gemma_mlx.server.prompts import ServedModel, generation_request, render_chat, sampling_options
from gemma_mlx.server.replies import finish_error, reply_parts
from gemma_mlx.server.tools import (
    TEXT,
    TOOL_USE,
    ReplyParser,
    ReplyPart,
    ToolCallSyntaxError,
    arguments_json,
    plan_tools,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None
    citations: list[Any] | None = None


class ThinkingBlock(_Strict):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Strict):
    type: Literal["redacted_thinking"]
    data: str


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None
    caller: dict[str, Any] | None = None
    toolset_name: str | None = None


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = None
    toolset_name: str | None = None


class Base64Source(_Strict):
    type: Literal["base64"]
    media_type: str
    data: str


class URLSource(_Strict):
    type: Literal["url"]
    url: str


class ImageBlock(_Strict):
    type: Literal["image"]
    source: Annotated[Base64Source | URLSource, Field(discriminator="type")]
    cache_control: dict[str, Any] | None = None


Block = Annotated[
    TextBlock | ImageBlock | ThinkingBlock | RedactedThinkingBlock | ToolUseBlock | ToolResultBlock,
    Field(discriminator="type"),
]


class Message(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(_Strict):
    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(_Strict):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1)
    display: Literal["summarized", "omitted"] | None = None


class MessagesRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    # Accepted and ignored: bookkeeping that does not change the reply (the prefix cache is
    # automatic, so cache_control needs no marks).
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    cache_control: dict[str, Any] | None = None


@dataclass(frozen=True)
class Prepared:
    generation: GenerationRequest
    model: str
    stream: bool


def _text(content: str | list[TextBlock] | None) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(b.text for b in content)


def template_messages(params: MessagesRequest, files: MediaFiles) -> list[dict[str, Any]]:
    """Anthropic messages as chat templates take them (OpenAI's convention): system first,
    tool_use blocks as `tool_calls`, each tool_result block a `tool` message, image blocks as
    `{"type": "image"}` content parts (their files read into `files`)."""
    out: list[dict[str, Any]] = []
    if params.system:
        out.append({"role": "system", "content": _text(params.system)})
    names: dict[str, str] = {}
    for i, m in enumerate(params.messages):
        blocks = (
            [TextBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        )
        if m.role == "assistant":
            message: dict[str, Any] = {"role": "assistant", "content": ""}
            for b in blocks:
                if isinstance(b, TextBlock):
                    message["content"] += b.text
                elif isinstance(b, ThinkingBlock):
                    message["reasoning_content"] = message.get("reasoning_content", "") + b.thinking
                elif isinstance(b, ToolUseBlock):
                    names[b.id] = b.name
                    message.setdefault("tool_calls", []).append(
                        {"id": b.id, "type": "function",
                         "function": {"name": b.name, "arguments": b.input}}
                    )  # fmt: skip
                elif isinstance(b, ToolResultBlock):
                    raise invalid(
                        "messages: tool_result blocks belong in user messages", "messages"
                    )
            out.append(message)
            continue
        text, parts = "", []
        for j, b in enumerate(blocks):
            if isinstance(b, ToolResultBlock):
                out.append({"role": "tool", "tool_call_id": b.tool_use_id,
                            "name": names.get(b.tool_use_id, "unknown"), "content": _text(b.content)})  # fmt: skip
            elif isinstance(b, TextBlock):
                text += b.text
                parts.append({"type": "text", "text": b.text})
            elif isinstance(b, ImageBlock):
                _read_image(b, files, f"messages.{i}.content.{j}.source")
                parts.append({"type": "image"})
            else:
                raise invalid(f"messages: {b.type} blocks belong in assistant messages", "messages")
        if any(p["type"] == "image" for p in parts):
            out.append({"role": "user", "content": parts})
        elif text or not any(isinstance(b, ToolResultBlock) for b in blocks):
            out.append({"role": "user", "content": text})
    return out


def _read_image(block: ImageBlock, files: MediaFiles, where: str) -> None:
    source = block.source
    if isinstance(source, Base64Source):
        files.image_from_base64(source.data, f"{where}.data")
    else:
        files.image_from_url(source.url, f"{where}.url")


def prepare(params: MessagesRequest, served: ServedModel) -> Prepared:
    served.check_name(params.model)
    choice = params.tool_choice
    kind = (
        {"any": "required", "tool": "function"}.get(choice.type, choice.type) if choice else "auto"
    )
    tools = [
        {"type": "function",
         "function": {"name": t.name, "description": t.description or "", "parameters": t.input_schema}}
        for t in params.tools or []
    ]  # fmt: skip
    try:
        plan = plan_tools(served.tokenizer, tools, kind, choice.name if choice else None)
    except ToolCallSyntaxError as e:
        raise invalid(str(e), param="tools") from e
    kwargs = dict(served.defaults.chat_template_kwargs)
    budget = None
    if params.thinking is not None:
        kwargs["enable_thinking"] = params.thinking.type != "disabled"
        budget = params.thinking.budget_tokens if params.thinking.type == "enabled" else None
    files = MediaFiles(served.media)
    ids = render_chat(served, template_messages(params, files), plan, kwargs)
    sampling = sampling_options(
        served, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k
    )
    generation = generation_request(
        served, ids, params.max_tokens, sampling, prompt_param="messages",
        stop=params.stop_sequences or (), banned_tokens=plan.banned_tokens, thinking_budget=budget,
        media=files,
    )  # fmt: skip
    return Prepared(generation, params.model, bool(params.stream))


# --- answers ------------------------------------------------------------------------------------


def stop_reason(finish: FinishEvent, called_tools: bool) -> str:
    if finish.reason == LENGTH:
        return "max_tokens"
    if finish.stop_string is not None:
        return "stop_sequence"
    return "tool_use" if called_tools else "end_turn"


def usage(u: Usage) -> dict[str, int]:
    return {
        "input_tokens": u.prompt_tokens - u.cached_tokens,
        "output_tokens": u.completion_tokens,
        "cache_read_input_tokens": u.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


class _Blocks:
    """Reply parts as Anthropic's content-block events: consecutive text (or thinking) pieces share
    a block; each tool call is a block of its own."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None  # "text" or "thinking"
        self.calls = 0

    def add(self, part: ReplyPart) -> Iterator[dict[str, Any]]:
        if part.kind == TOOL_USE:
            yield from self.close()
            self.index += 1
            self.calls += 1
            block = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}",
                     "name": part.call.name, "input": {}}  # fmt: skip
            yield {"type": "content_block_start", "index": self.index, "content_block": block}
            delta = {"type": "input_json_delta", "partial_json": arguments_json(part.call)}
            yield {"type": "content_block_delta", "index": self.index, "delta": delta}
            yield {"type": "content_block_stop", "index": self.index}
            return
        kind = "text" if part.kind == TEXT else "thinking"
        if self.open != kind:
            yield from self.close()
            self.index += 1
            self.open = kind
            block = {"type": "text", "text": ""} if kind == "text" else {
                "type": "thinking", "thinking": "", "signature": ""}  # fmt: skip
            yield {"type": "content_block_start", "index": self.index, "content_block": block}
        yield {"type": "content_block_delta", "index": self.index,
               "delta": {"type": f"{kind}_delta", kind: part.text}}  # fmt: skip

    def close(self) -> Iterator[dict[str, Any]]:
        if self.open is not None:
            self.open = None
            yield {"type": "content_block_stop", "index": self.index}


def _apply(content: list[dict[str, Any]], event: dict[str, Any]) -> None:
    """Build a whole message's content from block events (the non-streaming answer)."""
    if event["type"] == "content_block_start":
        content.append(dict(event["content_block"]))
    elif event["type"] == "content_block_delta":
        block, delta = content[event["index"]], event["delta"]
        if delta["type"] == "input_json_delta":
            block["input"] = json.loads(delta["partial_json"])
        else:
            key = delta["type"].removesuffix("_delta")
            block[key] += delta[key]


class Answer:
    def __init__(self, prepared: Prepared):
        self.prepared = prepared
        self.id = f"msg_{uuid.uuid4().hex[:24]}"

    def _message(self, content, reason: str | None, stop: str | None, u: dict[str, int]):
        return {"id": self.id, "type": "message", "role": "assistant",
                "model": self.prepared.model, "content": content, "stop_reason": reason,
                "stop_sequence": stop, "usage": u}  # fmt: skip

    async def body(
        self, stream: RequestStream, parser: ReplyParser
    ) -> dict[str, Any] | FinishEvent:
        """The whole message; the FinishEvent instead when the request failed."""
        blocks, content = _Blocks(), []
        async for event, parts in reply_parts(stream, parser):
            for part in parts:
                for block_event in blocks.add(part):
                    _apply(content, block_event)
            if isinstance(event, FinishEvent):
                if finish_error(event) is not None:
                    return event
                reason = stop_reason(event, blocks.calls > 0)
                return self._message(content, reason, event.stop_string, usage(event.usage))
        raise RuntimeError("the engine ended a stream without a FinishEvent")

    async def stream(self, stream: RequestStream, parser: ReplyParser) -> AsyncIterator[str]:
        prompt_tokens = len(self.prepared.generation.prompt)
        start = self._message([], None, None, {"input_tokens": prompt_tokens, "output_tokens": 0})
        yield sse.event({"type": "message_start", "message": start}, "message_start")
        blocks = _Blocks()
        pinged = False
        async for event, parts in reply_parts(stream, parser):
            for part in parts:
                for block_event in blocks.add(part):
                    yield sse.event(block_event, block_event["type"])
                    if not pinged:
                        pinged = True
                        yield sse.event({"type": "ping"}, "ping")
            if isinstance(event, FinishEvent):
                for block_event in blocks.close():
                    yield sse.event(block_event, block_event["type"])
                error = finish_error(event)
                if error is not None:
                    yield sse.event(error.anthropic(), "error")
                    return
                if not pinged:
                    yield sse.event({"type": "ping"}, "ping")
                delta = {"stop_reason": stop_reason(event, blocks.calls > 0),
                         "stop_sequence": event.stop_string}  # fmt: skip
                yield sse.event(
                    {"type": "message_delta", "delta": delta, "usage": usage(event.usage)},
                    "message_delta",
                )
                yield sse.event({"type": "message_stop"}, "message_stop")
                return
