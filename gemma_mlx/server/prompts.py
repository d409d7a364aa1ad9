"""What both APIs share before generation: the served model's identity and defaults, chat
rendering through the model's (sandboxed) template, and the checks that turn options into a
`GenerationRequest` (context length, sampling ranges, logit bias ids).

Pure Python (tokenizer and template, no MLX), so the HTTP layer runs it in a worker thread.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gemma_mlx.sample import OptionError, check_sampling_options
from gemma_mlx.server.engine import GenerationRequest, SamplingOptions
from gemma_mlx.server.errors import APIError, invalid
from gemma_mlx.server.media import MediaFiles, MediaPolicy
from gemma_mlx.server.tools import ToolPlan
from gemma_mlx.tokenizer import TokenizerError


@dataclass(frozen=True)
class Defaults:
    """Server-wide defaults for what a request leaves out (the command line's sampling flags)."""

    max_tokens: int = 512
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServedModel:
    """The model as the APIs describe it: the names it answers to, its tokenizer and context,
    and what media it takes from where."""

    names: tuple[str, ...]
    tokenizer: Any
    context_length: int | None
    defaults: Defaults = field(default_factory=Defaults)
    media: MediaPolicy = field(default_factory=MediaPolicy)
    created: int = field(default_factory=lambda: int(time.time()))

    def check_name(self, name: str | None, param: str = "model") -> None:
        if name is not None and name not in self.names:
            served = ", ".join(repr(n) for n in self.names)
            raise APIError(
                404, f"model {name!r} is not served here (this server serves {served})",
                param=param, code="model_not_found",
            )  # fmt: skip


def render_chat(
    served: ServedModel,
    messages: Sequence[Mapping[str, Any]],
    plan: ToolPlan,
    template_kwargs: Mapping[str, Any],
) -> list[int]:
    """Token ids of `messages` rendered by the model's chat template, ready for the reply."""
    tokenizer = served.tokenizer
    if tokenizer.chat_template is None:
        raise invalid(
            "this model has no chat template (a base model): use /v1/completions, or start the "
            "server with --chat-template",
            param="messages",
        )
    kwargs = dict(template_kwargs)
    if plan.tools is not None:
        kwargs["tools"] = plan.tools
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    except TokenizerError as e:
        raise invalid(str(e), param="messages") from e
    return tokenizer.encode(text + plan.reply_prefix, add_special_tokens=False)


def encode_completion_prompt(served: ServedModel, prompt: str | Sequence[int]) -> list[int]:
    tokenizer = served.tokenizer
    if isinstance(prompt, str):
        if not prompt:
            raise invalid("prompt: must not be empty", param="prompt")
        return tokenizer.encode(prompt)
    bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
    if not prompt or bad:
        raise invalid(
            f"prompt: token ids must be in 0..{tokenizer.vocab_size - 1} and not empty",
            param="prompt",
        )
    return list(prompt)


def logit_bias_ids(served: ServedModel, bias: Mapping[str, float] | None) -> dict[int, float]:
    """OpenAI's `logit_bias` (token id strings -> bias in [-100, 100]) as ids."""
    out = {}
    for key, value in (bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < served.tokenizer.vocab_size:
            raise invalid(f"logit_bias: {key!r} is not a token id of this model", "logit_bias")
        if not -100 <= value <= 100:
            raise invalid(f"logit_bias: {value} for {key} is outside [-100, 100]", "logit_bias")
        out[int(key)] = float(value)
    return out


def sampling_options(served: ServedModel, **options: Any) -> SamplingOptions:
    """A request's sampling options (`SamplingOptions` fields; None: the server's default)."""
    given = {k: v for k, v in options.items() if v is not None}
    if given.get("top_p") == 0:
        given["top_p"] = 1.0  # mlx-lm spells "off" as 0
    return dataclasses.replace(served.defaults.sampling, **given)


def generation_request(
    served: ServedModel,
    prompt: list[int],
    max_tokens: int | None,
    sampling: SamplingOptions,
    *,
    prompt_param: str,
    stop: Sequence[str] = (),
    top_logprobs: int | None = None,
    banned_tokens: tuple[int, ...] = (),
    thinking_budget: int | None = None,
    media: MediaFiles | None = None,
) -> GenerationRequest:
    """Check the prompt against the context and the options against their ranges (a prompt
    with `media` grows by their soft tokens: the engine checks it again once they are
    encoded)."""
    limit = served.context_length
    if limit is not None and len(prompt) >= limit:
        raise invalid(
            f"this model's context holds {limit} tokens; the prompt has {len(prompt)} "
            "(at least one token must be left for the reply)",
            param=prompt_param, code="context_length_exceeded",
        )  # fmt: skip
    if max_tokens is None:
        max_tokens = served.defaults.max_tokens
    if limit is not None:
        max_tokens = min(max_tokens, limit - len(prompt))
    try:
        check_sampling_options(sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p)
        if sampling.repetition_penalty is not None and not sampling.repetition_penalty > 0:
            raise OptionError(f"repetition_penalty must be > 0, got {sampling.repetition_penalty}")
    except OptionError as e:
        raise invalid(str(e)) from e
    if any(not s for s in stop):
        raise invalid("stop: stop strings must not be empty", param="stop")
    return GenerationRequest(
        prompt=tuple(prompt),
        max_tokens=max_tokens,
        sampling=sampling,
        stop=tuple(stop),
        top_logprobs=top_logprobs,
        banned_tokens=banned_tokens,
        thinking_budget=thinking_budget,
        images=tuple(media.images) if media else (),
        audio=tuple(media.audio) if media else (),
    )
