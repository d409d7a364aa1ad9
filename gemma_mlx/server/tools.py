"""Gemma 4 tool calls and thinking: a reply's tokens split into answer text, thinking and parsed
tool calls; what a request's `tool_choice` does to the prompt.

Gemma 4 writes a tool call as `<|tool_call>call:NAME{key:value,...}<tool_call|>`: bare keys,
strings between `<|"|>` quotes (so a `"` or `}` inside a string needs no escape), JSON-like
numbers, booleans and null, nested `{...}` objects and `[...]` arrays. Thinking is the
`<|channel>thought ... <channel|>` span, which `gemma_mlx.tokenizer`'s detokenizer already routes to
its own channel. Both APIs (OpenAI, Anthropic) shape the parts this module produces.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gemma_mlx.errors import GemmaMLXError
from gemma_mlx.server.engine import TokenEvent
from gemma_mlx.tokenizer import ANSWER, STRING_QUOTE, TOOL_CALL, TOOL_CALL_CLOSE, TOOL_CALL_OPEN

CALL = "call:"
TEXT, THINKING, TOOL_USE = "text", "thinking", "tool_call"


class ToolCallSyntaxError(GemmaMLXError, ValueError):
    """Tool-call text that is not `call:NAME{...}`."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


class _Reader:
    """Recursive descent over Gemma 4's argument syntax."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> ToolCallSyntaxError:
        return ToolCallSyntaxError(f"tool call: {what} at offset {self.pos} of {self.text!r}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self, s: str) -> bool:
        self.skip_space()
        return self.text.startswith(s, self.pos)

    def expect(self, s: str) -> None:
        if not self.peek(s):
            raise self.fail(f"expected {s!r}")
        self.pos += len(s)

    def string(self) -> str:
        self.expect(STRING_QUOTE)
        end = self.text.find(STRING_QUOTE, self.pos)
        if end < 0:
            raise self.fail("unterminated string")
        value, self.pos = self.text[self.pos : end], end + len(STRING_QUOTE)
        return value

    def bare(self, stops: str, what: str) -> str:
        """An unquoted word, up to the first character in `stops`."""
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in stops:
            self.pos += 1
        word = self.text[start : self.pos].strip()
        if not word:
            raise self.fail(f"expected {what}")
        return word

    def key(self) -> str:
        return self.string() if self.peek(STRING_QUOTE) else self.bare(":,{}[]", "a key")

    def items(self, open_: str, close: str, item) -> None:
        """`open_ item, item, ... close`, calling `item()` for each."""
        self.expect(open_)
        if self.peek(close):
            self.pos += len(close)
            return
        while True:
            item()
            if not self.peek(","):
                self.expect(close)
                return
            self.pos += 1

    def obj(self) -> dict[str, Any]:
        out: dict[str, Any] = {}

        def member() -> None:
            key = self.key()
            self.expect(":")
            out[key] = self.value()

        self.items("{", "}", member)
        return out

    def array(self) -> list[Any]:
        out: list[Any] = []
        self.items("[", "]", lambda: out.append(self.value()))
        return out

    def value(self) -> Any:
        if self.peek(STRING_QUOTE):
            return self.string()
        if self.peek("{"):
            return self.obj()
        if self.peek("["):
            return self.array()
        word = self.bare(",}]", "a value")
        try:
            return json.loads(word)  # numbers, true, false, null
        except json.JSONDecodeError:
            return word  # a bare word: keep it as the string it reads as


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `call:NAME{...}` in `text` (the inside of one `<|tool_call>` span)."""
    reader = _Reader(text)
    calls = []
    while True:
        reader.skip_space()
        if reader.pos == len(text):
            break
        reader.expect(CALL)
        name = reader.bare("{", "a function name")
        calls.append(ToolCall(name, reader.obj()))
    if not calls:
        raise reader.fail("no call")
    return calls


@dataclass(frozen=True)
class ReplyPart:
    """A piece of a reply: TEXT or THINKING text, or a parsed TOOL_USE call."""

    kind: str
    text: str = ""
    call: ToolCall | None = None


@dataclass
class ReplyParser:
    """Turns a reply's `TokenEvent`s into `ReplyPart`s as they stream.

    Text comes out as it arrives; a tool call when its closing marker (or the end of the reply)
    completes it. A span that does not parse comes out as answer text, markers included, so
    nothing the model wrote is lost. `prompt` matters when it ends inside a tool call (a request
    that forces one): that start of the call is part of it.
    """

    tokenizer: Any
    prompt: Sequence[int]
    _call_ids: list[int] | None = field(default=None, init=False)  # inside a tool call

    def __post_init__(self) -> None:
        m = self.tokenizer.markers
        if self.tokenizer.channel_after(self.prompt) == TOOL_CALL:
            opened = len(self.prompt) - 1 - list(reversed(self.prompt)).index(m.tool_call_open)
            self._call_ids = list(self.prompt[opened + 1 :])

    def feed(self, event: TokenEvent) -> list[ReplyPart]:
        m = self.tokenizer.markers
        if self._call_ids is not None:
            if event.token == m.tool_call_close:
                return self._end_call()
            if event.token not in self.tokenizer.special_ids or event.token == m.string_quote:
                self._call_ids.append(event.token)
            return []
        parts = [ReplyPart(TEXT if event.channel == ANSWER else THINKING, event.text)]
        if event.token == m.tool_call_open:
            self._call_ids = []
        return [p for p in parts if p.text]

    def finish(self) -> list[ReplyPart]:
        """Whatever a reply that ended inside a tool call leaves."""
        return self._end_call() if self._call_ids is not None else []

    def _end_call(self) -> list[ReplyPart]:
        raw = self.tokenizer.decode(self._call_ids, skip_special_tokens=False)
        self._call_ids = None
        try:
            return [ReplyPart(TOOL_USE, call=c) for c in parse_tool_calls(raw)]
        except ToolCallSyntaxError:
            return [ReplyPart(TEXT, TOOL_CALL_OPEN + raw + TOOL_CALL_CLOSE)]


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools and tool choice do: the tools the template declares, text that
    starts the reply (a forced call), tokens the reply may not use (no call allowed)."""

    tools: list[dict[str, Any]] | None = None
    reply_prefix: str = ""
    banned_tokens: tuple[int, ...] = ()


def plan_tools(
    tokenizer: Any, tools: Sequence[Mapping[str, Any]] | None, choice: str | None, name: str | None
) -> ToolPlan:
    """`choice` is "auto", "none", "required" (some tool) or "function" (the tool `name`);
    tools are OpenAI-shaped (`{"type": "function", "function": {...}}`), as templates expect."""
    if not tools:
        return ToolPlan()
    if tokenizer.markers.tool_call_open is None:
        raise ToolCallSyntaxError(
            "tools: this model's vocabulary has no tool-call tokens (a Gemma 4 model has them)"
        )
    names = {t["function"]["name"] for t in tools}
    if choice == "none":
        return ToolPlan(banned_tokens=(tokenizer.markers.tool_call_open,))
    if choice == "required":
        return ToolPlan(list(tools), TOOL_CALL_OPEN + CALL)
    if choice == "function":
        if name not in names:
            raise ToolCallSyntaxError(f"tool_choice: no tool named {name!r} among the tools")
        return ToolPlan(list(tools), f"{TOOL_CALL_OPEN}{CALL}{name}{{")
    return ToolPlan(list(tools))


def arguments_json(call: ToolCall) -> str:
    return json.dumps(call.arguments, ensure_ascii=False)
