"""A multi-turn conversation that keeps its KV cache between turns (for notebooks and the REPL).

Each turn renders the whole conversation with the chat template, keeps the cached tokens it shares
with that rendering, and prefills only the rest, so the result is exactly that of a fresh run over
the whole conversation. Normally the shared part is everything cached: only the new message is
prefilled. (Gemma 4's template drops earlier turns' thinking; the cache is then rolled back to
where the renderings differ.)

Images and audio (a model loaded with its towers) are encoded once: the session keeps their soft
tokens by content hash and its history refers to them by that hash (`EncodedMedia`), so a later
turn re-encodes nothing and keeps them in the cache; a saved session holds them too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx

from gemma_mlx.cache import kv_quantization_of, quantize_caches
from gemma_mlx.cache_files import (
    cache_arrays,
    cache_fields,
    check_identity,
    identity_fields,
    read_cache_file,
    write_cache_file,
)
from gemma_mlx.errors import GemmaMLXError, OptionError
from gemma_mlx.generate import (
    GenerationResponse,
    check_generation_options,
    prepare_prompt,
    stream_generate,
)
from gemma_mlx.media.image import DEFAULT_SOFT_TOKENS
from gemma_mlx.media.messages import (
    from_json,
    map_sources,
    to_json,
    user_content,
    with_encoded,
)
from gemma_mlx.media.prompt import EncodedMedia, reusable_prefix
from gemma_mlx.models.gemma4_multimodal import MediaItem
from gemma_mlx.options import check_text
from gemma_mlx.prompt_cache import make_prompt_cache
from gemma_mlx.tokenizer import ANSWER, Tokenizer

# /2: the weights' fingerprint and a checksum over everything saved. /3: images and audio (the
# "media" field, and their soft tokens as `media.<key>` arrays); /2 files still load.
FORMAT = "gemma_mlx.chat_session/3"
# The metadata a session file holds, all JSON; the checksum covers them and the arrays.
FIELDS_2 = (
    "signature", "weights", "messages", "tokens", "chat_template_kwargs", "cache_types",
    "meta_state",
)  # fmt: skip
FIELDS = (*FIELDS_2, "media")
FORMATS = {"gemma_mlx.chat_session/2": FIELDS_2, FORMAT: FIELDS}
MEDIA_ARRAY = "media."


class SessionFileError(GemmaMLXError, ValueError):
    """A saved session that is unreadable, damaged, or belongs to another model."""


def _media_keys(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """The keys of the `EncodedMedia` sources in `messages`."""
    keys: list[str] = []

    def note(_: str, source: Any, __: int) -> Any:
        if isinstance(source, EncodedMedia):
            keys.append(source.key)
        return source

    map_sources(messages, note)
    return keys


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
        check_generation_options(model, options)
        if options.get("images") or options.get("audio"):
            raise OptionError("a chat session takes images and audio with a message (send/stream)")
        if system is not None:
            check_text("system", system)
        self.model = model
        self.tokenizer = tokenizer
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.options = options
        self.messages: list[dict[str, Any]] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self.cache = self._fresh_cache()
        self.tokens: list[int] = []  # the tokens whose keys and values `cache` holds
        self.media: tuple[MediaItem, ...] = ()  # the images and clips among `tokens`
        self.encoded: dict[str, mx.array] = {}  # soft tokens of the history's media, by key

    def stream(
        self,
        message: str | Sequence[Mapping[str, Any]],
        images: Any = (),
        audio: Any = (),
        **options: Any,
    ) -> Iterator[GenerationResponse]:
        """Add the user `message` (text, with `images`/`audio` if any, or a list of content
        parts) and stream the reply (see `stream_generate`)."""
        content = user_content(message, images, audio)
        messages = [*self.messages, {"role": "user", "content": content}]
        options = self.options | options
        prompt = prepare_prompt(
            self.model, self.tokenizer, messages,
            max_soft_tokens=options.get("max_soft_tokens", DEFAULT_SOFT_TOKENS),
            chat_template_kwargs=self.chat_template_kwargs, encoded=self.encoded,
        )  # fmt: skip
        ids, items = prompt.tokens, () if prompt.media is None else prompt.media.items
        self._rewind(min(reusable_prefix(self.tokens, self.media, ids, items), len(ids) - 1))
        generated: list[int] = []
        answer: list[str] = []
        try:
            for response in stream_generate(
                self.model, self.tokenizer, prompt, prompt_cache=self.cache, **options
            ):
                generated.append(response.token)
                if response.channel == ANSWER:
                    answer.append(response.text)
                yield response
        finally:
            # Also after an interrupted turn: the cache holds a prefix of prompt + reply.
            self.tokens = (ids + generated)[: self.cache[0].offset]
            self.media = tuple(item for item in items if item.end <= len(self.tokens))
            if generated:
                keys = {
                    kind: [i.key for i in items if i.kind == kind] for kind in ("image", "audio")
                }
                self.messages = [
                    *with_encoded(messages, keys),
                    {"role": "assistant", "content": "".join(answer)},
                ]
            # Soft tokens are kept while the history or the cache refers to them.
            kept = {*_media_keys(self.messages), *(item.key for item in self.media)}
            self.encoded = {k: v for k, v in self.encoded.items() if k in kept}

    def send(
        self,
        message: str | Sequence[Mapping[str, Any]],
        images: Any = (),
        audio: Any = (),
        **options: Any,
    ) -> str:
        """Add the user `message` (see `stream`); return the reply's answer text."""
        reply = [
            r.text for r in self.stream(message, images, audio, **options) if r.channel == ANSWER
        ]
        return "".join(reply)

    def _fresh_cache(self) -> list:
        """Empty caches of the kinds the session's options ask for (`max_kv_size`, `kv_bits`)."""
        caches = make_prompt_cache(self.model, self.options.get("max_kv_size"))
        return quantize_caches(caches, kv_quantization_of(self.options))

    def _rewind(self, n: int) -> None:
        """Keep the first `n` cached tokens; start over when a cache cannot roll back that far."""
        drop = len(self.tokens) - n
        if drop and all(c.trim(drop) == drop for c in self.cache):
            self.tokens = self.tokens[:n]
        elif drop:
            self.cache = self._fresh_cache()
            self.tokens = []
        self.media = tuple(item for item in self.media if item.end <= len(self.tokens))

    def save(self, path: str | Path) -> None:
        """Write the conversation and its KV cache to `path` (safetensors), atomically: the file
        appears complete or not at all, and an existing file is never replaced."""
        path = Path(path)
        if path.exists():
            raise SessionFileError(f"{path}: already exists (choose another name)")
        arrays = cache_arrays(self.cache)
        arrays |= {MEDIA_ARRAY + key: value for key, value in self.encoded.items()}
        try:
            messages = json.dumps(to_json(self.messages))
        except TypeError as e:
            raise SessionFileError(f"{path}: the conversation cannot be saved as JSON ({e})") from e
        fields = identity_fields(self.model, self.tokenizer) | {
            "messages": messages,
            "tokens": json.dumps(self.tokens),
            "chat_template_kwargs": json.dumps(self.chat_template_kwargs),
            **cache_fields(self.cache),
            "media": json.dumps([list(item) for item in self.media]),
        }
        write_cache_file(path, arrays, FORMAT, fields)

    @classmethod
    def load(
        cls, path: str | Path, model: Any, tokenizer: Tokenizer, **options: Any
    ) -> ChatSession:
        """A session saved by `save`, continued with `model`, which must hold the same weights
        (checked by their fingerprint); damaged files are refused (checked by a checksum)."""
        path = Path(path)
        arrays, fields = read_cache_file(path, FORMATS, SessionFileError, "a chat session")
        check_identity(path, fields, model, SessionFileError, tokenizer)
        session = cls(model, tokenizer, chat_template_kwargs=fields["chat_template_kwargs"],
                      **options)  # fmt: skip
        if fields["cache_types"] != [type(c).__name__ for c in session.cache]:
            raise SessionFileError(f"{path}: its caches do not match this model's")
        try:
            session.tokens = [int(t) for t in fields["tokens"]]
            session.messages = from_json([dict(m) for m in fields["messages"]])
            session.media = tuple(MediaItem(*item) for item in fields.get("media", []))
            session.encoded = {
                name[len(MEDIA_ARRAY) :]: value
                for name, value in arrays.items()
                if name.startswith(MEDIA_ARRAY)
            }
            if session.tokens:
                for i, (cache, meta) in enumerate(
                    zip(session.cache, fields["meta_state"], strict=True)
                ):
                    n = sum(name.startswith(f"cache.{i}.") for name in arrays)
                    cache.state = [arrays[f"cache.{i}.{j}"] for j in range(n)]
                    cache.meta_state = tuple(meta)
        except (KeyError, TypeError, ValueError) as e:
            raise SessionFileError(f"{path}: its cache cannot be restored ({e})") from e
        if session.cache and session.cache[0].offset != len(session.tokens):
            raise SessionFileError(f"{path}: its cache and token list disagree")
        return session
