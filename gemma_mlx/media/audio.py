"""Audio -> features for the Gemma 4 audio tower, without torch (soundfile, soxr and numpy).

- `read_audio`: decode a file (WAV, FLAC, OGG, MP3: whatever libsndfile reads) or take samples,
  average the channels and resample to 16 kHz with soxr's "HQ" quality: transformers'
  `load_audio` with its soundfile backend (and `librosa.load`) does the same, to the sample.
- `log_mel`: transformers' `Gemma4AudioFeatureExtractor` (E2B/E4B): 20 ms Hann frames every 10 ms
  after a 10 ms leading pad, |rFFT| (512 bins), 128 HTK mel filters over 0-8 kHz, log(x + 0.001).
  transformers pads a clip to a multiple of 128 samples and masks the frames that reach into the
  padding; we return only the frames it keeps.
- `waveform_frames`: the 12B's `Gemma4UnifiedAudioFeatureExtractor`: raw samples, 640 per frame.

A clip longer than the model takes (30 s: the feature extractor's 480,000 samples, the processor's
750 soft tokens) is refused before it is decoded, as is one too short to make a soft token.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from gemma_mlx.errors import MediaError
from gemma_mlx.media.sources import resolve_source

SAMPLING_RATE = 16_000
MAX_SECONDS = 30.0
FRAME_LENGTH = 320  # 20 ms
HOP_LENGTH = 160  # 10 ms
FFT_LENGTH = 512
MEL_BINS = 128
MEL_FLOOR = 1e-3
MAX_FREQUENCY = 8_000.0
SAMPLES_PER_TOKEN_12B = 640  # 40 ms

AudioSource = str | Path | bytes | np.ndarray


def read_audio(
    source: AudioSource, sampling_rate: int | None = None, max_seconds: float = MAX_SECONDS
) -> np.ndarray:
    """Mono float32 samples at 16 kHz. An array `source` needs its `sampling_rate` (samples, or
    [samples, channels]); files carry theirs. Raises `MediaError` on anything unusable."""
    if isinstance(source, np.ndarray):
        if sampling_rate is None:
            raise MediaError("audio samples need their sampling_rate")
        samples = np.asarray(source, dtype=np.float32)
        if samples.ndim not in (1, 2) or samples.size == 0:
            raise MediaError(
                f"audio samples must be [samples] or [samples, channels], got {samples.shape}"
            )
        if samples.ndim == 2:
            samples = samples.mean(axis=1)
        name = "audio samples"
    else:
        samples, sampling_rate, name = _decode(source, max_seconds)
    if not isinstance(sampling_rate, int) or sampling_rate <= 0:
        raise MediaError(f"{name}: sampling rate must be a positive int, got {sampling_rate!r}")
    if not np.isfinite(samples).all():
        raise MediaError(f"{name}: samples must be finite numbers")
    seconds = len(samples) / sampling_rate
    if seconds > max_seconds:
        raise MediaError(f"{name}: {seconds:.1f} s is longer than the {max_seconds:g} s allowed")
    if sampling_rate != SAMPLING_RATE:
        samples = _resample(samples, sampling_rate)
    return np.ascontiguousarray(samples, dtype=np.float32)


def _decode(source: str | Path | bytes, max_seconds: float) -> tuple[np.ndarray, int, str]:
    import soundfile as sf

    source = resolve_source(source, "audio")
    name = "audio bytes" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise MediaError(f"{name}: no such file")
    try:
        with sf.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else source) as f:
            if f.samplerate <= 0:
                raise MediaError(f"{name}: invalid sampling rate {f.samplerate}")
            if f.frames > max_seconds * f.samplerate:
                raise MediaError(
                    f"{name}: {f.frames / f.samplerate:.1f} s is longer than the "
                    f"{max_seconds:g} s allowed"
                )
            samples = f.read(dtype="float32", always_2d=True)
            rate = f.samplerate
    except MediaError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise MediaError(f"{name}: not audio in a format libsndfile reads ({e})") from e
    if samples.size == 0:
        raise MediaError(f"{name}: holds no samples")
    return (samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]), rate, name


def _resample(samples: np.ndarray, sampling_rate: int) -> np.ndarray:
    """To 16 kHz as `librosa.load`: soxr HQ, then padded or cut to ceil(n * 16000 / rate)."""
    import soxr

    n = math.ceil(len(samples) * SAMPLING_RATE / sampling_rate)
    out = soxr.resample(samples, sampling_rate, SAMPLING_RATE, quality="soxr_hq")
    return np.pad(out, (0, max(0, n - len(out))))[:n]


def mel_filters() -> np.ndarray:
    """Triangular HTK mel filters [257, 128], float64 (transformers' `mel_filter_bank`)."""

    def to_mel(hz: np.ndarray | float) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)

    mels = np.linspace(to_mel(0.0), to_mel(MAX_FREQUENCY), MEL_BINS + 2)
    edges = 700.0 * (np.power(10, mels / 2595.0) - 1.0)
    bins = np.linspace(0, SAMPLING_RATE // 2, FFT_LENGTH // 2 + 1)
    slopes = edges[None, :] - bins[:, None]
    widths = np.diff(edges)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(down, up))


def mel_frames(samples: int) -> int:
    """Frames `log_mel` makes of `samples` samples (those whose window holds only real audio)."""
    return max((samples + FRAME_LENGTH // 2 - (FRAME_LENGTH + 1)) // HOP_LENGTH + 1, 0)


def log_mel(samples: np.ndarray) -> np.ndarray:
    """Log-mel features [frames, 128] float32 of 16 kHz mono `samples`."""
    padded = np.pad(samples.astype(np.float32), (FRAME_LENGTH // 2, 0))
    count = mel_frames(len(samples))
    if count == 0:
        raise MediaError(
            f"audio of {len(samples)} samples is too short: the model needs at least "
            f"{FRAME_LENGTH + 1 - FRAME_LENGTH // 2} at 16 kHz"
        )
    starts = np.arange(count)[:, None] * HOP_LENGTH
    frames = padded[starts + np.arange(FRAME_LENGTH)[None, :]]
    window = np.hanning(FRAME_LENGTH + 1)[:-1].astype(np.float32)  # periodic Hann
    spectrum = np.abs(np.fft.rfft(frames * window, n=FFT_LENGTH, axis=-1))
    return np.log(spectrum @ mel_filters() + MEL_FLOOR).astype(np.float32)


def waveform_frames(samples: np.ndarray, per_frame: int = SAMPLES_PER_TOKEN_12B) -> np.ndarray:
    """The 12B's features: `samples` zero-padded to whole frames of `per_frame`, [n, per_frame]."""
    if len(samples) == 0:
        raise MediaError("audio holds no samples")
    padded = np.pad(samples.astype(np.float32), (0, (-len(samples)) % per_frame))
    return padded.reshape(-1, per_frame)
