"""`draft=` on `stream_generate`, the chat session and the CLI: the same text as plain decoding."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from tiny_chat_model import write_model

from gemma_mlx.chat import ChatSession
from gemma_mlx.cli import run
from gemma_mlx.generate import stream_generate
from gemma_mlx.loading import load
from gemma_mlx.models import gemma4_assistant
from gemma_mlx.sample import OptionError

PROMPT = "the quick brown fox jumps over the lazy dog. the quick brown fox jumps over the"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, dtype):
    """A tiny model directory with a random MTP assistant beside it (`<dir>-assistant`), the
    model loaded in `dtype`."""
    directory = write_model(tmp_path_factory.mktemp("tiny") / "model")
    model, tokenizer = load(directory, dtype=dtype)
    model.path = directory
    config = gemma4_assistant.config_for_target(model.args, hidden_size=32, num_hidden_layers=2)
    mx.random.seed(3)
    assistant = gemma4_assistant.Model(gemma4_assistant.ModelArgs.from_dict(config))
    beside = directory.with_name("model-assistant")
    beside.mkdir()
    mx.save_safetensors(
        str(beside / "model.safetensors"), dict(tree_flatten(assistant.parameters()))
    )
    (beside / "config.json").write_text(json.dumps(config))
    return model, tokenizer, directory


def tokens_and_last(model, tokenizer, **options):
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=60, **options))
    return [r.token for r in responses], responses[-1]


@pytest.mark.parametrize("draft", ["prompt-lookup", "assistant", "auto"])
@pytest.mark.parametrize("num_draft", [3, "auto"])
def test_stream_generate_with_drafts_equals_plain(tiny, draft, num_draft):
    model, tokenizer, directory = tiny
    if draft == "assistant":
        draft = directory.with_name("model-assistant")
    expected, _ = tokens_and_last(model, tokenizer)
    got, last = tokens_and_last(model, tokenizer, draft=draft, num_draft=num_draft)
    assert got == expected
    assert last.speculation.proposed > 0


def test_seeded_sampling_with_drafts_repeats(tiny):
    """`seed=` fixes drafted sampling too, whatever MLX's global generator holds."""
    model, tokenizer, _ = tiny
    options = dict(temp=1.0, seed=3, draft="prompt-lookup", num_draft=3)
    first, _ = tokens_and_last(model, tokenizer, **options)
    mx.random.seed(11)  # whatever the global generator holds
    again, _ = tokens_and_last(model, tokenizer, **options)
    assert again == first


def test_chat_turns_with_drafts_equal_plain(tiny):
    """Early stops mid-round leave the cache a prefix of prompt + reply, as the session needs."""
    model, tokenizer, _ = tiny
    replies = []
    for options in ({}, {"draft": "prompt-lookup", "num_draft": 4}):
        session = ChatSession(model, tokenizer, max_tokens=24, **options)
        replies.append([session.send(m) for m in ("hello there", "the quick brown fox", "again")])
    assert replies[0] == replies[1]


def test_custom_sampler_with_drafts_is_refused(tiny):
    """Rejection sampling needs the sampler's distribution: only the built-in samplers have one."""
    model, tokenizer, _ = tiny
    with pytest.raises(OptionError, match="custom"):
        tokens_and_last(model, tokenizer, sampler=lambda x: x.argmax(-1), draft="prompt-lookup")


def test_cli_prompt_lookup_prints_the_plain_text(tiny, capsys):
    _, _, directory = tiny
    common = ["--model", str(directory), "-p", PROMPT, "-m", "40", "--temp", "0"]
    assert run([*common, "--no-chat-template"]) == 0
    plain = capsys.readouterr()
    assert (
        run(
            [*common, "--no-chat-template", "--draft-model", "prompt-lookup", "--num-draft", "auto"]
        )
        == 0
    )
    drafted = capsys.readouterr()
    assert drafted.out == plain.out
    assert "Drafts: " in drafted.err and "accepted" in drafted.err
    with pytest.raises(SystemExit) as bad:
        run([*common, "--draft-model", "prompt-lookup", "--num-draft", "x"])
    assert bad.value.code == 2
