"""A tiny Gemma 4 chat model with its towers, as a complete directory for `gemma_mlx.load`: the E2B
shape of `multimodal_reference` (random weights written by transformers) plus a tokenizer whose
last ids are the image/audio placeholders and markers, and a Gemma 4 chat template that writes
`<|image|>` / `<|audio|>` for content parts, as the published template does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from multimodal_reference import TOKENS, e2b_like, random_image, save_reference
from tiny_chat_model import VOCAB, tokenizer_json, write_tokenizer

# The media tokens by id (`multimodal_reference.TOKENS`), in the tokenizer's spelling.
MEDIA_TOKENS = {
    TOKENS["boi_token_id"]: "<|image>",
    TOKENS["eoi_token_id"]: "<image|>",
    TOKENS["image_token_id"]: "<|image|>",
    TOKENS["video_token_id"]: "<|video|>",
    TOKENS["boa_token_id"]: "<|audio>",
    TOKENS["eoa_token_index"]: "<audio|>",
    TOKENS["audio_token_id"]: "<|audio|>",
    VOCAB - 1: "<unused0>",
}

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<|turn>' + role + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif item['type'] == 'audio' %}{{ '<|audio|>' }}"
    "{% elif item['type'] == 'video' %}{{ '<|video|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<turn|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\n' }}{% endif %}"
)


def media_tokenizer_json() -> dict:
    """`tiny_chat_model`'s tokenizer with its last merges' ids given to the media tokens."""
    tok = tokenizer_json()
    first = min(MEDIA_TOKENS)
    vocab = tok["model"]["vocab"]
    dropped = {token for token, i in vocab.items() if i >= first}
    tok["model"]["vocab"] = {t: i for t, i in vocab.items() if t not in dropped}
    tok["model"]["merges"] = [m for m in tok["model"]["merges"] if "".join(m) not in dropped]
    for i, token in MEDIA_TOKENS.items():
        tok["model"]["vocab"][token] = i
        tok["added_tokens"].append(
            {"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
        )  # fmt: skip
    return tok


def write_multimodal_model(directory: Path, seed: int = 0) -> Path:
    """The E2B-shaped checkpoint (vision and audio towers) with a chat tokenizer, in `directory`
    (name it `...-it` to have the CLI use the chat template)."""
    save_reference(e2b_like(), directory, seed)
    write_tokenizer(directory, CHAT_TEMPLATE)
    (directory / "tokenizer.json").write_text(json.dumps(media_tokenizer_json()))
    return directory


def write_image(path: Path, height: int = 40, width: int = 30, seed: int = 0) -> Path:
    random_image(np.random.default_rng(seed), height, width).save(path)
    return path


def write_audio(path: Path, seconds: float = 0.5, rate: int = 16_000, seed: int = 0) -> Path:
    import soundfile as sf

    samples = 0.3 * np.random.default_rng(seed).standard_normal(int(seconds * rate))
    sf.write(path, samples, rate)
    return path
