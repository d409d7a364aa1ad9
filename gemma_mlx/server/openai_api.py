"""OpenAI's `/v1/chat/completions` and `/v1/completions`: requests, prompts, answers and streams.

Shapes follow the official `openai` client's types. Beyond OpenAI's parameters a request may set
`top_k`, `min_p`, `repetition_penalty` and `chat_template_kwargs` (as mlx-lm and vLLM accept);
the thinking channel comes back as `reasoning_content`, and usage reports the prompt tokens taken
from the prefix cache as `prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gemma_mlx.server import sse
from gemma_mlx.server.engine import LENGTH, FinishEvent, GenerationRequest, RequestStream, Usage
from gemma_mlx.server.errors import invalid
from gemma_mlx.server.media import MediaFiles
from gemma_mlx.server.prompts import (
    ServedModel,
    encode_completion_prompt,
    generation_request,
    logit_bias_ids,
    render_chat,
    sampling_options,
)
from gemma_mlx.server.replies import (
    Reply,
    TokenLogprob,
    finish_error,
    is_content,
    reply_parts,
    token_logprobs,
)
from gemma_mlx.server.tools import (
    TEXT,
    THINKING,
    TOOL_USE,
    ReplyParser,
    ToolCall,
    ToolCallSyntaxError,
    arguments_json,
    plan_tools,
)

# Template variables a request's chat_template_kwargs may not replace.
RESERVED_TEMPLATE_VARIABLES = {
    "messages",
    "tools",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FunctionDefinition(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCallParam(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Strict):
    data: str
    format: str


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    # Fields of a response message that clients send back unchanged; nothing to render.
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: None = None
    function_call: None = None


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text"]


class _Common(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    # Accepted and ignored: bookkeeping that does not change the reply.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: None = None


@dataclass(frozen=True)
class Prepared:
    """A validated request: what the engine runs, and how to present the reply."""

    generation: GenerationRequest
    model: str
    stream: bool
    include_usage: bool
    logprobs: bool
    echo: str = ""  # completions: the prompt text to put before the reply


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _sampling(params: _Common, served: ServedModel):
    if (params.n or 1) != 1:
        raise invalid("n: this server generates one choice per request (n = 1)", param="n")
    return sampling_options(
        served, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        min_p=params.min_p, seed=params.seed, repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        logit_bias=logit_bias_ids(served, params.logit_bias),
    )  # fmt: skip


def _text(content: str | list[ContentPart] | None) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(p.text for p in content)


def _content(
    content: str | list[ContentPart] | None, files: MediaFiles, i: int, role: str
) -> str | list[dict[str, str]]:
    """A message's content for the template: its text, or with images or audio its parts
    (`{"type": "image"}` / `{"type": "audio"}` where each goes; their files into `files`)."""
    if not isinstance(content, list) or all(isinstance(p, TextPart) for p in content):
        return _text(content)
    if role != "user":
        raise invalid(f"messages.{i}.content: images and audio go in user messages",
                      param=f"messages.{i}.content")  # fmt: skip
    parts: list[dict[str, str]] = []
    for j, part in enumerate(content):
        where = f"messages.{i}.content.{j}"
        if isinstance(part, TextPart):
            parts.append({"type": "text", "text": part.text})
        elif isinstance(part, ImagePart):
            files.image_from_url(part.image_url.url, f"{where}.image_url.url")
            parts.append({"type": "image"})
        else:
            audio = part.input_audio
            files.audio_from_base64(audio.data, audio.format, f"{where}.input_audio")
            parts.append({"type": "audio"})
    return parts


def template_messages(messages: list[ChatMessage], files: MediaFiles) -> list[dict[str, Any]]:
    """OpenAI messages as chat templates take them: tool-call arguments as objects, tool results
    with the name of the call they answer, images and audio as content parts (read into
    `files`)."""
    names: dict[str, str] = {}
    out = []
    for i, m in enumerate(messages):
        message: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": _content(m.content, files, i, m.role),
        }
        if m.reasoning_content:
            message["reasoning_content"] = m.reasoning_content
        if m.tool_calls:
            message["tool_calls"] = []
            for j, call in enumerate(m.tool_calls):
                where = f"messages.{i}.tool_calls.{j}.function.arguments"
                try:
                    arguments = json.loads(call.function.arguments or "{}")
                except json.JSONDecodeError as e:
                    raise invalid(f"{where}: not valid JSON ({e})", param=where) from e
                if not isinstance(arguments, dict):
                    raise invalid(f"{where}: must be a JSON object", param=where)
                names[call.id] = call.function.name
                message["tool_calls"].append(
                    {"id": call.id, "type": "function",
                     "function": {"name": call.function.name, "arguments": arguments}}
                )  # fmt: skip
        if m.role == "tool":
            if m.tool_call_id is None:
                where = f"messages.{i}.tool_call_id"
                raise invalid(f"{where}: a tool message needs the id of its call", param=where)
            message["tool_call_id"] = m.tool_call_id
            message["name"] = m.name or names.get(m.tool_call_id, "unknown")
        out.append(message)
    return out


def _template_kwargs(params: ChatRequest, served: ServedModel) -> dict[str, Any]:
    kwargs = dict(served.defaults.chat_template_kwargs) | (params.chat_template_kwargs or {})
    clash = RESERVED_TEMPLATE_VARIABLES & kwargs.keys()
    if clash:
        raise invalid(
            f"chat_template_kwargs: {sorted(clash)} are set by the server", "chat_template_kwargs"
        )
    if params.reasoning_effort is not None:
        kwargs["enable_thinking"] = params.reasoning_effort != "none"
    return kwargs


def prepare_chat(params: ChatRequest, served: ServedModel) -> Prepared:
    served.check_name(params.model)
    sampling = _sampling(params, served)
    choice = params.tool_choice
    named = isinstance(choice, NamedToolChoice)
    try:
        plan = plan_tools(
            served.tokenizer,
            [t.model_dump(exclude_none=True) for t in params.tools or []],
            "function" if named else (choice or "auto"),
            choice.function.name if named else None,
        )
    except ToolCallSyntaxError as e:
        raise invalid(str(e), param="tools") from e
    files = MediaFiles(served.media)
    messages = template_messages(params.messages, files)
    ids = render_chat(served, messages, plan, _template_kwargs(params, served))
    generation = generation_request(
        served, ids, params.max_completion_tokens or params.max_tokens, sampling,
        prompt_param="messages", stop=_stops(params.stop),
        top_logprobs=(params.top_logprobs or 0) if params.logprobs else None,
        banned_tokens=plan.banned_tokens, media=files,
    )  # fmt: skip
    return Prepared(
        generation, params.model, bool(params.stream),
        bool(params.stream_options and params.stream_options.include_usage),
        bool(params.logprobs),
    )  # fmt: skip


def prepare_completion(params: CompletionRequest, served: ServedModel) -> Prepared:
    served.check_name(params.model)
    sampling = _sampling(params, served)
    prompt = params.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise invalid("prompt: this server takes one prompt per request", param="prompt")
        prompt = prompt[0]
    ids = encode_completion_prompt(served, prompt)
    if params.echo and params.logprobs is not None:
        raise invalid("echo with logprobs (prompt log-probabilities) is not supported", "echo")
    generation = generation_request(
        served, ids, params.max_tokens, sampling, prompt_param="prompt", stop=_stops(params.stop),
        top_logprobs=params.logprobs,
    )  # fmt: skip
    echo = ""
    if params.echo:
        echo = prompt if isinstance(prompt, str) else served.tokenizer.decode(ids)
    return Prepared(
        generation, params.model, bool(params.stream),
        bool(params.stream_options and params.stream_options.include_usage),
        params.logprobs is not None, echo,
    )  # fmt: skip


# --- answers ------------------------------------------------------------------------------------


def usage(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def finish_reason(finish: FinishEvent, called_tools: bool) -> str:
    if finish.reason == LENGTH:
        return "length"
    return "tool_calls" if called_tools else "stop"


def _logprob_entry(chosen: TokenLogprob, top: list[TokenLogprob]) -> dict[str, Any]:
    def one(t: TokenLogprob) -> dict[str, Any]:
        return {"token": t.text, "logprob": t.logprob, "bytes": t.bytes}

    return one(chosen) | {"top_logprobs": [one(t) for t in top]}


def _tool_call(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    out = {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call.name, "arguments": arguments_json(call)},
    }
    return out if index is None else {"index": index, **out}


def _completion_logprobs(entries: list[tuple[TokenLogprob, list[TokenLogprob]]], offset: int):
    text_offset = []
    for chosen, _ in entries:
        text_offset.append(offset)
        offset += len(chosen.text)
    return {
        "tokens": [c.text for c, _ in entries],
        "token_logprobs": [c.logprob for c, _ in entries],
        "top_logprobs": [{t.text: t.logprob for t in top} for _, top in entries],
        "text_offset": text_offset,
    }


class Answer:
    """Response bodies and stream chunks for one prepared request."""

    def __init__(self, prepared: Prepared, chat: bool):
        self.prepared = prepared
        self.chat = chat
        prefix = "chatcmpl" if chat else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _envelope(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created,
                "model": self.prepared.model}  # fmt: skip

    def body(self, reply: Reply) -> dict[str, Any]:
        finish = finish_reason(reply.finish, self.chat and bool(reply.calls))
        if self.chat:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": reply.text if reply.text or not reply.calls else None,
                "refusal": None,
            }
            if reply.thinking:
                message["reasoning_content"] = reply.thinking
            if reply.calls:
                message["tool_calls"] = [_tool_call(c) for c in reply.calls]
            logprobs = None
            if self.prepared.logprobs:
                logprobs = {
                    "content": [_logprob_entry(*e) for e in reply.logprobs],
                    "refusal": None,
                }
            choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": logprobs}
        else:
            echo = self.prepared.echo
            logprobs = None
            if self.prepared.logprobs:
                logprobs = _completion_logprobs(reply.logprobs, len(echo))
            choice = {"index": 0, "text": echo + reply.text, "finish_reason": finish,
                      "logprobs": logprobs}  # fmt: skip
        return self._envelope(self.object) | {
            "choices": [choice],
            "usage": usage(reply.finish.usage),
        }

    def _chunk(self, choice: dict[str, Any] | None, usage_value=None) -> str:
        object_name = "chat.completion.chunk" if self.chat else "text_completion"
        data = self._envelope(object_name) | {"choices": [] if choice is None else [choice]}
        if self.prepared.include_usage:
            data["usage"] = usage_value
        return sse.event(data)

    def _choice(self, content: dict[str, Any], finish: str | None, logprobs=None) -> dict[str, Any]:
        if self.chat:
            return {"index": 0, "delta": content, "finish_reason": finish, "logprobs": logprobs}
        return {"index": 0, "text": content.get("content", ""), "finish_reason": finish,
                "logprobs": logprobs}  # fmt: skip

    async def stream(self, stream: RequestStream, parser: ReplyParser) -> AsyncIterator[str]:
        """Server-sent events: a first chunk, one per token that adds something, a last one with
        the finish reason, the usage chunk when asked for, `[DONE]`; an error event instead of the
        last chunk when the request fails mid-way."""
        tokenizer = parser.tokenizer
        first = (
            {"role": "assistant", "content": ""} if self.chat else {"content": self.prepared.echo}
        )
        yield self._chunk(self._choice(first, None))
        calls = 0
        async for event, parts in reply_parts(stream, parser):
            delta: dict[str, Any] = {}
            for part in parts:
                if part.kind == TEXT:
                    delta["content"] = delta.get("content", "") + part.text
                elif part.kind == THINKING and self.chat:
                    delta["reasoning_content"] = delta.get("reasoning_content", "") + part.text
                elif part.kind == TOOL_USE and self.chat:
                    delta.setdefault("tool_calls", []).append(_tool_call(part.call, calls))
                    calls += 1
            if isinstance(event, FinishEvent):
                if delta:
                    yield self._chunk(self._choice(delta, None))
                error = finish_error(event)
                if error is not None:
                    yield sse.event(error.openai())
                else:
                    yield self._chunk(self._choice({}, finish_reason(event, calls > 0)))
                    if self.prepared.include_usage:
                        yield self._chunk(None, usage(event.usage))
                yield sse.DONE
                return
            logprobs = None
            if self.prepared.logprobs and is_content(tokenizer, event):
                chosen, top = token_logprobs(tokenizer, event)
                if self.chat:
                    logprobs = {"content": [_logprob_entry(chosen, top)], "refusal": None}
                else:
                    logprobs = _completion_logprobs([(chosen, top)], 0)
            if delta or logprobs:
                yield self._chunk(self._choice(delta, None, logprobs))
