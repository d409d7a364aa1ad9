"""The vision and audio towers, their embedders and the soft-token placement against transformers
(torch, float32) on tiny random multimodal checkpoints of the E2B, E4B, 12B, 26B-A4B and 31B shapes."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from multimodal_reference import (
    PATCH,
    TOKENS,
    VARIANTS,
    load_ours,
    random_image,
    save_reference,
    token_types,
)
from PIL import Image
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

from gemma_mlx.decode import generate_tokens, prefill
from gemma_mlx.errors import MediaError
from gemma_mlx.media.image import image_patches
from gemma_mlx.models.gemma4_audio import output_length
from gemma_mlx.sample import greedy

SOFT_TOKENS = 70  # the smallest budget: 630 patches of 4 x 4 pixels
BIDIRECTIONAL = {"12b", "26b-a4b", "31b"}
WITH_AUDIO = {"e2b", "e4b", "12b"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """transformers on one thread: these products are tiny, and when the cores are busy (MLX's
    threads, other processes) torch's spinning thread pool makes them ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    built = {}

    def get(variant: str):
        if variant not in built:
            directory = tmp_path_factory.mktemp(f"mm-{variant}")
            torch_model = save_reference(VARIANTS[variant](), directory)
            built[variant] = (torch_model, load_ours(directory), directory)
        return built[variant]

    return get


def image_inputs(variant: str, height: int, width: int, seed: int = 0):
    """(torch pixel_values, torch positions, our patches, our positions) of one random image.

    The towers' inputs come from transformers' PIL processor; the 12B's processor needs
    torchvision, so its merged patches come from ours (their parity is tested apart)."""
    image = random_image(np.random.default_rng(seed), height, width)
    if variant == "12b":
        ours = image_patches(image, PATCH, 3, SOFT_TOKENS, merge=True)
        n, width_px = ours.patches.shape
        pixels = np.zeros((1, SOFT_TOKENS, width_px), np.float32)
        positions = -np.ones((1, SOFT_TOKENS, 2), np.int64)
        pixels[0, :n], positions[0, :n] = ours.patches, ours.positions
        pixels, positions = torch.tensor(pixels), torch.tensor(positions)
    else:
        processor = Gemma4ImageProcessorPil(
            patch_size=PATCH, max_soft_tokens=SOFT_TOKENS, pooling_kernel_size=3
        )
        out = processor(image, return_tensors="pt")
        pixels, positions = out["pixel_values"], out["image_position_ids"]
    real = (positions[0] >= 0).all(-1).numpy()
    return (
        pixels,
        positions,
        mx.array(pixels[0].numpy()[real]),
        mx.array(positions[0].numpy()[real]),
    )


def audio_inputs(variant: str, samples: int, seed: int = 0):
    """(torch features, torch mask, our features) of random audio: transformers' mel features for
    the conformer; the 12B's waveform frames, which its processor pads to 640-sample frames."""
    wave = (0.3 * np.random.default_rng(seed).standard_normal(samples)).astype(np.float32)
    if variant == "12b":
        width = 20  # the tiny config's samples per token
        frames = np.pad(wave, (0, (-samples) % width)).reshape(1, -1, width)
        mask = torch.ones(frames.shape[:2], dtype=torch.bool)
        return torch.tensor(frames), mask, mx.array(frames[0])
    out = Gemma4AudioFeatureExtractor()([wave], return_tensors="pt")
    features, mask = out["input_features"], out["input_features_mask"]
    return features, mask, mx.array(features[0].numpy()[: int(mask.sum())])


def max_rel_diff(ours: mx.array, ref: np.ndarray) -> float:
    return float(np.abs(np.array(ours, dtype=np.float32) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("size", [(40, 30), (20, 64)])
def test_image_embeddings_match(checkpoints, variant, size):
    torch_model, model, _ = checkpoints(variant)
    pixels, positions, patches, grid = image_inputs(variant, *size)
    with torch.no_grad():
        ref = torch_model.model.get_image_features(pixels, positions).pooler_output[0].numpy()
    ours = model.encode_image(patches, grid)
    assert ours.shape == ref.shape
    assert max_rel_diff(ours, ref) <= 1e-4


@pytest.mark.parametrize("variant", sorted(WITH_AUDIO))
@pytest.mark.parametrize("samples", [16_000 + 1234, 4_000, 700])
def test_audio_embeddings_match(checkpoints, variant, samples):
    torch_model, model, _ = checkpoints(variant)
    features, mask, ours_in = audio_inputs(variant, samples)
    with torch.no_grad():
        out = torch_model.model.get_audio_features(features, mask)
        ref = out.pooler_output[out.attention_mask].numpy()
    ours = model.encode_audio(ours_in)
    assert ours.shape == ref.shape
    assert max_rel_diff(ours, ref) <= 1e-4


def media_prompt(variant: str, n_image: int, n_audio: int) -> list[int]:
    rng = np.random.default_rng(3)
    text = lambda n: [int(t) for t in rng.integers(1, 400, n)]  # noqa: E731
    tokens = [2, *text(5), TOKENS["boi_token_id"], *[TOKENS["image_token_id"]] * n_image]
    tokens += [TOKENS["eoi_token_id"], *text(4)]
    if n_audio:
        tokens += [TOKENS["boa_token_id"], *[TOKENS["audio_token_id"]] * n_audio]
        tokens += [TOKENS["eoa_token_index"], *text(3)]
    return tokens


def reference_inputs(variant: str):
    """The prompt with one image (63 soft tokens, past the sliding window of 8) and, where the
    checkpoint has audio, one clip; transformers' keyword arguments; our soft tokens."""
    pixels, positions, patches, grid = image_inputs(variant, 40, 30)
    kwargs = {"pixel_values": pixels, "image_position_ids": positions}
    audio = None
    if variant in WITH_AUDIO:
        features, mask, audio = audio_inputs(variant, 8_000)
        kwargs |= {"input_features": features, "input_features_mask": mask}
    return kwargs, (patches, grid), audio


def encoded_prompt(model, variant: str):
    """(transformers' keyword arguments, prompt tokens, our PromptMedia) of `reference_inputs`."""
    kwargs, image, audio = reference_inputs(variant)
    image_tokens = model.encode_image(*image)
    audio_tokens = [] if audio is None else [model.encode_audio(audio)]
    n_audio = audio_tokens[0].shape[0] if audio_tokens else 0
    tokens = media_prompt(variant, image_tokens.shape[0], n_audio)
    media = model.place_media(tokens, images=[image_tokens], audio=audio_tokens)
    return kwargs, tokens, media


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_with_media_match(checkpoints, variant):
    torch_model, model, _ = checkpoints(variant)
    kwargs, tokens, media = encoded_prompt(model, variant)
    with torch.no_grad():
        ids = torch.tensor([tokens])
        types = torch.tensor([token_types(tokens)])
        ref = torch_model(input_ids=ids, mm_token_type_ids=types, **kwargs).logits[0].numpy()
        causal = torch_model(input_ids=ids, **kwargs).logits[0].numpy()
    ours = np.array(model(mx.array([tokens]), media=media)[0])
    assert np.abs(ours[-1] - ref[-1]).max() <= 1e-4
    assert np.abs(ours - ref).max() <= 1e-3
    assert ref.std() > 0.1
    # The image's bidirectional attention is there (and matched) exactly where configured.
    assert (np.abs(ref - causal).max() > 1e-2) == (variant in BIDIRECTIONAL)

    # Prefill in chunks ending where `chunk_end` allows, through the cache: the same logits.
    cache, start, pieces = model.make_cache(), 0, []
    for wanted in (4, 20, 45, len(tokens)):
        end = media.chunk_end(start, wanted)
        if end > start:
            piece = model(mx.array([tokens[start:end]]), cache=cache, media=media)
            pieces.append(np.array(piece[0]))
            start = end
    assert np.abs(np.concatenate(pieces) - ref).max() <= 1e-3


@pytest.mark.parametrize("variant", ["e2b", "12b"])
def test_greedy_generation_matches(checkpoints, variant):
    torch_model, model, _ = checkpoints(variant)
    kwargs, tokens, media = encoded_prompt(model, variant)
    with torch.no_grad():
        out = torch_model.generate(
            input_ids=torch.tensor([tokens]),
            attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
            mm_token_type_ids=torch.tensor([token_types(tokens)]),
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
            **kwargs,
        )
    expected = out[0, len(tokens) :].tolist()

    # Our decoding path: media prefill in chunks of 16 (they may not cut the image), then the
    # plain token loop from the prompt's last token.
    cache = model.make_cache()
    prefill(model, cache, tokens[:-1], 16, media=media)
    assert cache[0].offset == len(tokens) - 1
    steps = generate_tokens(model, tokens, cache, greedy, max_tokens=32)
    assert [step.token for step in steps] == expected


def test_prefill_chunk_may_not_cut_an_image(checkpoints):
    _, model, _ = checkpoints("31b")
    _, tokens, media = encoded_prompt(model, "31b")
    with pytest.raises(MediaError, match="cuts the image"):
        model(mx.array([tokens[:20]]), cache=model.make_cache(), media=media)


def test_soft_token_counts_must_match_the_prompt(checkpoints):
    _, model, _ = checkpoints("e2b")
    _, image, _ = reference_inputs("e2b")
    image_tokens = model.encode_image(*image)
    n = image_tokens.shape[0]
    with pytest.raises(MediaError, match="soft tokens"):
        model.place_media(media_prompt("e2b", n - 1, 0), images=[image_tokens])
    with pytest.raises(MediaError, match="more image placeholders"):
        model.place_media(media_prompt("e2b", n, 0), images=[])
    with pytest.raises(MediaError, match="places for 1"):
        model.place_media(media_prompt("e2b", n, 0), images=[image_tokens, image_tokens])


def test_media_for_a_checkpoint_without_the_tower(checkpoints):
    _, model, _ = checkpoints("31b")
    with pytest.raises(MediaError, match="no audio tower"):
        model.encode_audio(mx.zeros((40, 128)))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("variant", ["e2b", "26b-a4b", "12b"])
def test_half_precision_towers_stay_close(checkpoints, variant, dtype):
    """What a Mac computes: the towers in bfloat16/float16 stay finite and near float32."""
    _, model, directory = checkpoints(variant)
    half = load_ours(directory, dtype)
    _, image, audio = reference_inputs(variant)
    pairs = [(model.encode_image(*image), half.encode_image(*image))]
    if audio is not None:
        pairs.append((model.encode_audio(audio), half.encode_audio(audio)))
    for full, low in pairs:
        assert low.dtype == getattr(mx, dtype)
        low = np.array(low.astype(mx.float32))
        assert np.isfinite(low).all()
        assert max_rel_diff(mx.array(low), np.array(full)) <= 5e-2


def test_prepared_prompt_matches_transformers_pipeline(checkpoints, tmp_path):
    """Files in, logits out: `media.prepare` (decode, preprocess, encode, expand, place) against
    transformers' processor pieces and model on the same PNG and WAV files."""
    import soundfile as sf
    from transformers.audio_utils import load_audio

    from gemma_mlx.media import prepare

    torch_model, model, _ = checkpoints("e2b")
    image_path = tmp_path / "image.png"
    random_image(np.random.default_rng(5), 50, 41, 4).save(image_path)
    audio_path = tmp_path / "clip.wav"
    sf.write(audio_path, np.random.default_rng(6).standard_normal(9_000) * 0.2, 22_050)
    text = [2, 17, TOKENS["image_token_id"], 23, TOKENS["audio_token_id"], 29, 31]

    memo = {}
    tokens, media = prepare(model, text, [image_path], [audio_path], SOFT_TOKENS, memo)
    # A later turn with the same files (renamed) re-uses the soft tokens: keyed by content.
    (tmp_path / "same.png").write_bytes(image_path.read_bytes())
    again, media_again = prepare(model, text, [tmp_path / "same.png"], [audio_path], 70, memo)
    assert len(memo) == 2 and again == tokens
    assert mx.array_equal(media_again.embeddings, media.embeddings)

    processor = Gemma4ImageProcessorPil(
        patch_size=PATCH, max_soft_tokens=SOFT_TOKENS, pooling_kernel_size=3
    )
    pixels = processor(Image.open(image_path), return_tensors="pt")
    wave = load_audio(str(audio_path), sampling_rate=16_000, backend="soundfile")
    features = Gemma4AudioFeatureExtractor()([wave], return_tensors="pt")
    n_image = int(pixels["num_soft_tokens_per_image"][0])
    n_audio = output_length(int(features["input_features_mask"].sum()))
    expected = [2, 17, TOKENS["boi_token_id"], *[TOKENS["image_token_id"]] * n_image]
    expected += [TOKENS["eoi_token_id"], 23, TOKENS["boa_token_id"]]
    expected += [*[TOKENS["audio_token_id"]] * n_audio, TOKENS["eoa_token_index"], 29, 31]
    assert tokens == expected
    with torch.no_grad():
        ref = (
            torch_model(
                input_ids=torch.tensor([tokens]),
                pixel_values=pixels["pixel_values"],
                image_position_ids=pixels["image_position_ids"],
                input_features=features["input_features"],
                input_features_mask=features["input_features_mask"],
            )
            .logits[0]
            .numpy()
        )
    ours = np.array(model(mx.array([tokens]), media=media)[0])
    assert np.abs(ours[-1] - ref[-1]).max() <= 1e-4
    assert np.abs(ours - ref).max() <= 1e-3


@pytest.mark.parametrize("variant", ["e4b", "31b"])
def test_logits_with_video_frames_match(checkpoints, variant):
    """A video as frames: each frame a run of video placeholders between image markers, after a
    timestamp; each frame its own bidirectional block where that is configured."""
    torch_model, model, _ = checkpoints(variant)
    frames = [image_inputs(variant, 30, 40, seed) for seed in (7, 8)]
    frame_tokens = [model.encode_image(patches, grid) for _, _, patches, grid in frames]
    tokens = [2, 17, 19]
    for soft in frame_tokens:
        tokens += [33, 34, TOKENS["boi_token_id"], *[TOKENS["video_token_id"]] * soft.shape[0]]
        tokens += [TOKENS["eoi_token_id"]]
    tokens += [21, 22]
    with torch.no_grad():
        ref = (
            torch_model(
                input_ids=torch.tensor([tokens]),
                pixel_values_videos=torch.cat([pixels for pixels, *_ in frames]),
                video_position_ids=torch.cat([positions for _, positions, *_ in frames]),
                num_frames_per_video=torch.tensor([2]),
                mm_token_type_ids=torch.tensor([token_types(tokens)]),
            )
            .logits[0]
            .numpy()
        )
    media = model.place_media(tokens, video_frames=frame_tokens)
    ours = np.array(model(mx.array([tokens]), media=media)[0])
    assert np.abs(ours[-1] - ref[-1]).max() <= 1e-4
    assert np.abs(ours - ref).max() <= 1e-3
