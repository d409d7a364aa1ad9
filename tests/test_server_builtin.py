"""The server on the built-in Gemma 3 270M: completions (and chat, with a template given to the
server) at temperature 0 equal `gemma_mlx.generate`, streamed or not."""

from __future__ import annotations

import openai
import pytest
from server_helpers import serving
from tiny_chat_model import CHAT_TEMPLATE

import gemma_mlx
from gemma_mlx.server.__main__ import BUILTIN_NAME

pytestmark = pytest.mark.real_model

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def builtin():
    return gemma_mlx.load(None)


def test_completions_and_chat_equal_generate(builtin):
    model, tokenizer = builtin
    expected = gemma_mlx.generate(model, tokenizer, PROMPT, max_tokens=16)
    assert len(expected.split()) > 5
    with serving(model, tokenizer, "--chat-template", CHAT_TEMPLATE) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0)
        reply = client.completions.create(
            model=BUILTIN_NAME, prompt=PROMPT, max_tokens=16, temperature=0
        )
        assert reply.choices[0].text == expected
        stream = client.completions.create(
            model=BUILTIN_NAME, prompt=PROMPT, max_tokens=16, stream=True
        )
        assert "".join(c.choices[0].text for c in stream if c.choices) == expected

        messages = [{"role": "user", "content": "Name the capital of France."}]
        chat_tokenizer = running.routes.served.tokenizer
        chat_expected = gemma_mlx.generate(model, chat_tokenizer, messages, max_tokens=12)
        chat = client.chat.completions.create(model=BUILTIN_NAME, messages=messages, max_tokens=12)
        assert chat.choices[0].message.content == chat_expected
        assert chat.usage.prompt_tokens == len(
            chat_tokenizer.apply_chat_template(messages, tokenize=True)
        )
        streamed = client.chat.completions.create(
            model=BUILTIN_NAME, messages=messages, max_tokens=12, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat_expected
