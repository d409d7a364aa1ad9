"""`stream_generate` against a hand-written loop: one full forward pass per token, no cache."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tiny_chat_model import GEMMA4_CHAT_TEMPLATE, WINDOW, write_model

from gemma_mlx.errors import PromptError
from gemma_mlx.generate import generate, stream_generate
from gemma_mlx.loading import load
from gemma_mlx.sample import make_sampler

PROMPT = (
    "hello world, the quick brown fox jumps over the lazy dog. this is a test; "
    "the capital of france is"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, dtype):
    model, tokenizer = load(write_model(tmp_path_factory.mktemp("tiny") / "model"), dtype=dtype)
    assert model.model.embed_tokens.weight.dtype == getattr(mx, dtype)  # the lane's dtype holds
    return model, tokenizer


def reference_loop(model, tokenizer, prompt_ids, n, sampler=None):
    """Tokens and log-probs by recomputing the whole sequence every step; stops after an eos.
    Greedy is the argmax of the logits; log-probabilities are computed from the model's logits in
    float64 (in bfloat16 `logits - logsumexp` would merge nearby logits)."""
    seq, logprobs = list(prompt_ids), []
    for _ in range(n):
        logits = model(mx.array([seq]))[:, -1, :]
        z = np.array(logits[0].astype(mx.float32), dtype=np.float64)
        lp = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
        token = mx.argmax(logits, axis=-1) if sampler is None else sampler(mx.array(lp[None]))
        seq.append(int(token[0]))
        logprobs.append(lp)
        if seq[-1] in tokenizer.eos_token_ids:
            break
    return seq[len(prompt_ids) :], logprobs


@pytest.mark.parametrize("prefill_step_size", [3, None])
def test_greedy_equals_reference_loop(tiny, prefill_step_size):
    model, tokenizer = tiny
    ids = tokenizer.encode(PROMPT)
    assert len(ids) > 2 * WINDOW  # the sliding-window caches wrap during the prompt already
    want, want_logprobs = reference_loop(model, tokenizer, ids, 100)
    responses = list(
        stream_generate(model, tokenizer, ids, 100, prefill_step_size=prefill_step_size)
    )
    assert [r.token for r in responses] == want
    for r, lp in zip(responses, want_logprobs, strict=True):
        np.testing.assert_allclose(np.array(r.logprobs.astype(mx.float32)), lp, atol=1e-4)
    assert [r.generation_tokens for r in responses] == list(range(1, len(want) + 1))
    assert all(r.prompt_tokens == len(ids) for r in responses)
    last = responses[-1]
    assert last.finish_reason == ("stop" if want[-1] in tokenizer.eos_token_ids else "length")
    assert all(r.finish_reason is None for r in responses[:-1])


def test_text_is_the_decoded_tokens(tiny):
    """(Byte tokens are banned: a random model strings them into invalid UTF-8, which a full
    decode and a stream render differently. test_tokenizer.py covers valid byte sequences.)"""
    model, tokenizer = tiny
    no_bytes = {
        i: -1e9
        for i in range(tokenizer.vocab_size)
        if tokenizer.backend.id_to_token(i).startswith("<0x")
    }
    options = dict(temp=1.0, seed=2, logit_bias=no_bytes)
    responses = list(stream_generate(model, tokenizer, PROMPT, 60, **options))
    tokens = [r.token for r in responses if r.token not in tokenizer.eos_token_ids]
    assert "".join(r.text for r in responses) == tokenizer.decode(tokens)
    assert generate(model, tokenizer, PROMPT, max_tokens=60, **options) == tokenizer.decode(tokens)


def test_seeded_sampling_equals_reference_loop_and_repeats(tiny):
    model, tokenizer = tiny
    ids = tokenizer.encode(PROMPT)
    options = dict(temp=0.9, top_k=100, top_p=0.95, min_p=0.02)
    want, _ = reference_loop(model, tokenizer, ids, 50, make_sampler(**options, seed=11))
    got = [r.token for r in stream_generate(model, tokenizer, ids, 50, seed=11, **options)]
    assert got == want
    again = [r.token for r in stream_generate(model, tokenizer, ids, 50, seed=11, **options)]
    assert again == got
    other = [r.token for r in stream_generate(model, tokenizer, ids, 50, seed=12, **options)]
    assert other != got


def test_next_step_is_queued_before_a_token_is_handed_out(tiny):
    """Pipelining: when token n arrives, the forward pass that consumes it is already built."""
    model, tokenizer = tiny
    ids = tokenizer.encode(PROMPT)
    cache = model.make_cache()
    for n, _ in enumerate(stream_generate(model, tokenizer, ids, 10, prompt_cache=cache), 1):
        if n < 10:
            assert cache[0].offset == len(ids) + n


def test_stop_string_cuts_the_text(tiny):
    model, tokenizer = tiny
    full = generate(model, tokenizer, PROMPT, max_tokens=80, temp=1.0, seed=4)
    stop = full[20:23]
    responses = list(
        stream_generate(model, tokenizer, PROMPT, 80, temp=1.0, seed=4, stop=["@@never", stop])
    )
    assert "".join(r.text for r in responses) == full[: full.index(stop)]
    assert responses[-1].finish_reason == "stop"


def test_eos_ends_generation_without_text(tiny):
    model, tokenizer = tiny
    eos = tokenizer.token_to_id("<end_of_turn>")

    def fifth_token_is_eos(tokens, logits):  # `tokens`: the prompt and the tokens before this one
        position = tokens.size - len(tokenizer.encode(PROMPT)) + 1
        return logits.at[:, eos].add(1e4) if position == 5 else logits

    responses = list(
        stream_generate(model, tokenizer, PROMPT, 50, logits_processors=[fifth_token_is_eos])
    )
    assert len(responses) == 5 and responses[-1].token == eos
    assert responses[-1].finish_reason == "stop"
    assert "end_of_turn" not in "".join(r.text for r in responses)


def test_chat_messages_use_the_template(tiny):
    model, tokenizer = tiny
    messages = [{"role": "user", "content": "hello"}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    a = [r.token for r in stream_generate(model, tokenizer, messages, 20)]
    b = [r.token for r in stream_generate(model, tokenizer, ids, 20)]
    assert a == b


def test_repetition_penalty_and_logit_bias_change_the_output(tiny):
    model, tokenizer = tiny
    plain = generate(model, tokenizer, PROMPT, max_tokens=30)
    assert generate(model, tokenizer, PROMPT, max_tokens=30, repetition_penalty=3.0) != plain
    banned = tokenizer.encode(plain, add_special_tokens=False)[0]
    biased = stream_generate(model, tokenizer, PROMPT, 30, logit_bias={banned: -1e9})
    assert banned not in [r.token for r in biased]


def test_prompt_errors(tiny):
    model, tokenizer = tiny
    with pytest.raises(PromptError, match="empty"):
        list(stream_generate(model, tokenizer, "", 5))
    with pytest.raises(PromptError, match="context holds 256"):
        list(stream_generate(model, tokenizer, [7] * 256, 5))
    with pytest.raises(PromptError, match="not an id"):
        list(stream_generate(model, tokenizer, [7, 9999], 5))


def test_generation_stops_at_the_context_end(tiny):
    model, tokenizer = tiny
    responses = list(stream_generate(model, tokenizer, [7] * 250, 100))
    assert len(responses) <= 6
    assert responses[-1].finish_reason in ("length", "stop")


@pytest.fixture(scope="module")
def tiny_gemma4(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny4") / "model"
    return load(write_model(directory, chat_template=GEMMA4_CHAT_TEMPLATE))


def scripted(tokenizer, prompt_ids, script):
    """A logits processor that makes the model say `script` (token ids), one per step. (The
    pipelined loop already queues the step after the last one.)"""

    def force(tokens, logits):
        position = tokens.size - len(prompt_ids)
        return logits.at[:, script[position]].add(1e4) if position < len(script) else logits

    return force


def test_thinking_channel_is_separated_from_the_answer(tiny_gemma4):
    model, tokenizer = tiny_gemma4
    messages = [{"role": "user", "content": "hello"}]
    kwargs = {"enable_thinking": True}
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)

    def words(text):
        return tokenizer.encode(text, add_special_tokens=False)

    m = tokenizer.markers
    script = [
        m.channel_open, *words("thought\nthe fox is quick"), m.channel_close,
        *words("it is paris"), tokenizer.token_to_id("<turn|>"),
    ]  # fmt: skip
    options = dict(
        max_tokens=50,
        chat_template_kwargs=kwargs,
        logits_processors=[scripted(tokenizer, ids, script)],
    )
    responses = list(stream_generate(model, tokenizer, messages, **options))
    assert [r.token for r in responses] == script
    thought = "".join(r.text for r in responses if r.channel == "thought")
    answer = "".join(r.text for r in responses if r.channel == "answer")
    assert (thought, answer) == ("the fox is quick", "it is paris")
    assert responses[-1].finish_reason == "stop"
    assert generate(model, tokenizer, messages, **options) == "it is paris"
    both = generate(model, tokenizer, messages, include_thinking=True, **options)
    assert both == "the fox is quickit is paris"
