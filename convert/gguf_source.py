"""Reading a Gemma GGUF file: tensor names, config.json from the metadata, tokenizer files.

Tensors are memory-mapped by gguf-py's reader and converted one at a time by `convert.tensors`.
Names and metadata keys follow llama.cpp's Gemma 3 / Gemma 4 converters (see
docs/conversion.md).
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from gemma_mlx.convert.blocks import DEFAULT_REQUANT_BITS
from gemma_mlx.convert.mlx_format import QuantizedTensor
from gemma_mlx.convert.mmproj_source import (
    MmprojSource,
    field,
    layout_change,
    torch_shape,
    tower_tensor,
)
from gemma_mlx.convert.pipeline import (
    Job,
    Plan,
    check_against_config,
    lazy_model,
    reading_source,
)
from gemma_mlx.convert.tensors import Converted, TensorRecord, gguf_output_nbytes, gguf_tensor
from gguf import GGUFReader, ReaderTensor

from gemma_mlx.errors import ConfigError, GemmaMLXError, WeightsError
from gemma_mlx.models.gemma4_multimodal import OWN_PREFIXES as TOWER_PREFIXES

SUPPORTED_ARCHITECTURES = ("gemma3", "gemma4")

# GGUF tensor name (without `.weight`) -> our module path; `{i}` is the layer index.
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "per_layer_token_embd": "model.embed_tokens_per_layer",
    "per_layer_model_proj": "model.per_layer_model_projection",
    "per_layer_proj_norm": "model.per_layer_projection_norm",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "pre_ffw_norm_2": "pre_feedforward_layernorm_2",
    "post_ffw_norm_1": "post_feedforward_layernorm_1",
    "post_ffw_norm_2": "post_feedforward_layernorm_2",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "router.proj",
    "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "ffn_gate_exps": "experts.switch_glu.gate_proj",
    "ffn_up_exps": "experts.switch_glu.up_proj",
    "ffn_down_exps": "experts.switch_glu.down_proj",
    "ffn_gate_up_exps": "experts.switch_glu.gate_up_proj",  # fused: split into gate and up
    "layer_output_scale": "layer_scalar",
    "inp_gate": "per_layer_input_gate",
    "proj": "per_layer_projection",
    "post_norm": "post_per_layer_input_norm",
}
# Tensors llama.cpp generates for its own use; their content is read into config.json instead.
GENERATED = {"rope_freqs.weight"}
# Gemma 1-3 GGUFs store RMSNorm weights as (1 + w): llama.cpp adds the 1 at conversion.
NORM_SHIFT = {"gemma3": 1.0, "gemma4": 0.0}
# Chat turn terminators that also end generation when a chat template is present.
TURN_END_TOKENS = ("<end_of_turn>", "<turn|>")
# Not in Gemma 3 GGUF metadata: llama.cpp hard-codes them (llama-model.cpp).
GEMMA3_LOCAL_ROPE_BASE = 10000.0
GEMMA3_SLIDING_PATTERN = 6
# The metadata the tokenizer files are built from.
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.tokens")
# Hugging Face special-token names and the GGUF metadata keys holding their ids.
SPECIAL_TOKEN_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}

_LAYER = re.compile(r"^blk\.(\d+)\.(.+?)(\.weight)?$")


@dataclass
class SourceTensor:
    name: str  # our parameter name
    tensor: ReaderTensor
    norm_shift: float = 0.0


def open_gguf(path: Path) -> GGUFReader:
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        return GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on damage
        raise WeightsError(
            f"{path}: not a readable GGUF file ({e or type(e).__name__}); the file may be "
            "truncated or damaged: download it again"
        ) from e


def release_pages(reader: GGUFReader) -> None:
    """Drop the file pages read so far from our resident set (they stay in the page cache):
    without this, RSS grows to the whole file's size as tensors are read."""
    mapping = getattr(reader.data, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


class GGUFSource:
    """One GGUF file: its architecture, metadata and tensors, named the way our models name them."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.reader = open_gguf(self.path)
        self.arch = self.field("general.architecture")
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{self.path}: general.architecture = {self.arch!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        self.by_name = {t.name: t for t in self.reader.tensors}

    def field(self, key: str, default: Any = ...) -> Any:
        return field(self.reader, self.path, key, default)

    def release_pages(self) -> None:
        release_pages(self.reader)

    def arch_field(self, key: str, default: Any = ...) -> Any:
        return self.field(f"{self.arch}.{key}", default)

    def tensors(self) -> Iterator[SourceTensor]:
        shift = NORM_SHIFT[self.arch]
        for tensor in self.reader.tensors:
            if tensor.name in GENERATED:
                continue
            name = self.module_path(tensor.name) + ".weight"
            if name.endswith(("layer_scalar.weight", ".scale.weight", "per_expert_scale.weight")):
                name = name.removesuffix(".weight")
            is_norm = name.endswith("norm.weight")
            yield SourceTensor(name, tensor, shift if is_norm else 0.0)

    def module_path(self, gguf_name: str) -> str:
        base = gguf_name.removesuffix(".weight")
        if base in GLOBAL_NAMES:
            return GLOBAL_NAMES[base]
        match = _LAYER.match(gguf_name)
        if match and match.group(2) in LAYER_NAMES:
            return f"model.layers.{match.group(1)}.{LAYER_NAMES[match.group(2)]}"
        raise WeightsError(f"{self.path}: tensor '{gguf_name}' is not part of a {self.arch} model")

    def rows(self, gguf_name: str) -> int:
        return int(self.by_name[gguf_name].shape[-1])

    def has(self, gguf_name: str) -> bool:
        return gguf_name in self.by_name

    # config.json ----------------------------------------------------------------------------

    def block_count(self) -> int:
        """The number of layers, checked against the layer tensors present: a damaged count would
        otherwise size everything built from it (a flipped bit: billions of layers)."""
        count = int(self.arch_field("block_count"))
        layers = {int(m.group(1)) for name in self.by_name if (m := _LAYER.match(name))}
        if count != len(layers) or layers != set(range(count)):
            raise ConfigError(
                f"{self.path}: {self.arch}.block_count = {count}, but the file holds tensors of "
                f"{len(layers)} layers"
            )
        return count

    def config(self) -> dict[str, Any]:
        common = self._common_config()
        extra = self._gemma3_config() if self.arch == "gemma3" else self._gemma4_config()
        return common | extra

    def _common_config(self) -> dict[str, Any]:
        n_layers = self.block_count()
        config = {
            "hidden_size": int(self.arch_field("embedding_length")),
            "num_hidden_layers": n_layers,
            "num_attention_heads": _single(self.arch_field("attention.head_count"), "head_count"),
            "rms_norm_eps": float(self.arch_field("attention.layer_norm_rms_epsilon")),
            "sliding_window": int(self.arch_field("attention.sliding_window")),
            "max_position_embeddings": int(self.arch_field("context_length")),
            "vocab_size": self.rows("token_embd.weight"),
            "tie_word_embeddings": not self.has("output.weight"),
            "hidden_activation": "gelu_pytorch_tanh",
            "final_logit_softcapping": self.arch_field("final_logit_softcapping", None),
            # llama.cpp multiplies by sqrt(hidden) in float32, unrounded.
            "embed_scale_dtype": "float32",
            "torch_dtype": "bfloat16",
        }
        for key in ("bos", "eos", "padding"):
            token = self.field(f"tokenizer.ggml.{key}_token_id", None)
            if token is not None:
                config[f"{'pad' if key == 'padding' else key}_token_id"] = int(token)
        return config

    def _gemma3_config(self) -> dict[str, Any]:
        n_layers = self.block_count()
        hidden = int(self.arch_field("embedding_length"))
        heads = _single(self.arch_field("attention.head_count"), "head_count")
        head_dim = int(self.arch_field("attention.key_length"))
        pattern = GEMMA3_SLIDING_PATTERN
        layer_types = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(n_layers)
        ]
        rope_scaling = None
        factor = self.arch_field("rope.scaling.factor", None)
        if factor is not None:
            rope_scaling = {"rope_type": "linear", "factor": float(factor)}
        return {
            "model_type": "gemma3_text",
            "architectures": ["Gemma3ForCausalLM"],
            "intermediate_size": _single(
                self.arch_field("feed_forward_length"), "feed_forward_length"
            ),
            "num_key_value_heads": _single(
                self.arch_field("attention.head_count_kv"), "head_count_kv"
            ),
            "head_dim": head_dim,
            # llama.cpp: 1/sqrt(head_dim), except Gemma 3 27B (62 layers): 1/sqrt(hidden/heads).
            "query_pre_attn_scalar": hidden // heads if n_layers == 62 else head_dim,
            "rope_theta": float(self.arch_field("rope.freq_base")),
            "rope_local_base_freq": GEMMA3_LOCAL_ROPE_BASE,
            "rope_scaling": rope_scaling,
            "sliding_window_pattern": pattern,
            "layer_types": layer_types,
            "attn_logit_softcapping": None,
        }

    def _gemma4_config(self) -> dict[str, Any]:
        n_layers = self.block_count()
        sliding = self.arch_field("attention.sliding_window_pattern")
        if len(sliding) != n_layers:
            raise ConfigError(
                f"{self.path}: gemma4.attention.sliding_window_pattern has {len(sliding)} entries "
                f"for {n_layers} layers"
            )
        layer_types = ["sliding_attention" if s else "full_attention" for s in sliding]
        full = [i for i, s in enumerate(sliding) if not s]
        shared = int(self.arch_field("attention.shared_kv_layers", 0))
        ffn = _per_layer(self.arch_field("feed_forward_length"), n_layers)
        double_wide = len(set(ffn)) > 1
        if double_wide and any(ffn[i] != 2 * ffn[0] for i in range(n_layers - shared, n_layers)):
            raise ConfigError(
                f"{self.path}: gemma4.feed_forward_length varies per layer in a way "
                "that is not Gemma 4's double-wide MLP"
            )
        kv = _per_layer(self.arch_field("attention.head_count_kv"), n_layers)
        sliding_kv = {kv[i] for i, s in enumerate(sliding) if s}
        full_kv = {kv[i] for i in full}
        k_eq_v = not self.has(f"blk.{full[0]}.attn_v.weight")
        if full_kv != sliding_kv and not k_eq_v:
            raise ConfigError(
                f"{self.path}: gemma4.attention.head_count_kv differs between sliding "
                "and full layers, which only k_eq_v models (no attn_v) support"
            )
        config = {
            "model_type": "gemma4_text",
            "architectures": ["Gemma4ForCausalLM"],
            "intermediate_size": ffn[0],
            "use_double_wide_mlp": double_wide,
            "num_key_value_heads": _single(sorted(sliding_kv or full_kv), "head_count_kv"),
            "num_global_key_value_heads": _single(sorted(full_kv), "head_count_kv")
            if k_eq_v and full_kv != sliding_kv
            else None,
            "attention_k_eq_v": k_eq_v,
            "head_dim": int(self.arch_field("attention.key_length_swa")),
            "global_head_dim": int(self.arch_field("attention.key_length")),
            "layer_types": layer_types,
            "rope_parameters": {
                "sliding_attention": {
                    "rope_type": "default",
                    "rope_theta": float(self.arch_field("rope.freq_base_swa")),
                },
                "full_attention": self._full_rope(),
            },
            "num_kv_shared_layers": shared,
            "hidden_size_per_layer_input": int(
                self.arch_field("embedding_length_per_layer_input", 0)
            ),
            "vocab_size_per_layer_input": self.rows("per_layer_token_embd.weight")
            if self.has("per_layer_token_embd.weight")
            else 0,
        }
        experts = int(self.arch_field("expert_count", 0))
        config["enable_moe_block"] = experts > 0
        if experts:
            config |= {
                "num_experts": experts,
                "top_k_experts": int(self.arch_field("expert_used_count")),
                "moe_intermediate_size": int(self.arch_field("expert_feed_forward_length")),
            }
        return config

    def _full_rope(self) -> dict[str, Any]:
        """Full layers' RoPE: llama.cpp encodes proportional RoPE as `rope_freqs` factors of 1
        (rotated pairs) and a huge value (pairs left unrotated)."""
        rope = {"rope_type": "default", "rope_theta": float(self.arch_field("rope.freq_base"))}
        if not self.has("rope_freqs.weight"):
            return rope
        factors = np.asarray(self.by_name["rope_freqs.weight"].data, dtype=np.float64)
        rotated = int((factors == 1.0).sum())
        if (
            rotated == 0
            or not np.all(factors[rotated:] > 1e6)
            or not np.all(factors[:rotated] == 1)
        ):
            raise ConfigError(
                f"{self.path}: rope_freqs is not a proportional-RoPE pattern (ones, then huge "
                "values); this RoPE variant is not supported"
            )
        return rope | {"rope_type": "proportional", "partial_rotary_factor": rotated / factors.size}

    # tokenizer -------------------------------------------------------------------------------

    def chat_template(self) -> str | None:
        return self.field("tokenizer.chat_template", None)

    def vocabulary(self) -> dict[str, int]:
        """Token spelling -> id."""
        tokens = self.reader.get_field("tokenizer.ggml.tokens")
        return {str(tokens.contents(i)): i for i in range(len(tokens.data))}

    def eos_token_ids(self) -> list[int]:
        """The end-of-sequence id, plus the chat turn terminator when there is a chat template."""
        ids = [int(self.field("tokenizer.ggml.eos_token_id"))]
        if self.chat_template():
            vocab = self.vocabulary()
            ids += [vocab[t] for t in TURN_END_TOKENS if t in vocab and vocab[t] not in ids]
        return ids


def _single(value: Any, key: str) -> int:
    """A metadata value that must be one number (a per-layer array must be uniform)."""
    values = set(value) if isinstance(value, list) else {value}
    if len(values) != 1:
        raise ConfigError(
            f"GGUF metadata '{key}' = {value} varies per layer where one value is expected"
        )
    return int(values.pop())


def _per_layer(value: Any, n_layers: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list) else [int(value)] * n_layers


# plan ------------------------------------------------------------------------------------------


def tensor_nbytes(tensor: ReaderTensor) -> int:
    return int(tensor.n_bytes)


def gguf_plan(
    path: Path,
    k_scale_dtype: str = "float32",
    requant_bits: int | None = None,
    dequantize: bool = False,
    mlx_lm_compatible: bool = False,
    mmproj: Path | None = None,
) -> Plan:
    """The conversion of a GGUF file: exact types keep their grid and Q6_K weights their blocks
    (see `convert.blocks`); `requant_bits` or `mlx_lm_compatible` requantizes Q6_K too (to
    `requant_bits`, default 8), into what mlx-lm can load. `mmproj`: llama.cpp's file of the
    model's vision/audio towers, converted with it (`convert.mmproj_source`)."""
    if mlx_lm_compatible and requant_bits is None:
        requant_bits = DEFAULT_REQUANT_BITS
    source = GGUFSource(path)
    towers = None
    if mmproj is not None:
        towers = MmprojSource(Path(mmproj), open_gguf(Path(mmproj)))
        if source.arch != "gemma4":
            raise ConfigError(
                f"{source.path}: a {source.arch} model; --mmproj takes Gemma 4 towers only"
            )
    for key in TOKENIZER_KEYS:
        source.field(key)  # a GGUF without its vocabulary converts into an unloadable directory
    config = source.config()
    wanted = _model_parameter_names(config, [t.name for t in source.tensors()])

    def job(item: SourceTensor) -> Job:
        def run() -> list[tuple[str, Converted, TensorRecord]]:
            t = item.tensor
            try:
                converted, record = gguf_tensor(
                    item.name,
                    t.tensor_type,
                    t.data,
                    int(t.shape[0]),
                    norm_shift=item.norm_shift,
                    k_scale_dtype=k_scale_dtype,
                    requant_bits=requant_bits,
                    dequantize_all=dequantize,
                )
            except GemmaMLXError as e:
                raise WeightsError(f"{source.path}: {e}") from e
            finally:
                source.release_pages()
            if not item.name.endswith("gate_up_proj.weight"):
                return [(item.name, converted, record)]
            return _split_gate_up(item.name, converted, record)

        t = item.tensor
        output_bytes = gguf_output_nbytes(
            t.tensor_type,
            int(t.n_elements),
            tensor_nbytes(t),
            k_scale_dtype=k_scale_dtype,
            requant_bits=requant_bits,
            dequantize_all=dequantize,
            ndim=t.data.ndim,
        )
        return Job(t.name, tensor_nbytes(t), output_bytes, run)

    def write_extra_files(out_dir: Path) -> None:
        with reading_source(source.path):
            write_tokenizer(source, out_dir)

    eos = source.eos_token_ids()
    generation = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": eos}
    if "pad_token_id" in config:
        generation["pad_token_id"] = config["pad_token_id"]
    config["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    items = [t for t in source.tensors() if t.name in wanted or "gate_up_proj" in t.name]
    shapes = dict(_output_shapes(items))
    jobs = [job(t) for t in items]
    if towers is not None:
        config = towers.multimodal_config(config, source.vocabulary(), source.path)
        jobs += _tower_jobs(towers, config, shapes)
    check_against_config(config, shapes, {}, source.path, media=towers is not None)
    return Plan("gguf", config, jobs, write_extra_files, generation)


def _tower_jobs(
    towers: MmprojSource, config: dict[str, Any], shapes: dict[str, tuple[int, ...]]
) -> list[Job]:
    """One job per tower tensor; adds each output's shape to `shapes` (for the up-front check)."""
    from mlx.utils import tree_flatten

    expected = {
        name: tuple(value.shape)
        for name, value in tree_flatten(lazy_model(config, media=True).parameters())
        if name.startswith(TOWER_PREFIXES)
    }

    def job(ours: str, tensor: ReaderTensor) -> Job:
        shape = expected[ours]

        def run() -> list[tuple[str, Converted, TensorRecord]]:
            try:
                converted, record = tower_tensor(towers, ours, tensor, shape)
            finally:
                release_pages(towers.reader)
            return [(ours, converted, record)]

        output_bytes = int(tensor.n_elements) * 4  # float32 at most
        return Job(f"{towers.path.name}:{tensor.name}", tensor_nbytes(tensor), output_bytes, run)

    jobs = []
    for ours, tensor in towers.tensors(expected):
        shapes[ours] = (
            expected[ours] if layout_change(ours, expected[ours]) else torch_shape(tensor)
        )
        jobs.append(job(ours, tensor))
    return jobs


def _model_parameter_names(config: dict[str, Any], names: list[str]) -> set[str]:
    """The names the model's own `sanitize` keeps (it drops, e.g., KV-shared layers' K/V)."""
    import mlx.core as mx

    placeholder = mx.zeros((0,))
    return set(lazy_model(config).sanitize(dict.fromkeys(names, placeholder)))


def _output_shapes(items: list[SourceTensor]):
    """(name, row-major shape) of every output tensor, before quantization."""
    for item in items:
        shape = tuple(int(n) for n in reversed(item.tensor.shape))
        if item.name.endswith("gate_up_proj.weight"):
            half = (*shape[:-2], shape[-2] // 2, shape[-1])
            yield item.name.replace("gate_up_proj", "gate_proj"), half
            yield item.name.replace("gate_up_proj", "up_proj"), half
        else:
            yield item.name, shape


def _split_gate_up(
    name: str, converted: Converted, record: TensorRecord
) -> list[tuple[str, Converted, TensorRecord]]:
    """llama.cpp fuses the experts' gate and up projections; our modules keep them apart."""
    value = converted.value
    halves = (
        value.split_rows(2) if isinstance(value, QuantizedTensor) else np.split(value, 2, axis=-2)
    )
    out = []
    for part, half in zip(("gate_proj", "up_proj"), halves, strict=True):
        shape = (*record.shape[:-2], record.shape[-2] // 2, record.shape[-1])
        out.append(
            (name.replace("gate_up_proj", part), Converted(half), replace(record, shape=shape))
        )
    return out


def tokenizer_metadata(source: GGUFSource) -> dict[str, Any]:
    """The `tokenizer.*` metadata of the file (and its architecture) as plain Python values."""
    fields = {
        key: source.field(key) for key in source.reader.fields if key.startswith("tokenizer.")
    }
    return fields | {"general.architecture": source.arch}


def write_tokenizer(source: GGUFSource, out_dir: Path) -> None:
    """Hugging Face tokenizer files rebuilt from the GGUF vocabulary, which tokenize exactly as
    llama.cpp does; plus the chat template when the file has one.

    transformers' own `from_pretrained(gguf_file=...)` reads the file with a reader that imports
    torch; we read the metadata with gguf-py and hand it to transformers' torch-free builders.
    """
    from transformers import GemmaTokenizer
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping

    metadata = tokenizer_metadata(source)
    grouped = {
        group: {
            name: metadata[f"tokenizer.{key}"]
            for key, name in renames.items()
            if f"tokenizer.{key}" in metadata
        }
        for group, renames in mapping.GGUF_TOKENIZER_MAPPING.items()
    }
    vocabulary, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if vocabulary.get("tokenizer_type") == "llama":  # llama.cpp adds BOS unless the file says not
        config.setdefault("add_bos_token", True)
    elif vocabulary.get("tokenizer_type") == "gemma4":  # its chat template writes <bos> itself
        config["add_bos_token"] = False
    tokens = vocabulary["tokens"]
    for name, key in SPECIAL_TOKEN_IDS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        config[name] = tokens[token_id] if token_id is not None else None
    backend, _ = mapping.convert_gguf_tokenizer(source.arch, vocabulary)
    tokenizer = GemmaTokenizer(tokenizer_object=backend, **config)
    tokenizer.save_pretrained(str(out_dir))
    template = source.chat_template()
    if template:
        (out_dir / "chat_template.jinja").write_text(template)
