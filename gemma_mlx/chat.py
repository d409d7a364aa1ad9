"""A multi-turn conversation that keeps its KV cache between turns (for notebooks and the REPL).

Each turn renders the whole conversation with the chat template, keeps the cached tokens it shares
with that rendering, and prefills only the rest, so the result is exactly that of a fresh run over
the whole conversation. Normally the shared part is everything cached: only the new message is
prefilled. (Gemma 4's template drops earlier turns' thinking; the cache is then rolled back to
where the renderings differ.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx

from gemma_mlx.errors import GemmaMLXError
from gemma_mlx.generate import GenerationResponse, stream_generate
from gemma_mlx.tokenizer import ANSWER, Tokenizer

FORMAT = "gemma_mlx.chat_session/1"


class SessionFileError(GemmaMLXError, ValueError):
    """A saved session that is unreadable or belongs to another model."""


def _model_signature(model: Any, tokenizer: Tokenizer) -> dict[str, Any]:
    args = getattr(model, "args", None)
    keys = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")
    return {k: getattr(args, k, None) for k in keys} | {"tokenizer_vocab": tokenizer.vocab_size}


def _shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation with `model`; `send`/`stream` add a user message and generate the reply.

    `options` are `stream_generate` options used for every turn (a turn may override them);
    `chat_template_kwargs` reach the template (e.g. `enable_thinking=True` for Gemma 4).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        system: str | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ):
        if tokenizer.chat_template is None:
            raise GemmaMLXError("this model's tokenizer has no chat template: it cannot chat")
        self.model = model
        self.tokenizer = tokenizer
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.options = options
        self.messages: list[dict[str, Any]] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self.cache = model.make_cache()
        self.tokens: list[int] = []  # the tokens whose keys and values `cache` holds

    def stream(self, message: str, **options: Any) -> Iterator[GenerationResponse]:
        """Add the user `message` and stream the reply (see `stream_generate`)."""
        messages = [*self.messages, {"role": "user", "content": message}]
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, **self.chat_template_kwargs
        )
        self._rewind(min(_shared_prefix(self.tokens, ids), len(ids) - 1))
        generated: list[int] = []
        answer: list[str] = []
        try:
            for response in stream_generate(
                self.model, self.tokenizer, ids, prompt_cache=self.cache, **(self.options | options)
            ):
                generated.append(response.token)
                if response.channel == ANSWER:
                    answer.append(response.text)
                yield response
        finally:
            # Also after an interrupted turn: the cache holds a prefix of prompt + reply.
            self.tokens = (ids + generated)[: self.cache[0].offset]
            if generated:
                self.messages = [*messages, {"role": "assistant", "content": "".join(answer)}]

    def send(self, message: str, **options: Any) -> str:
        """Add the user `message`; return the reply's answer text."""
        reply = [r.text for r in self.stream(message, **options) if r.channel == ANSWER]
        return "".join(reply)

    def _rewind(self, n: int) -> None:
        """Keep the first `n` cached tokens; start over when a cache cannot roll back that far."""
        drop = len(self.tokens) - n
        if drop and all(c.trim(drop) == drop for c in self.cache):
            self.tokens = self.tokens[:n]
        elif drop:
            self.cache = self.model.make_cache()
            self.tokens = []

    def save(self, path: str | Path) -> None:
        """Write the conversation and its KV cache to `path` (safetensors); never overwrites."""
        path = Path(path)
        if path.exists():
            raise SessionFileError(f"{path}: already exists (choose another name)")
        arrays = {
            f"cache.{i}.{j}": a for i, c in enumerate(self.cache) for j, a in enumerate(c.state)
        }
        metadata = {
            "format": FORMAT,
            "signature": json.dumps(_model_signature(self.model, self.tokenizer)),
            "messages": json.dumps(self.messages),
            "tokens": json.dumps(self.tokens),
            "chat_template_kwargs": json.dumps(self.chat_template_kwargs),
            "cache_types": json.dumps([type(c).__name__ for c in self.cache]),
            "meta_state": json.dumps([list(c.meta_state) for c in self.cache]),
        }
        partial = path.with_name(f".{path.name}.partial.safetensors")
        mx.save_safetensors(str(partial), arrays, metadata=metadata)
        os.replace(partial, path)

    @classmethod
    def load(
        cls, path: str | Path, model: Any, tokenizer: Tokenizer, **options: Any
    ) -> ChatSession:
        """A session saved by `save`, continued with `model` (which must be the same model)."""
        path = Path(path)
        try:
            arrays, metadata = mx.load(str(path), return_metadata=True)
        except (OSError, RuntimeError, ValueError) as e:
            raise SessionFileError(f"{path}: cannot be read as a saved chat session ({e})") from e
        if metadata.get("format") != FORMAT:
            raise SessionFileError(f"{path}: not a saved chat session (format {FORMAT})")
        if json.loads(metadata["signature"]) != _model_signature(model, tokenizer):
            raise SessionFileError(f"{path}: was saved with a different model")
        session = cls(
            model,
            tokenizer,
            chat_template_kwargs=json.loads(metadata["chat_template_kwargs"]),
            **options,
        )
        types = json.loads(metadata["cache_types"])
        if types != [type(c).__name__ for c in session.cache]:
            raise SessionFileError(f"{path}: its caches do not match this model's")
        session.tokens = json.loads(metadata["tokens"])
        session.messages = json.loads(metadata["messages"])
        if session.tokens:
            for i, (cache, meta) in enumerate(
                zip(session.cache, json.loads(metadata["meta_state"]), strict=True)
            ):
                cache.state = (arrays[f"cache.{i}.0"], arrays[f"cache.{i}.1"])
                cache.meta_state = tuple(meta)
        if session.cache and session.cache[0].offset != len(session.tokens):
            raise SessionFileError(f"{path}: its cache and token list disagree")
        return session
