"""Gemma 4 with its towers: images, video frames and audio in the prompt (transformers'
`Gemma4ForConditionalGeneration` and, for the 12B, `Gemma4UnifiedForConditionalGeneration`).

The text decoder is `gemma4.Model` unchanged: this model is that model plus the towers, with the
same module names for the text part (`model.…`, `lm_head`) and the towers under `vision_tower`,
`embed_vision`, `audio_tower`, `embed_audio`, so everything that runs a text model runs this one.

A multimodal prompt holds one placeholder token per soft token (`<|image|>`, `<|video|>`,
`<|audio|>` ids, wrapped in begin/end markers by `gemma_mlx.media.layout`). `place_media` pairs
each run of placeholders with the encoded image, frame or clip it stands for, giving a
`PromptMedia`; `model(tokens, cache, media=...)` then embeds the placeholders' positions from it,
as transformers does:
- the token embedding at a placeholder is replaced by the soft token; the per-layer inputs (PLE:
  E2B/E4B) see the pad id there and the soft token in their projection;
- with `use_bidirectional_attention == "vision"` in the text config (the 12B's default), the soft
  tokens of one image (or frame) see each other both ways. Gemma 4 (`Gemma4Model`) does it on
  sliding layers only: ((causal or same image) and in window); full layers stay causal. The 12B
  (`Gemma4UnifiedModel`) does it on every layer: (causal [and in window]) or same image.
  An image must then be prefilled in one forward pass (`PromptMedia.chunk_end` says where a prefill
  chunk may end).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

from gemma_mlx.cache import attention_mask
from gemma_mlx.errors import MediaError
from gemma_mlx.models import gemma4
from gemma_mlx.models.base import ConfigError, read
from gemma_mlx.models.gemma4_audio import AudioArgs, AudioModel
from gemma_mlx.models.gemma4_tower_parts import MultimodalEmbedder
from gemma_mlx.models.gemma4_unified_vision import UnifiedVisionArgs, UnifiedVisionEmbedder
from gemma_mlx.models.gemma4_vision import VisionArgs, VisionModel

UNIFIED = "gemma4_unified"
SLIDING, FULL = gemma4.SLIDING, gemma4.FULL
# Where each tower's weights live in a transformers checkpoint, and under which name here.
TOWER_PREFIXES = {
    "model.vision_tower.": "vision_tower.",
    "model.embed_vision.": "embed_vision.",
    "model.vision_embedder.": "embed_vision.",  # the 12B's earlier name (transformers renames it)
    "model.audio_tower.": "audio_tower.",
    "model.embed_audio.": "embed_audio.",
}
OWN_PREFIXES = ("vision_tower.", "embed_vision.", "audio_tower.", "embed_audio.")


@dataclass(frozen=True)
class MediaTokens:
    """Token ids of the placeholders and markers (config.json's top level)."""

    image: int
    video: int
    audio: int
    boi: int
    eoi: int
    boa: int
    eoa: int

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> MediaTokens:
        # transformers' Gemma4Config defaults; it spells the end-of-audio key `eoa_token_index`.
        eoa_key = "eoa_token_id" if "eoa_token_id" in config else "eoa_token_index"
        return cls(
            image=read(config, "image_token_id", int, 258_880),
            video=read(config, "video_token_id", int, 258_884),
            audio=read(config, "audio_token_id", int, 258_881),
            boi=read(config, "boi_token_id", int, 255_999),
            eoi=read(config, "eoi_token_id", int, 258_882),
            boa=read(config, "boa_token_id", int, 256_000),
            eoa=read(config, eoa_key, int, 258_883),
        )

    def kind(self, token: int) -> str | None:
        """'image', 'video' or 'audio' for a placeholder id, else None."""
        return {self.image: "image", self.video: "video", self.audio: "audio"}.get(token)


@dataclass
class UnifiedAudioArgs:
    """The 12B's audio: raw waveform frames of `audio_embed_dim` samples, no tower."""

    audio_embed_dim: int
    rms_norm_eps: float

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> UnifiedAudioArgs:
        return cls(
            audio_embed_dim=read(config, "audio_embed_dim", int),
            rms_norm_eps=read(config, "rms_norm_eps", float),
        )


@dataclass
class MultimodalArgs:
    text: gemma4.ModelArgs
    tokens: MediaTokens
    vision: VisionArgs | UnifiedVisionArgs | None
    audio: AudioArgs | UnifiedAudioArgs | None
    unified: bool  # the 12B (`gemma4_unified`): encoder-free vision and audio
    bidirectional_vision: bool  # text config's use_bidirectional_attention == "vision"
    pad_token_id: int

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> MultimodalArgs:
        """Read a Gemma 4 config.json with a `vision_config` and/or an `audio_config`."""
        unified = config.get("model_type") == UNIFIED
        text_config = read(config, "text_config", dict)
        vision_config = read(config, "vision_config", dict, None)
        audio_config = read(config, "audio_config", dict, None)
        if vision_config is None and audio_config is None:
            raise ConfigError("config.json: no 'vision_config' or 'audio_config' (a text model)")
        # transformers' defaults: the 12B's text config makes vision tokens bidirectional.
        default = "vision" if unified else None
        bidirectional = read(text_config, "use_bidirectional_attention", str, default)
        if bidirectional not in ("vision", None):
            raise ConfigError(
                f"config.json: text_config 'use_bidirectional_attention' = {bidirectional!r} is "
                "not supported (only 'vision' or none)"
            )
        vision_args = UnifiedVisionArgs if unified else VisionArgs
        audio_args = UnifiedAudioArgs if unified else AudioArgs
        text = gemma4.ModelArgs.from_dict(config)
        # transformers ties the head by the top-level key (Gemma4Config's default: tied).
        text.tie_word_embeddings = read(config, "tie_word_embeddings", bool, True)
        return cls(
            text=text,
            tokens=MediaTokens.from_dict(config),
            vision=None if vision_config is None else vision_args.from_dict(vision_config),
            audio=None if audio_config is None else audio_args.from_dict(audio_config),
            unified=unified,
            bidirectional_vision=bidirectional == "vision",
            pad_token_id=read(text_config, "pad_token_id", int, 0),
        )

    # The loader rounds sqrt(hidden) like the checkpoint (`loading.build_and_check`).
    @property
    def embed_scale_dtype(self) -> str | None:
        return self.text.embed_scale_dtype

    @embed_scale_dtype.setter
    def embed_scale_dtype(self, value: str | None) -> None:
        self.text.embed_scale_dtype = value


def has_towers(config: dict[str, Any]) -> bool:
    """Whether a config.json describes a Gemma 4 checkpoint with a vision or audio part."""
    return config.get("model_type") in ("gemma4", UNIFIED) and bool(
        config.get("vision_config") or config.get("audio_config")
    )


def holds_towers(weight_names: Iterable[str]) -> bool:
    """Whether a checkpoint's tensor names include tower weights (HF or our names)."""
    prefixes = (*TOWER_PREFIXES, *OWN_PREFIXES)
    return any(name.startswith(prefixes) for name in weight_names)


class MediaItem(NamedTuple):
    """Where one image, clip or frame sits in a prompt, and what it is: `key` is a hash of its
    content and encoding settings (`gemma_mlx.media.prompt.media_key`), so that two prompts with
    the same tokens but different images are told apart (prefix caches, chat sessions)."""

    begin: int
    end: int
    kind: str  # "image", "audio" or "video"
    key: str


@dataclass
class PromptMedia:
    """The soft tokens of one prompt, by absolute position in it (`place_media`)."""

    positions: np.ndarray  # [N] ascending positions of placeholder tokens
    embeddings: mx.array  # [N, text hidden], row i for positions[i]
    vision_spans: tuple[tuple[int, int], ...]  # [begin, end) of each image / video frame
    items: tuple[MediaItem, ...] = ()  # every item's span and content key, when known

    def rows(self, start: int, end: int) -> tuple[np.ndarray, mx.array]:
        """(positions - start, embeddings) of the soft tokens in [start, end)."""
        lo, hi = np.searchsorted(self.positions, [start, end])
        return self.positions[lo:hi] - start, self.embeddings[lo:hi]

    def chunk_end(self, start: int, end: int) -> int:
        """Where a prefill chunk from `start` wanting to end at `end` may end without cutting an
        image in two: before the image `end` falls in (or after it, if it starts at `start`)."""
        for begin, stop in self.vision_spans:
            if begin < end < stop:
                return begin if begin > start else stop
        return end


def place_media(
    tokens: Sequence[int],
    media_tokens: MediaTokens,
    images: Sequence[mx.array] = (),
    audio: Sequence[mx.array] = (),
    video_frames: Sequence[mx.array] = (),
) -> PromptMedia:
    """Pair each run of placeholders in `tokens` with the next soft tokens of its kind.

    `images`, `audio`, `video_frames`: [n, hidden] soft tokens of each image, clip and video frame
    in prompt order. Every run must have exactly its item's n placeholders, and every item a run.
    """
    ids = np.asarray(tokens, dtype=np.int64)
    queues = {"image": list(images), "audio": list(audio), "video": list(video_frames)}
    used = dict.fromkeys(queues, 0)
    positions, rows, spans = [], [], []
    for begin, end, kind in placeholder_runs(ids, media_tokens):
        n = used[kind]
        if n == len(queues[kind]):
            raise MediaError(
                f"the prompt has more {kind} placeholders than the {len(queues[kind])} "
                f"{kind} input(s) given"
            )
        item = queues[kind][n]
        used[kind] += 1
        if item.shape[0] != end - begin:
            raise MediaError(
                f"{kind} {n + 1} has {item.shape[0]} soft tokens but its place in the prompt "
                f"holds {end - begin}"
            )
        positions.append(np.arange(begin, end))
        rows.append(item)
        if kind != "audio":
            spans.append((begin, end))
    for kind, items in queues.items():
        if used[kind] != len(items):
            raise MediaError(
                f"{len(items)} {kind} input(s) given but the prompt has places for {used[kind]}"
            )
    if not rows:
        return PromptMedia(np.zeros(0, np.int64), mx.zeros((0, 1)), ())
    return PromptMedia(np.concatenate(positions), mx.concatenate(rows), tuple(spans))


def placeholder_runs(ids: np.ndarray, media_tokens: MediaTokens) -> list[tuple[int, int, str]]:
    """Maximal runs [begin, end) of one placeholder id, with their kind."""
    runs = []
    i = 0
    while i < len(ids):
        kind = media_tokens.kind(int(ids[i]))
        if kind is None:
            i += 1
            continue
        end = i + 1
        while end < len(ids) and ids[end] == ids[i]:
            end += 1
        runs.append((i, end, kind))
        i = end
    return runs


MaskFunction = Callable[[str, int, int, int], "str | mx.array | None"]


def vision_masks(spans: Sequence[tuple[int, int]], window: int, unified: bool) -> MaskFunction:
    """Attention masks where each span's tokens also see each other both ways (module docstring).

    Returns `masks(layer_type, query_start, query_end, key_start)` for `gemma4.TextModel`.
    """

    def masks(layer_type: str, q0: int, q1: int, k0: int) -> str | mx.array | None:
        sliding = layer_type == SLIDING
        inside = [(b, e) for b, e in spans if b < q1 and e > k0]
        if not inside or (not unified and not sliding):
            return attention_mask(q0, q1, k0, window if sliding else None)
        block = np.full(q1 - k0, -1, dtype=np.int64)
        for i, (b, e) in enumerate(inside):
            block[max(b, k0) - k0 : min(e, q1) - k0] = i
        keys = mx.array(block)
        queries = keys[q0 - k0 :]
        same = (queries[:, None] == keys[None, :]) & (queries[:, None] >= 0)
        q = mx.arange(q0, q1)[:, None]
        k = mx.arange(k0, q1)[None, :]
        causal = k <= q
        in_window = (q - k < window) if sliding else mx.array(True)
        if unified:
            return (causal & in_window) | same
        return (causal | same) & in_window

    return masks


class Model(gemma4.Model):
    """`gemma4.Model` plus the towers; `model(tokens, cache, media=PromptMedia)` for media prompts."""

    def __init__(self, args: MultimodalArgs):
        super().__init__(args.text)
        self.media_args = args
        text_hidden = args.text.hidden_size
        vision, audio = args.vision, args.audio
        if isinstance(vision, UnifiedVisionArgs):
            self.embed_vision = UnifiedVisionEmbedder(vision, text_hidden)
        elif vision is not None:
            self.vision_tower = VisionModel(vision)
            self.embed_vision = MultimodalEmbedder(
                vision.hidden_size, text_hidden, vision.rms_norm_eps
            )
        if isinstance(audio, UnifiedAudioArgs):
            self.embed_audio = MultimodalEmbedder(
                audio.audio_embed_dim, text_hidden, audio.rms_norm_eps
            )
        elif audio is not None:
            self.audio_tower = AudioModel(audio)
            self.embed_audio = MultimodalEmbedder(
                audio.output_proj_dims, text_hidden, audio.rms_norm_eps
            )

    def encode_image(self, patches: mx.array, positions: mx.array) -> mx.array:
        """Soft tokens [n, text hidden] of one image (or video frame) from its patches and their
        (x, y) grid positions (`gemma_mlx.media.image`)."""
        if "embed_vision" not in self:
            raise MediaError("this checkpoint has no vision tower: it cannot take images")
        if self.media_args.unified:
            return self.embed_vision(patches, positions)
        return self.embed_vision(self.vision_tower(patches, positions))

    def encode_audio(self, features: mx.array) -> mx.array:
        """Soft tokens [n, text hidden] of one clip from its features (`gemma_mlx.media.audio`:
        log-mel frames, or 640-sample waveform frames for the 12B)."""
        if "embed_audio" not in self:
            raise MediaError("this checkpoint has no audio tower: it cannot take audio")
        if self.media_args.unified:
            return self.embed_audio(features)
        return self.embed_audio(self.audio_tower(features))

    def place_media(
        self,
        tokens: Sequence[int],
        images: Sequence[mx.array] = (),
        audio: Sequence[mx.array] = (),
        video_frames: Sequence[mx.array] = (),
    ) -> PromptMedia:
        return place_media(tokens, self.media_args.tokens, images, audio, video_frames)

    def __call__(
        self,
        inputs: mx.array,
        cache: list | None = None,
        logits_to_keep: int | None = None,
        return_hidden: bool = False,
        media: PromptMedia | None = None,
    ) -> mx.array | tuple[mx.array, mx.array]:
        """As `gemma4.Model`; with `media`, the placeholders among `inputs` (one sequence, starting
        at `cache[0].offset`) take their soft tokens and masks from it."""
        if media is None:
            return super().__call__(inputs, cache, logits_to_keep, return_hidden)
        if inputs.shape[0] != 1:
            raise MediaError("a prompt with media is processed one sequence at a time")
        start = cache[0].offset if cache else 0
        T = inputs.shape[1]
        args = self.media_args
        kinds = args.tokens
        is_media = (inputs == kinds.image) | (inputs == kinds.video) | (inputs == kinds.audio)
        ids = mx.where(is_media, mx.array(args.pad_token_id, inputs.dtype), inputs)
        h = self.model.embed(ids)
        local, rows = media.rows(start, start + T)
        if len(local):
            h[0, mx.array(local)] = rows.astype(h.dtype)
        masks = None
        if args.bidirectional_vision:
            for begin, end in media.vision_spans:
                if begin < start + T and end > start and not (begin >= start and end <= start + T):
                    raise MediaError(
                        f"a prefill chunk [{start}, {start + T}) cuts the image at [{begin}, {end}) "
                        "in two; end chunks where PromptMedia.chunk_end says"
                    )
            masks = vision_masks(media.vision_spans, self.args.sliding_window, args.unified)
        hidden = self.model(ids, cache, logits_to_keep, embeddings=h, attention_masks=masks)
        logits = self.head(hidden)
        return (logits, hidden) if return_hidden else logits

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Text weights as `gemma4.Model.sanitize`; tower weights under our tower names."""
        towers: dict[str, dict[str, mx.array]] = {p: {} for p in OWN_PREFIXES}
        text = {}
        for name, value in weights.items():
            for prefix, ours in TOWER_PREFIXES.items():
                if name.startswith(prefix):
                    name = ours + name[len(prefix) :]
                    break
            own = next((p for p in OWN_PREFIXES if name.startswith(p)), None)
            if own is None:
                text[name] = value
            elif "rotary_emb" not in name:
                towers[own][name[len(own) :]] = value
        out = super().sanitize(text)
        for prefix, tower in towers.items():
            module = getattr(self, prefix.rstrip("."), None)
            if module is None:
                if tower:
                    raise MediaError(
                        f"the weights hold '{prefix}…' but config.json has no such part"
                    )
                continue
            if hasattr(module, "sanitize"):
                tower = module.sanitize(tower)
            out.update({prefix + k: v for k, v in tower.items()})
        return out
