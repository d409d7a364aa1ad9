"""Video files: decoding and frame sampling equal transformers' (PyAV backend), each frame's
patches equal transformers' image processor, the prompt holds each frame after its timestamp
with the model's soft tokens, and bad files are one clear error."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from multimodal_reference import PATCH, TOKENS
from processor_functions import patch_positions, processor_functions, torchvision_resize
from transformers.video_utils import load_video

from gemma_mlx.errors import MediaError
from gemma_mlx.media.image import image_patches
from gemma_mlx.media.layout import video_text
from gemma_mlx.media.prompt import prepare
from gemma_mlx.media.video import NUM_FRAMES, VIDEO_SOFT_TOKENS, read_video


def write_video(path: Path, frames: int, width: int = 48, height: int = 32, fps: int = 10) -> Path:
    """A small MPEG-4 video of random frames."""
    import av

    rng = np.random.default_rng(frames)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("frames, fps", [(45, 10), (100, 24)])
def test_frames_and_timestamps_equal_transformers(tmp_path, frames, fps):
    path = write_video(tmp_path / "clip.mp4", frames, fps=fps)
    expected, metadata = load_video(str(path), backend="pyav", num_frames=NUM_FRAMES)
    video = read_video(path)
    assert len(video.frames) == NUM_FRAMES
    np.testing.assert_array_equal(np.stack([np.asarray(f) for f in video.frames]), expected)
    np.testing.assert_allclose(video.timestamps, metadata.timestamps, rtol=0, atol=1e-12)

    # Each frame's patches as the video is encoded, against the video processors' own functions
    # (Gemma4VideoProcessor; the 12B's merges them) around torchvision's uint8 resize, at the
    # processors' (and the real towers') 16-pixel patches; the first, middle and last frames.
    picked = (0, len(expected) // 2, len(expected) - 1)
    for merge, module in ((False, "gemma4/video_processing_gemma4"),
                          (True, "gemma4_unified/video_processing_gemma4_unified")):  # fmt: skip
        names = (
            ("convert_video_to_patches", "patches_merge")
            if merge
            else ("convert_video_to_patches",)
        )
        f = processor_functions(module, *names)
        pixels = torch.stack(
            [torchvision_resize(expected[i], VIDEO_SOFT_TOKENS, module) for i in picked]
        )
        patches = f["convert_video_to_patches"](pixels, 16)
        positions = patch_positions(*pixels.shape[-2:], patches.shape[1]).expand(
            len(picked), -1, -1
        )
        if merge:
            patches, positions = f["patches_merge"](patches, positions, patches.shape[1] // 9)
        for j, i in enumerate(picked):
            ours = image_patches(
                video.frames[i], 16, 3, VIDEO_SOFT_TOKENS, merge, resize="torchvision"
            )
            np.testing.assert_array_equal(ours.positions, positions[j].numpy())
            assert np.abs(ours.patches - patches[j].numpy()).max() <= 1e-5


def test_a_short_video_gives_every_frame(tmp_path):
    video = read_video(write_video(tmp_path / "short.mp4", 5, fps=5))
    assert len(video.frames) == 5 and video.timestamps == [0.0, 0.2, 0.4, 0.6, 0.8]


def test_bad_videos_are_one_clear_error(tmp_path):
    good = write_video(tmp_path / "clip.mp4", 20)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[:600])
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    cases = [
        (tmp_path / "missing.mp4", "missing.mp4: no such video file"),
        (text, "notes.mp4: not a readable video"),
        (truncated, "truncated.mp4"),
        ("https://example.com/v.mp4", "URLs are not fetched"),
    ]
    for source, message in cases:
        with pytest.raises(MediaError, match=message):
            read_video(source)
    with pytest.raises(MediaError, match="too many pixels"):
        read_video(good, max_pixels=100)


def test_video_prompt_layout_and_soft_tokens(tmp_path):
    """`prepare` with a video: per frame "mm:ss " then the image markers around the frame's run
    of video placeholders, each run holding that frame's soft tokens from the vision tower."""
    from multimodal_reference import VARIANTS, load_ours, save_reference

    save_reference(VARIANTS["e4b"](), tmp_path / "hf")
    model = load_ours(tmp_path / "hf")
    path = write_video(tmp_path / "clip.mp4", 3, fps=1)

    def encode_text(text: str) -> list[int]:
        return [ord(c) for c in text]  # a stand-in tokenizer: one id per character

    tokens = [2, 17, TOKENS["video_token_id"], 19]
    out, media = prepare(model, tokens, videos=[path], encode_text=encode_text)
    frames = read_video(path).frames
    expected_frames = [
        model.encode_image(*map(mx.array, (p.patches, p.positions)))
        for p in (
            image_patches(f, PATCH, 3, VIDEO_SOFT_TOKENS, resize="torchvision") for f in frames
        )
    ]
    # The processor's text (`video_text`, tested against transformers), one id per character.
    n = expected_frames[0].shape[0]
    markers = {"\x01": TOKENS["boi_token_id"], "\x02": TOKENS["video_token_id"],
               "\x03": TOKENS["eoi_token_id"]}  # fmt: skip
    text = video_text(read_video(path).timestamps, n, "\x01", "\x02", "\x03")
    expected = [2, 17, *(markers.get(c, ord(c)) for c in text), 19]
    assert out == expected
    assert [item.kind for item in media.items] == ["video"] * 3
    np.testing.assert_array_equal(
        np.array(media.embeddings), np.array(mx.concatenate(expected_frames))
    )
    with pytest.raises(MediaError, match="1 video placeholder"):
        prepare(model, tokens, videos=[path, path], encode_text=encode_text)


def test_timestamps_are_tokenized_as_the_processor_tokenizes(tmp_path):
    """transformers' processor writes the video's text into the prompt and tokenizes the whole:
    the first "mm:ss " joins the text before the video. With a tokenizer that merges across that
    seam ("e" + "0"), our token-level layout gives the same ids; tokenizing the timestamp on its
    own (the layout without a decoder) does not. A prompt not tokenized from text keeps its ids."""
    import json

    from multimodal_chat_model import CHAT_TEMPLATE, media_tokenizer_json
    from tiny_chat_model import write_tokenizer
    from transformers import PreTrainedTokenizerFast

    from gemma_mlx.media.layout import TextCodec, VideoRun, expand_video
    from gemma_mlx.tokenizer import load_tokenizer

    write_tokenizer(tmp_path, CHAT_TEMPLATE)
    spec = media_tokenizer_json()
    spec["model"]["vocab"]["e0"] = len(spec["model"]["vocab"]) + len(spec["added_tokens"])
    spec["model"]["merges"].append(["e", "0"])
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    ours, hf = (
        load_tokenizer(tmp_path),
        PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json")),
    )

    prompt = "<bos><|turn>user\nDescribe<|video|> then the <|video|><turn|>\n"
    runs = [VideoRun([0.0, 61.5], 2), VideoRun([0.0], 3)]
    text = prompt
    for run in runs:
        text = text.replace(
            "<|video|>",
            video_text(run.timestamps, run.soft_tokens, "<|image>", "\x00", "<image|>"),
            1,
        )
    expected = hf(text.replace("\x00", "<|video|>"), add_special_tokens=False)["input_ids"]
    video, markers = TOKENS["video_token_id"], (TOKENS["boi_token_id"], TOKENS["eoi_token_id"])
    tokens = ours.encode(prompt)
    assert expand_video(tokens, video, runs, markers, TextCodec.of(ours)) == expected
    alone = TextCodec(lambda t: ours.encode(t, add_special_tokens=False))
    assert expand_video(tokens, video, runs, markers, alone) != expected

    # "Describe" spelled one character per token: not what its text encodes to, so kept.
    head = ours.encode("<bos><|turn>user\n")
    spelled = [*head, *(i for c in "Describe" for i in ours.encode(c, False)), video]
    out = expand_video(spelled, video, runs[:1], markers, TextCodec.of(ours))
    assert out[: len(spelled) - 1] == spelled[:-1]
    stamp = ours.encode("00:00 ", False)
    assert out[len(spelled) - 1 :][: len(stamp)] == stamp


def test_generate_and_command_line_take_a_video(tmp_path, capsys):
    """`videos=` on a text prompt (frames at its start, after BOS) and `--video`: the same
    tokens; a bad video file fails before the model is loaded, in one line."""
    from multimodal_chat_model import write_multimodal_model

    import gemma_mlx
    from gemma_mlx.cli import run
    from gemma_mlx.generate import generate, prepare_prompt

    directory = write_multimodal_model(tmp_path / "tiny-mm")
    model, tokenizer = gemma_mlx.load(directory)
    video = write_video(tmp_path / "clip.mp4", 3, fps=1)
    prepared = prepare_prompt(model, tokenizer, "Describe", videos=[video])
    assert [item.kind for item in prepared.media.items] == ["video"] * 3
    assert prepared.tokens[0] == tokenizer.bos_token_id
    parts = [{"type": "video", "video": str(video)}, {"type": "text", "text": "Describe"}]
    in_chat = prepare_prompt(model, tokenizer, [{"role": "user", "content": parts}])
    assert [item.kind for item in in_chat.media.items] == ["video"] * 3
    expected = generate(model, tokenizer, "Describe", videos=video, max_tokens=4)
    argv = ["--model", str(directory), "--video", str(video), "-p", "Describe", "-m", "4"]
    assert run([*argv, "--no-chat-template"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()

    missing = ["--model", str(tmp_path / "none"), "--video", str(tmp_path / "missing.mp4")]
    assert run([*missing, "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.mp4: no such video file" in err, err
