"""Video files -> sampled frames with their timestamps, without torch (PyAV and Pillow).

As transformers' Gemma 4 video processor with its PyAV backend: the first video stream is decoded,
`num_frames` (32) frames are taken at indices `i * total // num_frames` (every frame of a shorter
video, where transformers refuses it), and each frame's timestamp is its index over the stream's
average frame rate. Each frame is then prepared like an image with a budget of 70 soft tokens
(`VIDEO_SOFT_TOKENS`) and written after its "mm:ss" timestamp (`layout.video_text`).

Frames are resized with Pillow's bicubic filter, as transformers' PIL image processor resizes
images; its video processor resizes with torchvision, whose antialiased bicubic resize follows
Pillow's to within rounding.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from gemma_mlx.errors import MediaError
from gemma_mlx.media.image import MAX_PIXELS
from gemma_mlx.media.sources import resolve_source

NUM_FRAMES = 32  # transformers' Gemma4VideoProcessor.num_frames
VIDEO_SOFT_TOKENS = 70  # its max_soft_tokens: soft tokens per frame
# Frames decoded at most to reach the sampled ones (an hour at 30 fps); past it a video is refused.
MAX_DECODED_FRAMES = 108_000

VideoSource = str | Path | bytes


@dataclass
class VideoFrames:
    """The sampled frames of one video and their times in seconds."""

    frames: list[Image.Image]
    timestamps: list[float]


def sample_indices(total: int, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """transformers' uniform sampling (`default_sample_indices_fn`), at most every frame."""
    n = min(num_frames, total)
    return np.arange(n, dtype=np.int64) * total // n


def read_video(
    source: VideoSource, num_frames: int = NUM_FRAMES, max_pixels: int = MAX_PIXELS
) -> VideoFrames:
    """Decode and sample a video file (path, bytes or a base64 data URL). Raises `MediaError`
    for a missing, unreadable, damaged or oversized file, or one without a video stream."""
    import av

    source = resolve_source(source, "video")
    name = "video bytes" if isinstance(source, bytes) else str(source)
    try:
        container = av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    except FileNotFoundError as e:
        raise MediaError(f"{name}: no such video file") from e
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"{name}: not a readable video ({e})") from e
    with container:
        if not container.streams.video:
            raise MediaError(f"{name}: holds no video stream")
        stream = container.streams.video[0]
        total, fps = int(stream.frames), stream.average_rate
        if total <= 0 or not fps:
            raise MediaError(
                f"{name}: states no frame count or frame rate, which frame sampling needs; "
                "re-encode it (for example to MP4)"
            )
        if total > MAX_DECODED_FRAMES:
            raise MediaError(f"{name}: {total} frames, more than the {MAX_DECODED_FRAMES} allowed")
        if stream.width * stream.height > max_pixels:
            raise MediaError(
                f"{name}: too many pixels per frame ({stream.width} x {stream.height}; at most "
                f"{max_pixels})"
            )
        indices = sample_indices(total, num_frames)
        wanted = set(indices.tolist())
        frames = []
        try:
            for i, frame in enumerate(container.decode(video=0)):
                if i > indices[-1]:
                    break
                if i in wanted:
                    frames.append(Image.fromarray(frame.to_ndarray(format="rgb24")))
        except (av.FFmpegError, ValueError) as e:
            raise MediaError(f"{name}: damaged video ({e})") from e
    if len(frames) != len(indices):
        raise MediaError(
            f"{name}: its header says {total} frames but fewer could be decoded (truncated or "
            "damaged)"
        )
    return VideoFrames(frames, [int(i) / float(fps) for i in indices])
