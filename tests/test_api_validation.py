"""The Python API checks its arguments: a wrong type or value raises the package's OptionError
(also a ValueError, or a TypeError for a wrong type) naming the argument, before any work; never a
raw TypeError from inside MLX, and never a silently wrong result (a prompt skipped, empty output)."""

from __future__ import annotations

import contextlib
import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_chat_model import write_model

from gemma_mlx.chat import ChatSession
from gemma_mlx.errors import GemmaMLXError, OptionError, OptionTypeError
from gemma_mlx.generate import generate, stream_generate
from gemma_mlx.loading import load
from gemma_mlx.sample import make_logit_bias, make_sampler

PROMPT = "the capital of france is"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load(write_model(tmp_path_factory.mktemp("api") / "model"))


# name -> (keyword arguments, error class, what the message says)
BAD_ARGUMENTS = {
    # silent wrong results before: the prompt was skipped, or the output empty
    "prefill_step_size -1": (dict(prefill_step_size=-1), OptionError, "prefill_step_size"),
    "prefill_step_size 0": (dict(prefill_step_size=0), OptionError, "prefill_step_size"),
    "prompt_cache []": (dict(prompt_cache=[]), OptionError, "prompt_cache has 0 entries"),
    "logit_bias NaN": (dict(logit_bias={5: math.nan}), OptionError, r"logit_bias\[5\]"),
    "logit_bias inf": (dict(logit_bias={5: math.inf}), OptionError, r"logit_bias\[5\]"),
    "logit_bias -inf": (dict(logit_bias={5: -math.inf}), OptionError, "-1e9 bans a token"),
    "max_tokens bool": (dict(max_tokens=True), OptionTypeError, "max_tokens"),
    # raw TypeErrors before
    "max_tokens str": (dict(max_tokens="10"), OptionTypeError, "max_tokens must be an integer"),
    "max_tokens float": (dict(max_tokens=2.5), OptionTypeError, "max_tokens"),
    "temp None": (dict(temp=None), OptionTypeError, "temperature must be a number"),
    "temp str": (dict(temp="0.5"), OptionTypeError, "temperature"),
    "top_k float": (dict(temp=1.0, top_k=2.5), OptionTypeError, "top-k must be an integer"),
    "top_p None": (dict(top_p=None), OptionTypeError, "top-p"),
    "min_p NaN": (dict(min_p=math.nan), OptionError, "min-p"),
    "stop 5": (dict(stop=5), OptionTypeError, "stop must be a string or a list"),
    "stop [5]": (dict(stop=[5]), OptionTypeError, "stop string must be a string"),
    "seed -1": (dict(temp=1.0, seed=-1), OptionError, "seed must be >= 0"),
    "seed 2**64": (dict(temp=1.0, seed=2**64), OptionError, r"seed must be below 2\*\*64"),
    "seed 2**64 greedy": (dict(seed=2**64), OptionError, "seed"),
    "seed str": (dict(temp=1.0, seed="1"), OptionTypeError, "seed must be an integer"),
    "logit_bias str key": (dict(logit_bias={"5": 1.0}), OptionTypeError, "token id"),
    "logit_bias list": (dict(logit_bias=[1, 2]), OptionTypeError, "logit_bias must be a mapping"),
    "logit_bias id outside": (dict(logit_bias={512: 1.0}), OptionError, "outside the vocab"),
    "repetition_penalty str": (
        dict(repetition_penalty="1.1"), OptionTypeError, "repetition penalty",
    ),
    "repetition_context_size 2.5": (
        dict(repetition_penalty=1.1, repetition_context_size=2.5), OptionTypeError,
        "repetition context size",
    ),
    "prefill_step_size 1.5": (dict(prefill_step_size=1.5), OptionTypeError, "prefill_step_size"),
    "num_draft -1": (dict(draft="prompt-lookup", num_draft=-1), OptionError, "num_draft"),
    "num_draft str": (dict(draft="prompt-lookup", num_draft="x"), OptionTypeError, "num_draft"),
    "draft 5": (dict(draft=5), OptionTypeError, "draft must be"),
    "sampler 5": (dict(sampler=5), OptionTypeError, "sampler must be callable"),
    "logits_processors 5": (dict(logits_processors=5), OptionTypeError, "logits_processors"),
    "chat_template_kwargs 5": (
        dict(chat_template_kwargs=5), OptionTypeError, "chat_template_kwargs",
    ),
    "prompt_progress 5": (dict(prompt_progress=5), OptionTypeError, "prompt_progress"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
def test_bad_argument_raises_an_option_error_naming_it(tiny, name):
    options, error, message = BAD_ARGUMENTS[name]
    options = {"max_tokens": 3, **options}
    with pytest.raises(error, match=message) as raised:
        generate(*tiny, PROMPT, **options)
    assert isinstance(raised.value, GemmaMLXError)
    if error is OptionTypeError:
        assert isinstance(raised.value, TypeError)  # `except TypeError` still catches it


@pytest.mark.parametrize(
    "prompt, message",
    [(None, "prompt must be"), (5, "prompt must be"), ([True, 3], "prompt token True"),
     ("a\udcffb", "not valid text"), ([{"role": "user", "content": "a\udcff"}], "not valid text")],
)  # fmt: skip
def test_bad_prompt_is_named(tiny, prompt, message):
    with pytest.raises(GemmaMLXError, match=message):
        generate(*tiny, prompt, max_tokens=2)


def test_prompt_cache_of_another_model_is_refused(tiny, tmp_path):
    model, tokenizer = tiny
    other, _ = load(write_model(tmp_path / "other", num_hidden_layers=2,
                                layer_types=["sliding_attention", "full_attention"]))  # fmt: skip
    with pytest.raises(OptionError, match="prompt_cache has 2 entries, this model needs 4"):
        generate(model, tokenizer, PROMPT, max_tokens=2, prompt_cache=other.make_cache())


def test_valid_spellings_give_the_same_result(tiny):
    """What the checks accept still means what it did: numpy integers, top_p=0 as "off" (mlx-lm),
    a seed at the top of the range, an empty logit_bias."""
    model, tokenizer = tiny
    want = generate(model, tokenizer, PROMPT, max_tokens=6, temp=0.8, seed=7)
    numpy = generate(model, tokenizer, PROMPT, max_tokens=np.int64(6), temp=np.float32(0.8),
                     seed=np.uint64(7), top_p=0, logit_bias={})  # fmt: skip
    assert numpy == want
    tokens = [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=4,
                                               logit_bias={np.int64(300): 1e9})]  # fmt: skip
    assert tokens == [300] * 4
    assert 0 <= make_sampler(temp=1.0, seed=2**64 - 1)(mx.zeros((1, 4))).item() < 4


def test_chat_session_checks_its_options_when_created(tiny):
    with pytest.raises(OptionTypeError, match="max_tokens must be an integer"):
        ChatSession(*tiny, max_tokens="8")
    with pytest.raises(OptionTypeError, match="unexpected keyword argument 'max_token'"):
        ChatSession(*tiny, max_token=8)
    with pytest.raises(OptionError, match="seed"):
        ChatSession(*tiny, temp=1.0, seed=-3)
    with pytest.raises(OptionError, match="message is not valid text"):
        list(ChatSession(*tiny).stream("hi \udcff"))


def test_logit_bias_checks_keys_and_values():
    with pytest.raises(OptionTypeError, match="token id must be an integer"):
        make_logit_bias({True: 1.0})
    with pytest.raises(OptionError, match=r"logit_bias\[3\] must be a number"):
        make_logit_bias({3: "1"})


def test_errors_are_raised_before_any_work(tiny):
    """The checks run when generation starts, before the prompt's forward pass: a model that
    fails when called is never reached."""
    model, tokenizer = tiny

    class Untouchable:
        args = model.args
        make_cache = model.make_cache

        def __call__(self, *args, **kwargs):
            raise AssertionError("the model ran")

    with pytest.raises(OptionError, match="prefill_step_size"):
        next(stream_generate(Untouchable(), tokenizer, PROMPT, prefill_step_size=0))


ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 8),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
    st.lists(st.integers(-2, 600), max_size=3),
    st.dictionaries(st.one_of(st.integers(-2, 600), st.text(max_size=2)), st.floats(), max_size=2),
)  # fmt: skip
OPTION_NAMES = [
    "max_tokens", "temp", "top_k", "top_p", "min_p", "repetition_penalty",
    "repetition_context_size", "logit_bias", "seed", "stop", "sampler", "logits_processors",
    "prompt_cache", "prefill_step_size", "prompt_progress", "chat_template_kwargs",
    "token_generator", "num_draft",
]  # fmt: skip


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(options=st.dictionaries(st.sampled_from(OPTION_NAMES), ANY_VALUE, max_size=3))
def test_any_argument_values_give_a_result_or_a_package_error(tiny, options):
    """Fuzz: arbitrary values for up to three options either generate or raise a GemmaMLXError."""
    options = {"max_tokens": 2} | options
    with contextlib.suppress(GemmaMLXError):
        generate(*tiny, PROMPT, **options)
