"""A tiny Gemma-shaped model directory for generation tests: random Gemma 3 weights (our own model
class, no torch) and a 512-token tokenizer built like Gemma's (BPE over `▁`-joined text with byte
fallback, control tokens for turns and the Gemma 4 markers, a chat template)."""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

VOCAB = 512
WINDOW = 8
SPECIALS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
    "<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", '<|"|>', "<mask>",
    "<|turn>", "<turn|>", "<|think|>",
]  # fmt: skip
CORPUS = (
    "the capital of france is paris. the quick brown fox jumps over the lazy dog. "
    "hello world, this is a test of the tiny tokenizer; it keeps what gemma does: "
    "spaces become a marker, rare characters fall back to bytes. thought answer call "
    "user model system turn 0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ !?\"'()[]{}<>|/\\:+-*=_#@%&$~^`"
)

# Gemma 3's chat format (system text folded into the first user turn), written for these tests.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Gemma 4's chat format as published: <|turn>role ... <turn|>, thinking switched on by <|think|> in
# the system turn; with thinking off the generation prompt closes an empty thought channel.
GEMMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% if enable_thinking or system %}{{ '<|turn>system\n' }}"
    "{% if enable_thinking %}{{ '<|think|>\n' }}{% endif %}{{ system }}{{ '<turn|>\n' }}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<|turn>' + role + '\n' + message['content'] | trim + '<turn|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\n' }}"
    "{% if not enable_thinking %}{{ '<|channel>thought\n<channel|>' }}{% endif %}{% endif %}"
)


def _pieces(text: str) -> list[str]:
    return list(text.replace(" ", "▁"))


def tokenizer_json() -> dict:
    """BPE with byte fallback: specials, 256 byte tokens, characters, then merges up to VOCAB."""
    vocab: dict[str, int] = {}
    for token in [*SPECIALS, *(f"<0x{b:02X}>" for b in range(256))]:
        vocab[token] = len(vocab)
    for ch in sorted(set(_pieces(CORPUS)) | {"▁", "\n"}):
        vocab.setdefault(ch, len(vocab))
    words = [_pieces(w) for w in CORPUS.replace(" ", " ▁").split(" ")]
    merges = []
    while len(vocab) < VOCAB:
        pairs = Counter(p for w in words for p in pairwise(w))
        (a, b), _ = pairs.most_common(1)[0]
        merges.append([a, b])
        vocab[a + b] = len(vocab)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i : i + 2] = [a + b]
                i += 1
    added = [
        {"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for t in SPECIALS
    ]  # fmt: skip
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": {
            "type": "Split",
            "pattern": {"String": " "},
            "behavior": "MergedWithPrevious",
            "invert": False,
        },
        "post_processor": {  # prepends <bos>, as Gemma's tokenizer.json does
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<bos>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": "<bos>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<bos>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {
                "<bos>": {"id": "<bos>", "ids": [vocab["<bos>"]], "tokens": ["<bos>"]}
            },
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def write_tokenizer(directory: Path, chat_template: str | None = CHAT_TEMPLATE) -> None:
    tok = tokenizer_json()
    (directory / "tokenizer.json").write_text(json.dumps(tok))
    config = {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "tokenizer_class": "GemmaTokenizer",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    end_of_turn = tok["model"]["vocab"]["<end_of_turn>"]
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 2, "eos_token_id": [1, end_of_turn], "pad_token_id": 0})
    )


def model_config(**overrides) -> dict:
    config = {
        "model_type": "gemma3_text",
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "rms_norm_eps": 1e-6,
        "sliding_window": WINDOW,
        "layer_types": [
            "sliding_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention",
        ],
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    return config | overrides


def write_model(
    directory: Path, seed: int = 0, chat_template: str | None = CHAT_TEMPLATE, **overrides
) -> Path:
    """A complete model directory (config, random weights, tokenizer) loadable by `gemma_mlx.load`."""
    from gemma_mlx.models import get_model_classes

    directory.mkdir(parents=True, exist_ok=True)
    config = model_config(**overrides)
    model_class, args_class = get_model_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        scale = 0.3 if "norm" in name else 0.1 if "embed" in name else 0.5
        weights[name] = mx.random.normal(value.shape) * scale
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    (directory / "config.json").write_text(json.dumps(config))
    write_tokenizer(directory, chat_template)
    return directory
