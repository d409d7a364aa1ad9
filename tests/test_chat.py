"""ChatSession: later turns prefill only the new tokens and equal a fresh run over the conversation."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tiny_chat_model import GEMMA4_CHAT_TEMPLATE, write_model

from gemma_mlx.chat import ChatSession, SessionFileError
from gemma_mlx.generate import stream_generate
from gemma_mlx.loading import load


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, dtype):
    return load(write_model(tmp_path_factory.mktemp("chat") / "model"), dtype=dtype)


def words_only(tokenizer, eos_after: int | None):
    """A logits processor that makes the reply whole words, so that the template's re-rendering
    of the reply tokenizes back to the same ids: a word without '▁' right after the turn's
    newline, '▁word's after it; optionally <end_of_turn> after `eos_after` tokens."""
    vocab = tokenizer.backend.get_vocab()
    newline, eos = vocab["\n"], vocab["<end_of_turn>"]

    def is_word(t: str) -> bool:
        return len(t) > 2 and t.isalpha()

    first = mx.array([i for t, i in vocab.items() if is_word(t)])
    later = mx.array([i for t, i in vocab.items() if t[:1] == "▁" and is_word(t[1:])])

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        history = tokens.tolist()
        since_newline = history[::-1].index(newline)
        if eos_after is not None and since_newline == eos_after:
            allowed = mx.array([eos])
        else:
            allowed = first if since_newline == 0 else later
        mask = mx.full(logits.shape, -1e9).at[:, allowed].add(1e9)
        return logits + mask

    return process


def run_turn(session, message):
    responses = list(session.stream(message))
    return responses, [r.token for r in responses]


@pytest.mark.parametrize("eos_after", [6, None], ids=["ends-with-eos", "ends-by-length"])
def test_second_turn_prefills_only_the_new_message(tiny, eos_after):
    model, tokenizer = tiny
    options = dict(max_tokens=10, logits_processors=[words_only(tokenizer, eos_after)])
    session = ChatSession(model, tokenizer, system="be brief", **options)
    first, reply = run_turn(session, "hello there")
    ids1 = tokenizer.apply_chat_template(session.messages[:-1], tokenize=True)
    assert first[-1].finish_reason == ("stop" if eos_after else "length")
    fed = len(reply) if eos_after else len(reply) - 1  # the last token of a full-length reply
    assert session.tokens == (ids1 + reply)[: len(ids1) + fed]  # is not in the cache

    second, _ = run_turn(session, "and the fox?")
    ids2 = tokenizer.apply_chat_template(session.messages[:-1], tokenize=True)
    assert ids2[: len(ids1) + fed] == ids1 + reply[:fed]
    assert second[0].prompt_tokens == len(ids2) - len(ids1) - fed

    fresh = list(stream_generate(model, tokenizer, ids2, **options))
    assert [r.token for r in fresh] == [r.token for r in second]
    for a, b in zip(fresh, second, strict=True):
        np.testing.assert_allclose(
            np.array(a.logprobs.astype(mx.float32)),
            np.array(b.logprobs.astype(mx.float32)),
            atol=1e-4,
        )


def test_turns_equal_fresh_runs_when_the_template_rewrites_the_reply(tiny):
    """Unrestricted replies (leading spaces the template trims, tokens that re-tokenize
    differently): the cache is rolled back to the shared prefix, the output stays exact."""
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer, max_tokens=12)
    for message in ["hello there", "the quick brown fox", "and then?"]:
        _, tokens = run_turn(session, message)
        ids = tokenizer.apply_chat_template(session.messages[:-1], tokenize=True)
        assert [r.token for r in stream_generate(model, tokenizer, ids, 12)] == tokens
        assert session.tokens == (ids + tokens)[: session.cache[0].offset]


def test_saved_session_continues_identically(tiny, tmp_path):
    model, tokenizer = tiny
    options = dict(max_tokens=8, logits_processors=[words_only(tokenizer, 5)])
    session = ChatSession(model, tokenizer, **options)
    run_turn(session, "hello there")
    path = tmp_path / "session.safetensors"
    session.save(path)
    with pytest.raises(SessionFileError, match="already exists"):
        session.save(path)

    restored = ChatSession.load(path, model, tokenizer, **options)
    assert restored.messages == session.messages and restored.tokens == session.tokens
    original, want = run_turn(session, "and the dog?")
    resumed, got = run_turn(restored, "and the dog?")
    assert got == want
    # resumed from the saved cache, not from scratch
    assert resumed[0].prompt_tokens == original[0].prompt_tokens < len(restored.tokens) // 2


def test_session_file_of_another_model_is_refused(tiny, tmp_path):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer, max_tokens=3)
    run_turn(session, "hello")
    session.save(tmp_path / "s.safetensors")
    other, other_tokenizer = load(write_model(tmp_path / "other", num_hidden_layers=2,
                                              layer_types=["sliding_attention", "full_attention"]))  # fmt: skip
    with pytest.raises(SessionFileError, match="different model"):
        ChatSession.load(tmp_path / "s.safetensors", other, other_tokenizer)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(SessionFileError, match=r"junk\.safetensors"):
        ChatSession.load(tmp_path / "junk.safetensors", model, tokenizer)


def test_gemma4_session_equals_fresh_runs(tmp_path):
    """Gemma 4's template renders an earlier model turn without the empty thought channel its
    generation prompt had: the session rolls back to where the renderings part, and stays exact."""
    model, tokenizer = load(write_model(tmp_path / "g4", chat_template=GEMMA4_CHAT_TEMPLATE))
    session = ChatSession(model, tokenizer, system="be brief", max_tokens=8)
    for message in ["hello there", "and the fox?"]:
        _, tokens = run_turn(session, message)
        text = tokenizer.apply_chat_template(session.messages[:-1])
        assert text.endswith("<|turn>model\n<|channel>thought\n<channel|>")
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert [r.token for r in stream_generate(model, tokenizer, ids, 8)] == tokens
