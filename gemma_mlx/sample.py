"""Samplers and logits processors (mlx-lm's call conventions, transformers' filter semantics).

A sampler maps log-probabilities `[B, V]` to token ids `[B]`. The filters follow transformers'
order: temperature, then top-k, then top-p on what top-k kept (renormalised), then min-p relative
to the most likely token. Randomness comes from the sampler's own key, so a seed reproduces a run
whatever else uses `mx.random` meanwhile.

A logits processor maps `(tokens so far [N], logits [B, V])` to new logits, as in mlx-lm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import mlx.core as mx

from gemma_mlx.errors import OptionError, OptionTypeError
from gemma_mlx.options import check_int, check_number, check_seed

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def check_sampling_options(
    temp: float, top_k: int, top_p: float, min_p: float, seed: int | None = None
) -> None:
    """Raise an OptionError naming the first option of the wrong type or outside its range."""
    if not check_number("temperature", temp) >= 0:
        raise OptionError(f"temperature must be >= 0, got {temp}")
    if check_int("top-k", top_k) < 0:
        raise OptionError(f"top-k must be >= 0 (0 = off), got {top_k}")
    if not 0 <= check_number("top-p", top_p) <= 1:
        raise OptionError(f"top-p must be in [0, 1] (0 or 1 = off), got {top_p}")
    if not 0 <= check_number("min-p", min_p) < 1:
        raise OptionError(f"min-p must be in [0, 1) (0 = off), got {min_p}")
    check_seed(seed)


class SamplingFilters:
    """Temperature, top-k, top-p and min-p: the distribution `FilteredSampler` samples from, and
    the one speculative decoding verifies drafts against (rejection sampling)."""

    def __init__(self, temp: float, top_k: int, top_p: float, min_p: float):
        self.temp, self.top_k, self.top_p, self.min_p = temp, top_k, top_p, min_p

    def distribution(self, logprobs: mx.array) -> mx.array:
        """The filtered, renormalised probabilities over the whole vocabulary, float32 [..., V]
        whatever the input's dtype (log-probabilities or logits: the filters ignore a shift)."""
        ids, values = self._candidates(logprobs)
        probs = mx.softmax(values, axis=-1)
        if ids is None:
            return probs
        return mx.put_along_axis(mx.zeros(logprobs.shape, mx.float32), ids, probs, axis=-1)

    def _candidates(self, logprobs: mx.array) -> tuple[mx.array | None, mx.array]:
        """(candidate ids or None for the whole vocabulary, their tempered log-probs with the
        filtered ones at -inf)."""
        scaled = logprobs.astype(mx.float32) * (1.0 / self.temp)
        ids = None
        if 0 < self.top_k < scaled.shape[-1]:
            # A partition, not a sort of the whole vocabulary.
            ids = mx.argpartition(-scaled, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        if self.top_p < 1:
            # Most likely first, so that top-p is one cumulative sum.
            candidates = scaled if ids is None else mx.take_along_axis(scaled, ids, axis=-1)
            order = mx.argsort(-candidates, axis=-1)
            ids = order if ids is None else mx.take_along_axis(ids, order, axis=-1)
        values = scaled if ids is None else mx.take_along_axis(scaled, ids, axis=-1)
        return ids, self._filter(values)

    def _filter(self, values: mx.array) -> mx.array:
        """Mask (to -inf) what top-p and min-p drop; `values` are sorted when top-p is on."""
        logp = values - mx.logsumexp(values, axis=-1, keepdims=True)
        keep = mx.ones(values.shape, dtype=mx.bool_)
        if self.top_p < 1:
            # Keep the most likely tokens until their mass reaches top_p.
            probs = mx.exp(logp)
            mass_before = mx.cumsum(probs, axis=-1) - probs
            keep = keep & (mass_before < self.top_p)
        if self.min_p > 0:
            top = mx.max(logp, axis=-1, keepdims=True)
            keep = keep & (logp >= top + math.log(self.min_p))
        return mx.where(keep, values, -mx.inf)


class FilteredSampler(SamplingFilters):
    """Samples from the filtered distribution with its own random key."""

    def __init__(self, temp: float, top_k: int, top_p: float, min_p: float, seed: int | None):
        super().__init__(temp, top_k, top_p, min_p)
        self.seed = _fresh_seed() if seed is None else seed  # a drafting loop reuses it
        self._key = mx.random.key(self.seed)

    def next_key(self) -> mx.array:
        """A key for the next random draw; the sampler's own stream, not the global one."""
        self._key, key = mx.random.split(self._key)
        return key

    def __call__(self, logprobs: mx.array) -> mx.array:
        ids, values = self._candidates(logprobs)
        choice = mx.random.categorical(values, key=self.next_key())
        if ids is None:
            return choice
        return mx.take_along_axis(ids, choice[..., None], axis=-1)[..., 0]


def _fresh_seed() -> int:
    return int(mx.random.randint(0, 2**31 - 1, ()).item())


def make_sampler(
    temp: float = 0.0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
) -> Sampler:
    """A sampler: greedy when `temp == 0`, else filtered sampling (see the module docstring)."""
    check_sampling_options(temp, top_k, top_p, min_p, seed)
    top_p = 1.0 if top_p == 0 else top_p  # mlx-lm spells "off" as 0
    if temp == 0:
        return greedy
    return FilteredSampler(temp, top_k, top_p, min_p, seed)


def make_logit_bias(bias: Mapping[int, float], vocab_size: int | None = None) -> LogitsProcessor:
    """Add `bias[token]` to the logits of `token`; biases are finite (-1e9 bans a token)."""
    if not isinstance(bias, Mapping):
        raise OptionTypeError(f"logit_bias must be a mapping of token id to bias, got {bias!r}")
    checked = {}
    for token, value in bias.items():
        token = check_int("logit_bias token id", token)
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            raise OptionError(f"logit bias: token id {token} is outside the vocabulary")
        checked[token] = check_number(f"logit_bias[{token}]", value, finite=False)
        if math.isinf(checked[token]):
            raise OptionError(
                f"logit_bias[{token}] must be finite (-1e9 bans a token), got {value}"
            )
    ids = mx.array(list(checked), dtype=mx.int32)
    values = mx.array(list(checked.values()), dtype=mx.float32)

    def add_bias(_tokens: mx.array, logits: mx.array) -> mx.array:
        return logits.at[:, ids].add(values.astype(logits.dtype))

    return add_bias


def make_repetition_penalty(penalty: float, context_size: int = 20) -> LogitsProcessor:
    """CTRL's penalty on the last `context_size` tokens: positive logits / p, negative * p."""
    if not check_number("repetition penalty", penalty) > 0:
        raise OptionError(f"repetition penalty must be > 0 (1 = off), got {penalty}")
    context_size = check_int("repetition context size", context_size, minimum=1)

    def penalize(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        recent = tokens[-context_size:]
        chosen = logits[:, recent]
        logits[:, recent] = mx.where(chosen < 0, chosen * penalty, chosen / penalty)
        return logits

    return penalize


def make_logits_processors(
    logit_bias: Mapping[int, float] | None = None,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    vocab_size: int | None = None,
) -> list[LogitsProcessor]:
    """The processors these options ask for (none for the defaults); bad values raise OptionError."""
    processors = []
    if logit_bias is not None:
        add_bias = make_logit_bias(logit_bias, vocab_size)
        if logit_bias:
            processors.append(add_bias)
    check_int("repetition context size", repetition_context_size, minimum=1)
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(make_repetition_penalty(repetition_penalty, repetition_context_size))
    return processors
