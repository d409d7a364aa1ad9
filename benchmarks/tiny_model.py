"""Write a tiny random Gemma 4 model directory that both gemma_mlx and mlx-lm load.

`tiny:<size>` on the benchmark command line builds one of these: the structure of a released size
(`configs.tiny_config`), random weights quantized like a QAT checkpoint (affine 4-bit, group 32,
router kept dense), and a byte-level tokenizer (every byte one token, no merges) so that a text
prompt works too. Nothing here is meant to produce sensible text.
"""

from __future__ import annotations

import json
from pathlib import Path

import gemma_mlx  # noqa: F401  (preloads OpenBLAS before MLX)

# isort: split
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from benchmarks.configs import tiny_config
from gemma_mlx.models import get_model_classes

TINY_PREFIX = "tiny:"
GROUP_SIZE, BITS = 32, 4
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
PAD, EOS, BOS, UNK = range(len(SPECIALS))


def write_byte_tokenizer(path: Path, vocab_size: int) -> None:
    """A Gemma-style BPE without merges: specials, 256 byte tokens, `▁`, then unused fillers."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(SPECIALS) + b for b in range(256)})
    vocab["▁"] = len(vocab)  # the space marker: a word boundary decodes back to " "
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), vocab_size)})
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", BOS)]
    )
    tokenizer.save(str(path))


def qat_quantizable(path: str, module: nn.Module) -> bool:
    """What a QAT conversion quantizes: every linear, embedding and expert stack but the router."""
    if not hasattr(module, "to_quantized") or path.endswith("router.proj"):
        return False
    weight = getattr(module, "weight", None)
    return weight is not None and weight.shape[-1] % GROUP_SIZE == 0


def write_tiny_model(size: str, directory: Path, seed: int = 0) -> Path:
    """Write `tiny:<size>` (config, quantized random weights, tokenizer) into `directory`."""
    config = tiny_config(size) | {
        "quantization": {"group_size": GROUP_SIZE, "bits": BITS, "mode": "affine"},
        "bos_token_id": BOS,
        "eos_token_id": [EOS],
        "pad_token_id": PAD,
        "torch_dtype": "float32",
    }
    config["quantization_config"] = config["quantization"]
    model_class, args_class = get_model_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    nn.quantize(model, GROUP_SIZE, BITS, class_predicate=qat_quantizable)
    directory.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(
        str(directory / "model.safetensors"), dict(tree_flatten(model.parameters()))
    )
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    write_byte_tokenizer(directory / "tokenizer.json", config["vocab_size"])
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "add_bos_token": True,
            }
        )
    )
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": BOS, "eos_token_id": [EOS], "pad_token_id": PAD})
    )
    return directory
