"""Tokenizer, streaming detokenizer and chat template for Gemma, without torch.

`load_tokenizer(model_dir)` reads `tokenizer.json` with the `tokenizers` library, the special tokens
and chat template from `tokenizer_config.json` (or `chat_template.jinja`) and the end-of-sequence
ids from `generation_config.json`, and renders chat templates with jinja2 the way transformers does.

Gemma 4 marks structure with single special tokens: `<|channel>NAME\\n ... <channel|>` (the thinking
channel), `<|tool_call> ... <tool_call|>` and `<|"|>` (a string quote inside tool calls). The
detokenizer turns them into channel switches instead of text, so callers can show or hide thinking.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from gemma_mlx.errors import GemmaMLXError

ANSWER = "answer"
THOUGHT = "thought"
TOOL_CALL = "tool_call"

CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<|tool_call>", "<tool_call|>"
STRING_QUOTE = '<|"|>'
# Tokens that end a turn in Gemma 3 and Gemma 4 chats; generation always stops on them.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<turn|>")
# A channel name longer than this without its newline is not a header: treat it as thinking.
MAX_CHANNEL_NAME = 32

_INSTRUCTION_TUNED = re.compile(r"(^|[-_/. ])(it|instruct|chat)([-_/. ]|$)", re.IGNORECASE)


class TokenizerError(GemmaMLXError, ValueError):
    """Missing or unreadable tokenizer files, or a chat template that cannot be rendered."""


@dataclass(frozen=True)
class Markers:
    """Ids of the structure tokens a vocabulary has (Gemma 4); absent ones are None."""

    channel_open: int | None = None
    channel_close: int | None = None
    tool_call_open: int | None = None
    tool_call_close: int | None = None
    string_quote: int | None = None

    @classmethod
    def from_vocab(cls, token_to_id) -> Markers:
        return cls(
            channel_open=token_to_id(CHANNEL_OPEN),
            channel_close=token_to_id(CHANNEL_CLOSE),
            tool_call_open=token_to_id(TOOL_CALL_OPEN),
            tool_call_close=token_to_id(TOOL_CALL_CLOSE),
            string_quote=token_to_id(STRING_QUOTE),
        )


@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` plus what generation needs to know about its special tokens.

    `special_ids` are control tokens: never decoded as text. `eos_token_ids` end generation.
    `instruction_tuned` decides the default prompt mode (chat template or plain completion).
    """

    backend: Any  # tokenizers.Tokenizer
    bos_token_id: int | None
    eos_token_ids: frozenset[int]
    special_ids: frozenset[int]
    add_bos_token: bool = True
    chat_template: str | None = None
    instruction_tuned: bool = False
    markers: Markers = field(default_factory=Markers)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.backend.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        first = min(self.eos_token_ids, default=None)
        return None if first is None else self.backend.id_to_token(first)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognised.

        With `add_special_tokens`, BOS is prepended unless the text already starts with it (a
        rendered chat template does).
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the model's template (transformers' semantics and jinja setup).

        Extra keyword arguments reach the template (e.g. `enable_thinking=True` for Gemma 4).
        """
        if self.chat_template is None:
            raise TokenizerError(
                "this model's tokenizer has no chat template: pass a plain text prompt"
            )
        text = render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def detokenizer(self, channel: str = ANSWER) -> StreamingDetokenizer:
        return StreamingDetokenizer(self, channel)

    def channel_after(self, ids: Sequence[int]) -> str:
        """The channel generation continues in after `ids` (a prompt may open the thinking one)."""
        m = self.markers
        for token in reversed(ids):
            if token in (m.channel_close, m.tool_call_close):
                return ANSWER
            if token == m.channel_open:
                return THOUGHT
            if token == m.tool_call_open:
                return TOOL_CALL
        return ANSWER


class StreamingDetokenizer:
    """Token ids in, text deltas out; a delta is never a partial UTF-8 character.

    Gemma spells rare characters as byte tokens (`<0xE2><0x82><0xAC>`): their text is held back
    until the character is complete. Deltas are computed against a window that starts one step
    back, so a decoder that treats the first token specially cannot change text already given out.
    """

    def __init__(self, tokenizer: Tokenizer, channel: str = ANSWER):
        self._tokenizer = tokenizer
        self.channel = channel
        self._ids: list[int] = []
        self._start = 0  # ids[_start:_read] were already given out; they are context for the rest
        self._read = 0
        self._header: str | None = None  # the channel name after <|channel>, until its newline

    def add_token(self, token: int) -> tuple[str, str]:
        """Feed one token; return `(channel, text)`: the new text and the channel it belongs to.

        A marker token returns what was pending in the channel it closes.
        """
        if token in self._tokenizer.special_ids:
            return self._add_special(token)
        self._ids.append(token)
        text = self._take(final=False)
        if self._header is None:
            return self.channel, text
        self._header += text
        name, newline, rest = self._header.partition("\n")
        if newline or len(self._header) > MAX_CHANNEL_NAME:
            self._header = None
            self.channel = name.strip() if newline and name.strip() else THOUGHT
            return self.channel, rest if newline else name
        return self.channel, ""

    def finalize(self) -> tuple[str, str]:
        """Everything still held back (an incomplete character comes out as U+FFFD)."""
        text = self._take(final=True)
        if self._header is not None:
            text, self._header = self._header + text, None
        return self.channel, text

    def _add_special(self, token: int) -> tuple[str, str]:
        channel, pending = self.finalize()
        m = self._tokenizer.markers
        if token == m.string_quote:
            return channel, pending + '"'
        if token == m.channel_open:
            self._header = ""
        elif token == m.tool_call_open:
            self.channel = TOOL_CALL
        elif token in (m.channel_close, m.tool_call_close):
            self.channel = ANSWER
        return channel, pending

    def _take(self, final: bool) -> str:
        decode = self._tokenizer.decode
        seen = decode(self._ids[self._start : self._read], skip_special_tokens=False)
        full = decode(self._ids[self._start :], skip_special_tokens=False)
        if not final and (full.endswith("\ufffd") or len(full) <= len(seen)):
            return ""
        delta = full[len(seen) :]
        self._ids = self._ids[self._read :]
        self._start, self._read = 0, len(self._ids)
        if final:
            self._ids, self._read = [], 0
        return delta


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str):
    raise TokenizerError(f"chat template: {message}")


@lru_cache(maxsize=8)
def _compile_template(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template: syntax error on line {e.lineno}: {e.message}") from e


def render_chat_template(
    template: str, messages: Sequence[Mapping[str, Any]], **variables: Any
) -> str:
    """Render a Hugging Face chat template (trim_blocks, lstrip_blocks, loop controls, tojson)."""
    import jinja2

    try:
        return _compile_template(template).render(messages=list(messages), **variables)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template: {e}") from e
    except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as e:
        # A template is code from the model's files: a damaged one fails like this.
        raise TokenizerError(f"chat template: {type(e).__name__}: {e}") from e


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{jinja_file}: not valid UTF-8 ({e})") from e
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None:
        legacy = _read_json(model_dir / "chat_template.json")
        template = legacy.get("chat_template")
    return template if isinstance(template, str) else None


def _looks_instruction_tuned(model_dir: Path, *configs: dict[str, Any]) -> bool:
    """Instruction-tuned checkpoints say so in their name (`gemma-4-e2b-it`, `...-instruct`)."""
    parts = model_dir.resolve().parts
    names = [parts[-1]]
    if len(parts) >= 3 and parts[-2] == "snapshots":  # huggingface_hub cache: models--org--name
        names.append(parts[-3])
    for config in configs:
        for key in ("_name_or_path", "name_or_path", "source_name", "finetune"):
            if isinstance(config.get(key), str):
                names.append(config[key])
    return any(_INSTRUCTION_TUNED.search(name) for name in names)


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer of a model directory (HF format or converted by gemma_mlx.convert)."""
    from tokenizers import Tokenizer as Backend

    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"{path}: missing (the model directory needs its tokenizer.json)")
    try:
        backend = Backend.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"{path}: cannot be read ({e})") from e

    tok_config = _read_json(model_dir / "tokenizer_config.json")
    gen_config = _read_json(model_dir / "generation_config.json")
    model_config = _read_json(model_dir / "config.json")

    def token_id(key: str) -> int | None:
        text = _token_text(tok_config.get(key))
        return None if text is None else backend.token_to_id(text)

    bos = token_id("bos_token")
    if bos is None:
        bos = next(
            iter(_ids(gen_config.get("bos_token_id") or model_config.get("bos_token_id"))), None
        )
    eos = set(_ids(gen_config.get("eos_token_id"))) | set(_ids(model_config.get("eos_token_id")))
    if (eos_token := token_id("eos_token")) is not None:
        eos.add(eos_token)
    eos |= {i for t in END_OF_TURN_TOKENS if (i := backend.token_to_id(t)) is not None}
    if not eos:
        raise TokenizerError(
            f"{model_dir}: no end-of-sequence token (eos_token_id in generation_config.json)"
        )
    special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    return Tokenizer(
        backend=backend,
        bos_token_id=bos,
        eos_token_ids=frozenset(eos),
        special_ids=frozenset(special),
        add_bos_token=bool(tok_config.get("add_bos_token", bos is not None)),
        chat_template=_chat_template(model_dir, tok_config),
        instruction_tuned=_looks_instruction_tuned(model_dir, model_config, tok_config),
        markers=Markers.from_vocab(backend.token_to_id),
    )
