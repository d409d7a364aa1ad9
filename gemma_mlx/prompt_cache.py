"""Prompt caches in files (mlx-lm's `cache_prompt` / `--prompt-cache-file`): prefill a long prompt
once, save its KV caches, and start later generations from them.

A file holds the caches after the whole prompt, the prompt's token ids, and the identity of the
model (shapes and the weights' fingerprint), with a checksum (`gemma_mlx.cache_files`); it is
written atomically and refused, with an error naming it, by another model or when damaged.

`load_prompt_cache` returns a `PromptCache`: the layer caches (a list, so `stream_generate` takes
it as `prompt_cache`) and the tokens they hold. As in mlx-lm, the prompt given with it is what
follows the cached prompt: a text is encoded without a BOS token and appended, token ids are
appended. Generation extends the caches in place, and `tokens` follows (prompt, continuation and
the generated tokens the caches hold), so a second call continues from there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx

from gemma_mlx.cache_files import (
    cache_arrays,
    cache_fields,
    check_identity,
    identity_fields,
    read_cache_file,
    restored_caches,
    write_cache_file,
)
from gemma_mlx.decode import ProgressCallback, TokenStep, default_prefill_step_size, prefill
from gemma_mlx.errors import GemmaMLXError, OptionError, PromptError
from gemma_mlx.memory_guard import check_context

FORMAT = "gemma_mlx.prompt_cache/1"
FIELDS = ("signature", "weights", "tokens", "cache_types", "meta_state")
WHAT = "a prompt cache"


class PromptCacheError(GemmaMLXError, ValueError):
    """A prompt-cache file that is unreadable, damaged, or belongs to another model."""


class PromptCache(list):
    """A model's layer caches (`model.make_cache()`'s list) and the token ids they hold."""

    def __init__(self, caches: Sequence[Any], tokens: Sequence[int]):
        super().__init__(caches)
        self.tokens = list(tokens)

    def continued(self, tokenizer: Any, prompt: Any, media: Sequence[Any] = ()) -> list[int]:
        """The whole prompt: the cached tokens followed by `prompt` (text, encoded without special
        tokens, or token ids); `media` (images or audio given with it) is refused."""
        if media:
            raise OptionError("a prompt cache from a file continues a text prompt: no images/audio")
        if isinstance(prompt, mx.array):
            prompt = prompt.reshape(-1).tolist()
        if isinstance(prompt, str):
            if not prompt:
                raise PromptError("the prompt is empty")
            return self.tokens + tokenizer.encode(prompt, add_special_tokens=False)
        if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
            return self.tokens + list(prompt)
        raise OptionError(
            "with a prompt cache from a file, the prompt is the text or token ids that follow the "
            "cached prompt (not chat messages)"
        )

    def tracking(self, steps: Iterator[TokenStep], prompt: Sequence[int]) -> Iterator[TokenStep]:
        """`steps` (generating after `prompt`), keeping `tokens` equal to what the caches hold."""
        generated: list[int] = []
        try:
            for step in steps:
                generated.append(step.token if isinstance(step, TokenStep) else int(step[0]))
                yield step
        finally:
            if hasattr(steps, "close"):
                steps.close()
            self.tokens = (list(prompt) + generated)[: self[0].offset]


def make_prompt_cache(model: Any, max_kv_size: int | None = None) -> list:
    """`model.make_cache()`; with `max_kv_size`, full-attention layers keep only their last
    `max_kv_size` positions (a rotating cache, mlx-lm's `--max-kv-size`): memory stays bounded,
    but what lies further back is no longer attended to, so a longer context loses it."""
    return model.make_cache() if max_kv_size is None else model.make_cache(max_kv_size=max_kv_size)


def cache_prompt(
    model: Any,
    tokens: Sequence[int],
    prefill_step_size: int | None = None,
    progress: ProgressCallback | None = None,
    max_kv_size: int | None = None,
) -> PromptCache:
    """Fresh caches holding all of `tokens` (prefilled in chunks; no logits computed);
    `max_kv_size` as in `stream_generate`."""
    if not tokens:
        raise PromptError("the prompt is empty")
    check_context(model, len(tokens), prefill_step_size=prefill_step_size, max_kv_size=max_kv_size)
    caches = make_prompt_cache(model, max_kv_size)
    step = default_prefill_step_size() if prefill_step_size is None else prefill_step_size
    prefill(model, caches, list(tokens), step, progress)
    return PromptCache(caches, tokens)


def save_prompt_cache(
    path: str | Path, cache: PromptCache, model: Any, force: bool = False
) -> None:
    """Write `cache` (the caches of `model` and their tokens) to `path`, atomically; an existing
    file is replaced only with `force` (and only one gemma_mlx wrote)."""
    if not isinstance(cache, PromptCache):
        raise OptionError("save_prompt_cache takes a PromptCache (from cache_prompt)")
    if not cache.tokens or any(c.offset != len(cache.tokens) for c in cache):
        raise OptionError("the prompt cache's layers do not hold its tokens")
    fields = identity_fields(model) | {"tokens": json.dumps(cache.tokens), **cache_fields(cache)}
    write_cache_file(Path(path), cache_arrays(cache), FORMAT, fields, force=force)


def load_prompt_cache(path: str | Path, model: Any) -> PromptCache:
    """The prompt cache saved in `path` by `save_prompt_cache`, for `model`, which must hold the
    same weights (checked by their fingerprint); damaged files are refused (by a checksum)."""
    path = Path(path)
    arrays, fields = read_cache_file(path, {FORMAT: FIELDS}, PromptCacheError, WHAT)
    check_identity(path, fields, model, PromptCacheError)
    caches = restored_caches(path, arrays, fields, PromptCacheError)
    tokens = fields["tokens"]
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise PromptCacheError(f"{path}: damaged (its token list is malformed)")
    if len(caches) != len(model.make_cache()):
        raise PromptCacheError(f"{path}: its caches do not match this model's")
    if not tokens or any(c.offset != len(tokens) for c in caches):
        raise PromptCacheError(f"{path}: its caches and token list disagree")
    return PromptCache(caches, tokens)
