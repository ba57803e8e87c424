"""The exact audio judge for ``tones`` clips: beeps found by their energy, each one's start pitch, length and
glide measured by FFT, and every fact of a caption checked against them in order.

- **Onsets**: the RMS of HOP-sample windows; a beep is a run of windows above ``max(FLOOR, REL * peak)``,
  runs closer than MERGE seconds joined and runs shorter than MIN_EVENT seconds ignored as clicks.
- **Pitch**: the strongest frequency (Hann window, zero-padded FFT, parabolic peak) in the beep's first
  PITCH_WINDOW seconds, classed by the geometric midpoints between the data's bands.
- **Glide**: the strongest frequency in the last third of the beep over that in the first third: above
  GLIDE_RATIO rising, below its inverse falling, else steady (the data glides by 1.5x).
- **Length**: short below LONG_FROM seconds, else long (the data's are 0.10-0.14 and 0.32-0.40 s).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from omnidit.audio_io import mono
from omnidit.data.tones import DURATIONS, GLIDES, PITCHES, SAMPLE_RATE
from omnidit.errors import OmniditError

HOP = 0.005  # seconds per RMS window
FLOOR = 0.02  # RMS below this is silence whatever the clip's loudness
REL = 0.2  # ... and below this fraction of the clip's loudest window
MERGE = 0.03  # seconds: runs closer than this are one beep
MIN_EVENT = 0.03  # seconds: shorter runs are clicks, not beeps
PITCH_WINDOW = 0.03  # seconds at a beep's start that give its pitch
GLIDE_RATIO = 1.15
LONG_FROM = math.sqrt(DURATIONS["short"][1] * DURATIONS["long"][0])  # ~0.21 s
_NAMES = list(PITCHES)
PITCH_EDGES = [math.sqrt(PITCHES[a][1] * PITCHES[b][0]) for a, b in zip(_NAMES, _NAMES[1:])]  # ~321, ~622 Hz


@dataclass(frozen=True)
class BeepSpec:
    """One beep a caption asks for."""

    pitch: str
    duration: str
    glide: str


@dataclass(frozen=True)
class Event:
    """One beep found in a clip: start and end in seconds, start frequency in Hz, its classes."""

    onset: float
    end: float
    frequency: float
    pitch: str
    duration: str
    glide: str

    def describe(self) -> str:
        return (f"a {self.duration} {self.glide} {self.pitch} beep ({self.frequency:.0f} Hz, "
                f"{self.end - self.onset:.2f} s at {self.onset:.2f} s)")


def parse_tone_caption(caption: str) -> tuple[BeepSpec, ...]:
    """'a short low beep then a long rising high beep' -> the beeps it asks for, in order."""
    specs = []
    for phrase in caption.lower().split(" then "):
        words = re.findall(r"[a-z]+", phrase)
        pitch = [w for w in words if w in PITCHES]
        duration = [w for w in words if w in DURATIONS]
        glide = [w for w in words if w in GLIDES]
        if len(pitch) != 1 or len(duration) > 1 or len(glide) > 1 or "beep" not in words:
            raise OmniditError(f"cannot read the beep {phrase.strip()!r} of the caption {caption!r}",
                               hint="e.g. 'a short low beep then a long rising high beep'")
        specs.append(BeepSpec(pitch[0], duration[0] if duration else "", glide[0] if glide else "steady"))
    return tuple(specs)


def dominant_frequency(x: np.ndarray, sample_rate: int) -> float:
    """The strongest frequency of ``x`` in Hz: Hann window, FFT zero-padded to 8x, parabolic interpolation."""
    if len(x) < 8:
        return 0.0
    n = 8 * len(x)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), n))
    k = int(np.argmax(spectrum[1:-1])) + 1
    a, b, c = np.log(spectrum[k - 1:k + 2] + 1e-12)
    shift = 0.5 * (a - c) / (a - 2 * b + c) if a - 2 * b + c != 0 else 0.0
    return float((k + shift) * sample_rate / n)


def pitch_class(frequency: float) -> str:
    return _NAMES[int(np.searchsorted(PITCH_EDGES, frequency))]


def find_beeps(audio: np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE) -> list[Event]:
    """Every beep in a clip, in time order."""
    x = mono(audio)
    hop = max(1, int(round(HOP * sample_rate)))
    windows = len(x) // hop
    if windows == 0:
        return []
    rms = np.sqrt(np.mean(x[:windows * hop].reshape(windows, hop) ** 2, axis=1))
    loud = rms > max(FLOOR, REL * float(rms.max()))
    runs: list[list[int]] = []
    for i in np.flatnonzero(loud):
        if runs and (i - runs[-1][1]) * hop <= MERGE * sample_rate:
            runs[-1][1] = i + 1
        else:
            runs.append([int(i), int(i) + 1])
    events = []
    for start, end in runs:
        if (end - start) * hop < MIN_EVENT * sample_rate:
            continue
        segment = x[start * hop:end * hop]
        head = segment[:max(8, int(PITCH_WINDOW * sample_rate))]
        third = max(8, len(segment) // 3)
        first, last = dominant_frequency(segment[:third], sample_rate), dominant_frequency(segment[-third:],
                                                                                           sample_rate)
        ratio = last / first if first > 0 else 1.0
        glide = "rising" if ratio > GLIDE_RATIO else "falling" if ratio < 1 / GLIDE_RATIO else "steady"
        frequency = dominant_frequency(head, sample_rate)
        seconds = (end - start) * hop / sample_rate
        events.append(Event(start * hop / sample_rate, end * hop / sample_rate, frequency, pitch_class(frequency),
                            "long" if seconds >= LONG_FROM else "short", glide))
    return events


def judge_tones(audio: np.ndarray | torch.Tensor, caption: str | Sequence[BeepSpec],
                sample_rate: int = SAMPLE_RATE) -> tuple[bool, str, list[Event]]:
    """(right, the first reason it is not, the beeps found) for a clip against its caption: the same number of
    beeps, and each in order with the caption's pitch, length (when it names one) and glide."""
    specs = parse_tone_caption(caption) if isinstance(caption, str) else tuple(caption)
    events = find_beeps(audio, sample_rate)
    if len(events) < len(specs):
        return False, f"{len(events)} beeps heard, {len(specs)} asked for (missing beep)", events
    if len(events) > len(specs):
        return False, f"{len(events)} beeps heard, {len(specs)} asked for (extra beep)", events
    for i, (spec, event) in enumerate(zip(specs, events), start=1):
        for fact in ("pitch", "duration", "glide"):
            wanted = getattr(spec, fact)
            if wanted and getattr(event, fact) != wanted:
                return False, f"beep {i} should be {wanted}: heard {event.describe()}", events
    return True, "", events


def beep_facts(clips: Sequence[tuple[str | Sequence[BeepSpec], Sequence[Event]]]) -> dict:
    """Where sound made from captions goes wrong, past the first reason ``judge_tones`` gives: over
    (caption, beeps heard) pairs, the share of clips with as many beeps as asked (``count_right``), how far the
    others are off (``count_off``: {heard - asked: clips}), and over the clips with the right count, the share
    of beeps whose pitch, length (when the caption names one) and glide are right (``pitch``, ``duration``,
    ``glide``; None when no beep qualifies) and the number of those beeps (``beeps``)."""
    off: Counter[int] = Counter()
    right = {fact: [0, 0] for fact in ("pitch", "duration", "glide")}
    for caption, events in clips:
        specs = parse_tone_caption(caption) if isinstance(caption, str) else tuple(caption)
        if len(events) != len(specs):
            off[len(events) - len(specs)] += 1
            continue
        for spec, event in zip(specs, events):
            for fact, tally in right.items():
                if getattr(spec, fact):  # a caption may leave a beep's length unsaid
                    tally[0] += getattr(event, fact) == getattr(spec, fact)
                    tally[1] += 1
    return {"clips": len(clips), "count_right": (len(clips) - sum(off.values())) / max(1, len(clips)),
            "count_off": {str(k): off[k] for k in sorted(off)},
            **{fact: (n / total if total else None) for fact, (n, total) in right.items()},
            "beeps": right["pitch"][1]}
