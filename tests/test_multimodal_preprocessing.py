"""Torch-free preprocessing (gemma_mlx.media) against transformers' processors: images of several
sizes, aspect ratios and formats; audio of several lengths, sample rates and containers; the
token layout; and one clear error for each kind of bad input."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from multimodal_reference import random_image
from PIL import Image
from processor_functions import patch_positions, processor_functions, torchvision_resize
from transformers.audio_utils import load_audio
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
from transformers.models.gemma4.processing_gemma4 import Gemma4Processor
from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
    Gemma4UnifiedAudioFeatureExtractor,
)

from gemma_mlx.errors import MediaError
from gemma_mlx.media import prepare
from gemma_mlx.media.audio import log_mel, mel_frames, read_audio, waveform_frames
from gemma_mlx.media.image import image_patches, open_image, to_rgb
from gemma_mlx.media.layout import expand, video_text
from gemma_mlx.media.messages import media_parts
from gemma_mlx.media.resize import resize_bicubic_uint8
from gemma_mlx.models.gemma4_audio import output_length

# (height, width, channels, format): landscape, portrait, extreme strips, tiny, alpha, greyscale.
IMAGES = [
    (480, 640, 3, "PNG"),
    (640, 480, 3, "JPEG"),
    (37, 53, 4, "PNG"),
    (90, 1900, 3, "PNG"),
    (1500, 40, 1, "PNG"),
    (300, 301, 1, "JPEG"),
    (16, 16, 3, "PNG"),
]


def image_file(tmp_path: Path, height: int, width: int, channels: int, fmt: str) -> Path:
    image = random_image(np.random.default_rng(height * width), height, width, channels)
    path = tmp_path / f"image.{fmt.lower()}"
    image.save(path, format=fmt)
    return path


@pytest.mark.parametrize(("height", "width", "channels", "fmt"), IMAGES)
@pytest.mark.parametrize("budget", [280, 70])
def test_image_patches_equal_the_processor(tmp_path, height, width, channels, fmt, budget):
    path = image_file(tmp_path, height, width, channels, fmt)
    processor = Gemma4ImageProcessorPil(max_soft_tokens=budget)
    ref = processor(Image.open(path), return_tensors="np")
    real = (ref["image_position_ids"][0] >= 0).all(-1)

    ours = image_patches(path, max_soft_tokens=budget)
    assert ours.soft_tokens == ref["num_soft_tokens_per_image"][0]
    np.testing.assert_array_equal(ours.positions, ref["image_position_ids"][0][real])
    assert np.abs(ours.patches - ref["pixel_values"][0][real]).max() <= 1e-5


def unified_reference(image: Image.Image, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """`Gemma4UnifiedImageProcessor._preprocess` for one image: (merged patches, positions)."""
    module = "gemma4_unified/image_processing_gemma4_unified"
    f = processor_functions(module, "convert_image_to_patches", "patches_merge")
    pixels = torchvision_resize(to_rgb(image), budget, module)
    patches = f["convert_image_to_patches"](pixels, 16)
    positions = patch_positions(*pixels.shape[-2:], len(patches))
    merged, merged_positions = f["patches_merge"](patches[None], positions[None], len(patches) // 9)
    return merged[0].numpy(), merged_positions[0].numpy()


@pytest.mark.parametrize(("height", "width", "channels", "fmt"), IMAGES)
@pytest.mark.parametrize("budget", [280, 70])
def test_merged_patches_equal_the_12b_processor(tmp_path, height, width, channels, fmt, budget):
    """The 12B's processor: torchvision's uint8 resize (reproduced in numpy), then each 3 x 3
    block of 16-pixel patches merged into one 48-pixel patch; Pillow's resize is off by a level
    at some pixels, so an image that is resized tells the two apart."""
    path = image_file(tmp_path, height, width, channels, fmt)
    expected, positions = unified_reference(open_image(path), budget)
    ours = image_patches(path, max_soft_tokens=budget, merge=True)
    assert ours.soft_tokens == len(expected)
    np.testing.assert_array_equal(ours.positions, positions)
    assert np.abs(ours.patches - expected).max() <= 1e-5
    pillow = image_patches(path, max_soft_tokens=budget, merge=True, resize="pil").patches
    assert (height, width) == (16, 16) or np.abs(pillow - expected).max() > 1e-3


def test_torchvision_resize_in_numpy_equals_torch():
    """`resize_bicubic_uint8` against torch's uint8 antialiased bicubic (the op torchvision's
    resize runs for uint8 images on the CPU): down and up, one side or both, strong downscales,
    plain and channels-last layouts; equal to the level."""
    rng = np.random.default_rng(0)
    shapes = [((100, 150), (48, 96)), ((37, 500), (48, 432)), ((50, 50), (96, 96)),
              ((300, 200), (300, 144)), ((1200, 90), (96, 48)), ((7, 9), (5, 13))]  # fmt: skip
    for (h, w), size in shapes:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ours = resize_bicubic_uint8(pixels, *size)
        for layout in (torch.contiguous_format, torch.channels_last):
            tensor = (
                torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous(memory_format=layout)
            )
            expected = torch.nn.functional.interpolate(tensor, size, mode="bicubic", antialias=True)
            np.testing.assert_array_equal(ours, expected[0].permute(1, 2, 0).numpy())
    with pytest.raises(MediaError, match="resize must be one of pil, torchvision"):
        image_patches(Image.new("RGB", (32, 32)), resize="lanczos")


def png_header_claiming(width: int, height: int) -> bytes:
    """A 1 x 1 PNG whose header says width x height (a decompression bomb's first bytes)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def test_bad_images_raise_one_clear_error(tmp_path):
    good = image_file(tmp_path, 64, 64, 3, "JPEG").read_bytes()
    cases = {
        "no such file": tmp_path / "missing.png",
        "not an image": b"definitely not an image",
        "cannot be decoded": good[: len(good) // 2],
        "pixels": png_header_claiming(30_000, 30_000),
    }
    for message, source in cases.items():
        with pytest.raises(MediaError, match=message):
            image_patches(source)
    with pytest.raises(MediaError, match="above the limit"):
        open_image(good, max_pixels=1000)
    with pytest.raises(MediaError, match="max_soft_tokens"):
        image_patches(good, max_soft_tokens=100)


WAVE_SECONDS = [0.5, 1.2345, 3.0]


@pytest.mark.parametrize("seconds", WAVE_SECONDS)
def test_log_mel_equals_the_feature_extractor(seconds):
    rng = np.random.default_rng(int(seconds * 1000))
    wave = (0.2 * rng.standard_normal(int(seconds * 16_000))).astype(np.float32)
    ref = Gemma4AudioFeatureExtractor()([wave], return_tensors="np")
    kept = int(ref["input_features_mask"][0].sum())
    ours = log_mel(wave)
    assert ours.shape == (kept, 128) == (mel_frames(len(wave)), 128)
    assert np.abs(ours - ref["input_features"][0][:kept]).max() <= 1e-5


@pytest.mark.parametrize("samples", [700, 16_000, 16_000 * 3 + 77, 480_000])
def test_soft_token_counts_equal_the_processor(samples):
    """The conformer's output length (two stride-2 convolutions over our frames) equals the
    number of placeholders transformers' processor writes."""
    fake = SimpleNamespace(feature_extractor=Gemma4AudioFeatureExtractor(), audio_seq_length=750)
    expected = Gemma4Processor._compute_audio_num_tokens(fake, np.zeros(samples), 16_000)
    assert output_length(mel_frames(samples)) == expected


def test_waveform_frames_equal_the_12b_feature_extractor():
    wave = np.random.default_rng(0).standard_normal(16_000 + 123).astype(np.float32)
    ref = Gemma4UnifiedAudioFeatureExtractor()([wave], return_tensors="np")
    np.testing.assert_array_equal(waveform_frames(wave), ref["input_features"][0])


@pytest.mark.parametrize(
    ("rate", "channels", "fmt"),
    [(16_000, 1, "WAV"), (8_000, 1, "WAV"), (22_050, 2, "FLAC"), (44_100, 1, "OGG"),
     (48_000, 2, "WAV"), (24_000, 1, "MP3")],
)  # fmt: skip
def test_read_audio_equals_transformers_load_audio(tmp_path, rate, channels, fmt):
    rng = np.random.default_rng(rate)
    t = np.arange(int(1.3 * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * t)[:, None] + 0.05 * rng.standard_normal(
        (len(t), channels)
    )
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, wave.astype(np.float32), rate, format=fmt)
    expected = load_audio(str(path), sampling_rate=16_000, backend="soundfile")
    ours = read_audio(path)
    assert ours.dtype == np.float32
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= 1e-5
    # And what the tower sees: the features of the decoded clip.
    ref = Gemma4AudioFeatureExtractor()([expected], return_tensors="np")
    kept = int(ref["input_features_mask"][0].sum())
    assert np.abs(log_mel(ours) - ref["input_features"][0][:kept]).max() <= 1e-5


def test_bad_audio_raises_one_clear_error(tmp_path):
    long_clip = tmp_path / "long.wav"
    sf.write(long_clip, np.zeros(31 * 8_000, np.float32), 8_000)
    cases = {
        "no such file": (tmp_path / "missing.wav", None),
        "not audio": (b"RIFF but not really a wave file", None),
        "longer than": (long_clip, None),
        "sampling_rate": (np.zeros(100, np.float32), None),
        "finite": (np.array([0.0, np.nan], np.float32), 16_000),
    }
    for message, (source, rate) in cases.items():
        with pytest.raises(MediaError, match=message):
            read_audio(source, rate)
    with pytest.raises(MediaError, match="too short"):
        log_mel(np.zeros(100, np.float32))


def test_layout_expands_each_placeholder_in_order():
    boi, image, eoi = 10, 11, 12
    tokens = [1, image, 5, image, 6]
    assert expand(tokens, image, boi, eoi, [2, 3], "image") == [
        1, boi, image, image, eoi, 5, boi, image, image, image, eoi, 6,
    ]  # fmt: skip
    with pytest.raises(MediaError, match="2 image placeholder"):
        expand(tokens, image, boi, eoi, [2], "image")


def test_video_text_is_the_processors():
    metadata = SimpleNamespace(fps=2.0, timestamps=[0.0, 61.5])
    fake = SimpleNamespace(boi_token="<B>", eoi_token="<E>", video_token="<V>")
    inputs = {"num_soft_tokens_per_video": [2], "video_metadata": [metadata]}
    expected = Gemma4Processor.replace_video_token(fake, inputs, 0)
    assert video_text(metadata.timestamps, 2, "<B>", "<V>", "<E>") == expected


def test_sources_data_urls_and_no_network(tmp_path):
    path = image_file(tmp_path, 40, 60, 3, "PNG")
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    np.testing.assert_array_equal(image_patches(url).patches, image_patches(path).patches)
    with pytest.raises(MediaError, match="not fetched"):
        image_patches("https://example.com/cat.png")
    with pytest.raises(MediaError, match="not valid base64"):
        image_patches("data:image/png;base64,@@@")
    with pytest.raises(MediaError, match="not fetched"):
        read_audio("http://example.com/a.wav")


def test_media_parts_in_message_order():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [
            {"type": "image", "image": "a.png"}, {"type": "text", "text": "and"},
            {"type": "audio", "path": "b.wav"}, {"type": "image", "url": "c.jpg"},
        ]},
    ]  # fmt: skip
    assert media_parts(messages) == (["a.png", "c.jpg"], ["b.wav"])
    with pytest.raises(MediaError, match="message 0 part 0"):
        media_parts([{"role": "user", "content": [{"type": "image"}]}])


def test_media_for_a_text_only_model_is_refused_before_decoding(tmp_path):
    class TextOnly:  # what `load` returns without towers: no `media_args`
        pass

    with pytest.raises(MediaError, match="text-only"):
        prepare(TextOnly(), [1, 2], images=[tmp_path / "never-read.png"])
    assert prepare(TextOnly(), [1, 2]) == ([1, 2], None)
