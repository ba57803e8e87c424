"""The exact sync judge for clips with sound (``bounce`` data): beeps heard per colour pitch, bounces seen by the
video tracker, and the two matched within one video frame.

- **Heard**: a short-time Fourier transform (40 ms Hann windows every 5 ms, zero-padded to 4096 points) read
  at each colour's pitch (``bounce.COLOUR_PITCHES``, 19% apart); a beep of that colour is a run of at least
  MIN_RUN seconds above max(FLOOR, REL x the loudest pitch), timed at the run's first window centre plus
  ONSET_LAG (the measured delay of that centre behind the true onset, negative: the window sees a tone
  before its centre does). Simultaneous beeps of different colours are heard apart.
- **Seen**: each tracked object's path along x and y; a bounce is a local extreme of it, timed at the tip of
  the tent that the axis speed (the median frame step) draws through the frames around it.
- **Matched**: each bounce to the nearest unused beep within one frame (1 / fps) of it: the sync error in ms,
  whether the beep's pitch is the bouncing object's colour; unmatched bounces are missing beeps, unmatched
  beeps extra ones. Only bounces and beeps inside [1 / fps, (T - 2) / fps] are judged: a bounce needs a
  frame on each side of the frame nearest to it to be seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from omnidit.audio_io import mono, stft_magnitude
from omnidit.data.bounce import COLOUR_PITCHES, MIN_BOUNCE_GAP
from omnidit.data.tones import SAMPLE_RATE
from omnidit.evaluate.tracker import detect_clip, link, max_step

WINDOW = 0.04  # seconds per STFT window
HOP = 0.005
FFT_SIZE = 4096
FLOOR = 2.0  # magnitude (sum over a window of amplitude x Hann) below which nothing is a beep
REL = 0.3
MIN_RUN = 0.03  # seconds
ONSET_LAG = -0.001  # seconds from a run's first window centre to the true onset (measured on ground truth)
MIN_STEP = 1.0  # px per frame: slower steps along an axis (a still axis's detection jitter) are not motion


@dataclass(frozen=True)
class Heard:
    time: float
    colour: str


@dataclass(frozen=True)
class Seen:
    time: float
    colour: str


@dataclass
class SyncReport:
    """The judgement of one clip (module docstring)."""

    bounces: int = 0
    beeps: int = 0
    matched: int = 0
    pitch_matched: int = 0
    errors_ms: list[float] = field(default_factory=list)
    missing: list[float] = field(default_factory=list)  # times of bounces without a beep
    extra: list[float] = field(default_factory=list)  # times of beeps without a bounce
    picture_fault: str = ""  # what is wrong with a made clip itself (nothing moves, ...); any makes it wrong

    @property
    def sync_within_one_frame(self) -> float:
        return self.matched / self.bounces if self.bounces else 1.0

    @property
    def pitch_match(self) -> float:
        return self.pitch_matched / self.matched if self.matched else 1.0

    @property
    def right(self) -> bool:
        return self.matched == self.bounces == self.beeps == self.pitch_matched and not self.picture_fault


def hear_beeps(audio, sample_rate: int = SAMPLE_RATE) -> list[Heard]:
    """Every beep in a soundtrack, with the colour whose pitch it sounds, in time order."""
    length, hop = int(round(WINDOW * sample_rate)), int(round(HOP * sample_rate))
    starts, spectrum = stft_magnitude(mono(audio), length, hop, FFT_SIZE)  # (W,), (W, F)
    if len(starts) == 0:
        return []
    colours = list(COLOUR_PITCHES)
    bins = [int(round(COLOUR_PITCHES[c] * FFT_SIZE / sample_rate)) for c in colours]
    level = np.stack([spectrum[:, b - 2:b + 3].max(axis=1) for b in bins], axis=1)  # (W, colours)
    threshold = max(FLOOR, REL * float(level.max(initial=0.0)))
    min_windows = int(np.ceil(MIN_RUN / HOP))
    found = []
    for k, colour in enumerate(colours):
        loud = np.concatenate([[False], level[:, k] > threshold, [False]])
        edges = np.flatnonzero(np.diff(loud.astype(np.int8)))
        for start, end in zip(edges[::2], edges[1::2]):
            if end - start >= min_windows:
                centre = (starts[start] + length / 2) / sample_rate
                found.append(Heard(float(centre + ONSET_LAG), colour))
    return sorted(found, key=lambda h: h.time)


def moving_objects(clip, fps: float) -> tuple[int, int]:
    """(objects the tracker follows through a clip, how many of them move at least MIN_STEP px per frame)."""
    detections, (width, height) = detect_clip(clip)
    tracks = link(detections, max_step(fps, min(width, height)))
    moving = 0
    for track in tracks:
        centres = np.array([d.centre_px for d in track.detections], dtype=np.float64)
        steps = np.abs(np.diff(centres, axis=0)) / np.diff(np.array(track.frames))[:, None] if len(centres) > 1 else []
        moving += bool(len(steps)) and float(np.median(steps, axis=0).max()) >= MIN_STEP
    return len(tracks), moving


def see_bounces(clip, fps: float) -> list[Seen]:
    """Every bounce the tracker sees in a clip (3, T, H, W) in [-1, 1] or (T, H, W, 3) uint8, in time order.

    A bounce reverses one velocity component and keeps its size, so along each axis an object's path is a
    tent around the bounce: the bounce is a frame where the position is a local extreme, and with the axis
    speed (the median step, the same before and after every bounce) the two frames around it place the
    tip of the tent in time."""
    detections, (width, height) = detect_clip(clip)
    found = []
    for track in link(detections, max_step(fps, min(width, height))):
        frames = np.array(track.frames)
        if len(frames) < 3 or np.any(np.diff(frames) != 1):
            continue  # a track with gaps does not say where its object went between
        centres = np.array([d.centre_px for d in track.detections], dtype=np.float64)
        tips = []  # in frames
        for axis in range(2):
            y = centres[:, axis]
            speed = float(np.median(np.abs(np.diff(y))))
            if speed < MIN_STEP:
                continue  # no motion along this axis to reverse
            for i in range(1, len(y) - 1):
                for sign in (1.0, -1.0):  # a maximum, then a minimum
                    a, b, c = sign * y[i - 1], sign * y[i], sign * y[i + 1]
                    if b >= a and b >= c and b - min(a, c) >= max(MIN_STEP, 0.5 * speed):
                        # the tip lies on the side of the higher neighbour
                        tip = i + 0.5 - (b - c) / (2 * speed) if c >= a else i - 0.5 + (b - a) / (2 * speed)
                        tips.append(float(np.clip(tip, i - 1, i + 1)) + frames[0])
        last = -np.inf
        for tip in sorted(tips):  # as in the data, a bounce within MIN_BOUNCE_GAP of the object's last is silent
            if tip / fps - last >= MIN_BOUNCE_GAP:
                found.append(Seen(tip / fps, track.colour))
                last = tip / fps
    return sorted(found, key=lambda s: s.time)


def judge_sync(bounces: Sequence[Seen], beeps: Sequence[Heard], fps: float, frames: int) -> SyncReport:
    """Match bounces and beeps within one frame (module docstring)."""
    lo, hi = 1 / fps, (frames - 2) / fps
    outside = [b.time for b in bounces if not lo <= b.time <= hi]  # their beeps are neither matched nor extra
    bounces = [b for b in bounces if lo <= b.time <= hi]
    beeps = [b for b in beeps if lo - 1 / fps <= b.time <= hi + 1 / fps]
    report = SyncReport(bounces=len(bounces), beeps=sum(lo <= b.time <= hi for b in beeps))
    used: set[int] = set()
    for bounce in bounces:
        options = sorted((abs(beep.time - bounce.time), beep.colour != bounce.colour, j)
                         for j, beep in enumerate(beeps) if j not in used and abs(beep.time - bounce.time) <= 1 / fps)
        if not options:
            report.missing.append(bounce.time)
            continue
        _, wrong_pitch, j = min(options, key=lambda o: (o[1], o[0]))  # the same colour first, then the nearest
        used.add(j)
        report.matched += 1
        report.pitch_matched += not wrong_pitch
        report.errors_ms.append(1000 * (beeps[j].time - bounce.time))
    report.extra = [b.time for j, b in enumerate(beeps) if j not in used and lo <= b.time <= hi
                    and not any(abs(b.time - t) <= 1 / fps for t in outside)]
    report.beeps = report.matched + len(report.extra)
    return report
