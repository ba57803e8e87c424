"""Save and load audio as WAV: 16-bit PCM through the standard library's ``wave``, any channel count and rate.

Audio is a float tensor (C, S) in [-1, 1] (a 1-D (S,) tensor is mono). A file appears only once complete:
it is written to a temporary name in the same folder, then renamed.
"""

from __future__ import annotations

import os
import uuid
import wave
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from omnidit.errors import OmniditError

PCM_SCALE = 32767
RATE_RANGE = (1000, 384_000)


def _check_rate(sample_rate: int) -> int:
    if isinstance(sample_rate, bool) or not float(sample_rate).is_integer() \
            or not RATE_RANGE[0] <= sample_rate <= RATE_RANGE[1]:
        raise OmniditError(f"the sample rate must be a whole number of Hz in [{RATE_RANGE[0]}, {RATE_RANGE[1]}], "
                           f"got {sample_rate}", hint="e.g. 8000, 16000 or 44100")
    return int(sample_rate)


def save_wav(audio: Tensor | np.ndarray, path: str | Path, sample_rate: int) -> Path:
    """Write ``audio`` (C, S) or (S,) float in [-1, 1] (clipped) as 16-bit PCM WAV; returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".wav":
        raise OmniditError(f"audio files are written as WAV, got {path}", hint="use a path ending in .wav")
    rate = _check_rate(sample_rate)
    x = audio.detach().cpu().float().numpy() if isinstance(audio, Tensor) else np.asarray(audio, np.float32)
    x = x[None] if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[1] == 0 or not np.isfinite(x).all():
        raise OmniditError(f"audio must be finite (C, S) or (S,) with samples, got shape {tuple(x.shape)}")
    pcm = np.round(np.clip(x, -1, 1) * PCM_SCALE).astype("<i2").T.copy()  # (S, C) interleaved
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with wave.open(str(temporary), "wb") as out:
            out.setnchannels(x.shape[0])
            out.setsampwidth(2)
            out.setframerate(rate)
            out.writeframes(pcm.tobytes())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def load_wav(path: str | Path, max_seconds: float | None = None) -> tuple[Tensor, int]:
    """(audio (C, S) float32 in [-1, 1], sample rate) of a PCM WAV file (8-, 16-, 24- or 32-bit). A file longer
    than ``max_seconds`` is refused before its samples are read."""
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as source:
            channels, width, rate, count = (source.getnchannels(), source.getsampwidth(), source.getframerate(),
                                            source.getnframes())
            if max_seconds is not None and count > max_seconds * rate:
                raise OmniditError(f"{path} lasts {count / rate:.1f} s, longer than the {max_seconds:g} s allowed")
            raw = source.readframes(count)
    except (OSError, EOFError, wave.Error) as error:
        raise OmniditError(f"cannot read {path} as a WAV file: {error}",
                           hint="give a PCM .wav file (e.g. one omnidit wrote)") from None
    if width == 3:  # 24-bit: widen to 32 by hand, numpy has no 3-byte integer
        bytes3 = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        samples = (bytes3.astype(np.int32) << np.array([8, 16, 24])).sum(axis=1).astype(np.int32) / 2.0**31
    elif width in (1, 2, 4):
        dtype = {1: np.uint8, 2: "<i2", 4: "<i4"}[width]
        samples = np.frombuffer(raw, dtype).astype(np.float64)
        samples = (samples - 128) / 128 if width == 1 else samples / (PCM_SCALE if width == 2 else 2.0**31)
    else:
        raise OmniditError(f"{path} has {8 * width}-bit samples, which omnidit does not read",
                           hint="convert it to 16-bit PCM")
    audio = torch.from_numpy(samples.reshape(-1, channels).T.astype(np.float32).copy())
    return audio.clamp(-1, 1), rate


def mono(audio: Tensor | np.ndarray) -> np.ndarray:
    """(S,) or (C, S) audio -> (S,) float64, the channels averaged."""
    x = audio.detach().cpu().double().numpy() if isinstance(audio, Tensor) else np.asarray(audio, np.float64)
    if x.ndim == 2:
        x = x.mean(axis=0)
    if x.ndim != 1:
        raise OmniditError(f"audio must be (S,) or (C, S), got shape {tuple(x.shape)}")
    return x


def stft_magnitude(x: np.ndarray, length: int, step: int, n_fft: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hann-windowed short-time spectrum of (S,) samples -> (window starts (W,), magnitudes (W, n_fft // 2 + 1));
    W is 0 when ``x`` is shorter than one window. ``n_fft`` > length zero-pads for finer frequency bins."""
    starts = np.arange(0, len(x) - length + 1, step)
    if len(starts) == 0:
        return starts, np.zeros((0, (n_fft or length) // 2 + 1))
    frames = np.stack([x[s:s + length] for s in starts]) * np.hanning(length)  # (W, L)
    return starts, np.abs(np.fft.rfft(frames, n_fft or length, axis=1))


def spectrogram(audio: Tensor | np.ndarray, sample_rate: int, window: float = 0.032, hop: float = 0.008,
                floor_db: float = -80.0) -> np.ndarray:
    """Log-magnitude spectrogram of (C, S) or (S,) audio (channels mixed): (frequencies, windows) uint8, 0 Hz in
    the last row (as drawn), 255 at the loudest bin and 0 at ``floor_db`` below it."""
    x = mono(audio)
    length, step = max(8, int(window * sample_rate)), max(1, int(hop * sample_rate))
    x = np.pad(x, (0, max(0, length - len(x))))
    db = 20 * np.log10(stft_magnitude(x, length, step)[1].T + 1e-12)  # (F, W)
    db = np.clip(db - db.max(), floor_db, 0.0)
    return np.round((db - floor_db) / -floor_db * 255).astype(np.uint8)[::-1]


def save_spectrogram(audio: Tensor | np.ndarray, path: str | Path, sample_rate: int,
                     metadata: dict | None = None) -> Path:
    """A spectrogram of ``audio`` as a greyscale PNG for looking at (time left to right, pitch upwards), with
    ``metadata`` in its text chunks."""
    from PIL import Image

    from omnidit.images import save_png

    image = Image.fromarray(spectrogram(audio, _check_rate(sample_rate)), mode="L")
    return save_png(image, path, {**(metadata or {}), "sample_rate": sample_rate})
