"""Tokenizer and chat template against transformers; the streaming detokenizer against a full decode."""

from __future__ import annotations

import json
import random

import pytest
from tiny_chat_model import write_tokenizer

from gemma_mlx.tokenizer import ANSWER, THOUGHT, TOOL_CALL, TokenizerError, load_tokenizer

TEXTS = [
    "the capital of france is paris.",
    "  leading spaces, trailing  ",
    "Grüße aus Köln — 東京 и Москва 😀🚀",
    "a\n\nnew <start_of_turn>user\nturn<end_of_turn>",
    "∑ ∫ ≈ ñ ü ß 𝔘𝔫𝔦",
]
CONVERSATIONS = [
    [{"role": "user", "content": "hello there"}],
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is the capital of france?"},
        {"role": "assistant", "content": " paris "},
        {"role": "user", "content": "and of japan?"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def reference(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(tokenizer, reference, text):
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text)
    assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert tokenizer.decode(ids, skip_special_tokens=False) == reference.decode(ids)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tokenizer, reference, messages, add_generation_prompt):
    kwargs = dict(add_generation_prompt=add_generation_prompt)
    text = tokenizer.apply_chat_template(messages, **kwargs)
    assert text == reference.apply_chat_template(messages, tokenize=False, **kwargs)
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    want = reference.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    assert ids == list(want)
    assert ids.count(tokenizer.bos_token_id) == 1


def test_chat_template_errors_are_reported(tokenizer):
    with pytest.raises(TokenizerError, match="roles must alternate"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "hi"}])


def test_stop_ids_include_generation_config_and_end_of_turn(tokenizer):
    end_of_turn = {tokenizer.token_to_id(t) for t in ("<end_of_turn>", "<turn|>")}
    assert tokenizer.eos_token_ids == {1, *end_of_turn}


def stream(tokenizer, ids):
    detokenizer = tokenizer.detokenizer()
    pieces = [detokenizer.add_token(t) for t in ids]
    pieces.append(detokenizer.finalize())
    return pieces


@pytest.mark.parametrize("text", TEXTS[:3] + TEXTS[4:])
def test_streamed_text_is_whole_characters(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [t for _, t in stream(tokenizer, ids)]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces), "a partial UTF-8 character was emitted"


def test_byte_fallback_is_exercised(tokenizer):
    ids = tokenizer.encode("東京 😀", add_special_tokens=False)
    assert sum(tokenizer.backend.id_to_token(i).startswith("<0x") for i in ids) >= 6


def test_random_text_streams_whole_characters(tokenizer):
    """Random strings mixing ASCII with characters only byte tokens can spell: the stream is the
    text, piece by piece, and never shows a partial character."""
    rng = random.Random(0)
    alphabet = list("the quick brown fox, ") + list("éü€東京字😀🚀𝔘ñ∑")
    for _ in range(100):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        ids = tokenizer.encode(text, add_special_tokens=False)
        pieces = [t for _, t in stream(tokenizer, ids)]
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)


def test_invalid_bytes_still_come_out(tokenizer):
    """A lone lead byte cannot wait forever: the next ordinary token or the end releases it."""
    lead = tokenizer.token_to_id("<0xE2>")
    word = tokenizer.encode("fox", add_special_tokens=False)
    pieces = [t for _, t in stream(tokenizer, [lead, *word, lead])]
    assert "".join(pieces) == "\ufffdfox\ufffd"


def test_channels_follow_the_gemma4_markers(tokenizer):
    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False)

    m = tokenizer.markers
    tokens = [
        *ids("first"), m.channel_open, *ids("thought\nlet me think"), m.channel_close,
        *ids("the answer"), m.tool_call_open, *ids("call:f{x:"), m.string_quote, *ids("y"),
        m.string_quote, *ids("}"), m.tool_call_close, *ids("done"),
    ]  # fmt: skip
    by_channel: dict[str, str] = {}
    for channel, text in stream(tokenizer, tokens):
        by_channel[channel] = by_channel.get(channel, "") + text
    assert by_channel == {
        ANSWER: "firstthe answerdone",
        THOUGHT: "let me think",
        TOOL_CALL: 'call:f{x:"y"}',
    }


def test_prompt_can_leave_the_thinking_channel_open(tokenizer):
    m = tokenizer.markers
    assert tokenizer.channel_after([5, m.channel_open, 40]) == THOUGHT
    assert tokenizer.channel_after([m.channel_open, 40, m.channel_close]) == ANSWER
    assert tokenizer.channel_after([40, 41]) == ANSWER


def test_missing_or_corrupt_tokenizer_is_named(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_chat_template_file_and_name_detection(tmp_path):
    directory = tmp_path / "gemma-4-e2b-it"
    directory.mkdir()
    write_tokenizer(directory, chat_template=None)
    (directory / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    tok = load_tokenizer(directory)
    assert tok.instruction_tuned
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x"
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert "chat_template" not in config
