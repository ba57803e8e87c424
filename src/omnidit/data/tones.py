"""Procedural captioned beeps: one to four tones in a mono clip, each low, middle or high, short or long, and
steady, rising or falling ("a short low beep then a long rising high beep").

Pitch classes are frequency bands an octave apart (low 220-262 Hz, middle 392-494 Hz, high 784-988 Hz, drawn
uniformly in log frequency); a glide moves the frequency by a factor GLIDE over the beep, log-linearly, and
its class is read from its start. Short beeps last 0.10-0.14 s and long ones 0.32-0.40 s; beeps are at least
MIN_GAP apart and MARGIN from the clip's ends, with 5 ms fades so that they start and stop without clicks.
Everything is seeded: ``ToneDataset(seed=s)[i]`` is the same clip on any machine. ``omnidit.evaluate.audio_judge``
reads every fact back exactly. ``ToneDataset.counterfactual(i)`` is clip i with one fact of one beep changed (the
partner that train.counterfactual_weight contrasts it with).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from omnidit.data.shapes import caption_words
from omnidit.errors import OmniditError

SAMPLE_RATE = 8000
PITCHES: dict[str, tuple[float, float]] = {"low": (220.0, 262.0), "middle": (392.0, 494.0), "high": (784.0, 988.0)}
DURATIONS: dict[str, tuple[float, float]] = {"short": (0.10, 0.14), "long": (0.32, 0.40)}  # seconds
GLIDES = ("steady", "rising", "falling")
GLIDE = 1.5  # a rising beep ends at 1.5x its start frequency, a falling one at 1 / 1.5
AMPLITUDE = 0.5
FADE = 0.005  # seconds of linear fade in and out
MIN_GAP = 0.08  # seconds of silence between beeps
MARGIN = 0.05  # seconds of silence before the first beep and after the last
MAX_BEEPS = 4
MIN_SECONDS = 2 * MARGIN + MAX_BEEPS * DURATIONS["long"][1] + (MAX_BEEPS - 1) * MIN_GAP  # every layout fits
COUNTERFACTUAL_STREAM = 7  # the rng stream (seed, index, 7) that draws a clip's counterfactual partner

VOCABULARY = caption_words("a then beep", *PITCHES, *DURATIONS, "rising", "falling")


@dataclass(frozen=True)
class Beep:
    """One tone: ``pitch`` / ``duration`` / ``glide`` name it; ``frequency`` (Hz, at its start), ``onset`` and
    ``seconds`` give it exactly."""

    pitch: str
    duration: str
    glide: str
    frequency: float
    onset: float
    seconds: float


@dataclass(frozen=True)
class ToneScene:
    beeps: tuple[Beep, ...]
    caption: str


def beep_phrase(duration: str, glide: str, pitch: str) -> str:
    """'a short rising high beep' (a steady beep names no glide)."""
    return " ".join(["a", duration, *([] if glide == "steady" else [glide]), pitch, "beep"])


def tone_caption(beeps: Sequence[Beep]) -> str:
    return " then ".join(beep_phrase(b.duration, b.glide, b.pitch) for b in beeps)


def check_clip_seconds(seconds: float, sample_rate: int) -> None:
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= MIN_SECONDS):
        raise OmniditError(f"tones clips must last at least {MIN_SECONDS:.2f} s (four long beeps), got {seconds}",
                           hint="e.g. data.seconds=2.0")
    if not (isinstance(sample_rate, int) and 2 * PITCHES["high"][1] * GLIDE < sample_rate <= 192_000):
        raise OmniditError(f"the sample rate must be a whole number of Hz above {2 * PITCHES['high'][1] * GLIDE:.0f} "
                           f"(the highest glide's Nyquist rate) and at most 192000, got {sample_rate}",
                           hint="e.g. 8000 or 16000")


def make_tone_scene(rng: np.random.Generator, seconds: float) -> ToneScene:
    """A random layout of 1-4 beeps that fits in ``seconds``."""
    count = int(rng.integers(1, MAX_BEEPS + 1))
    kinds = [(str(rng.choice(list(PITCHES))), str(rng.choice(list(DURATIONS))), str(rng.choice(GLIDES)))
             for _ in range(count)]
    lengths = [float(rng.uniform(*DURATIONS[d])) for _, d, _ in kinds]
    free = seconds - 2 * MARGIN - sum(lengths) - (count - 1) * MIN_GAP
    shares = rng.dirichlet(np.ones(count + 1)) * free  # the extra silence before, between and after the beeps
    beeps, at = [], MARGIN
    for i, ((pitch, duration, glide), length) in enumerate(zip(kinds, lengths)):
        at += float(shares[i]) + (MIN_GAP if i else 0.0)
        low, high = PITCHES[pitch]
        frequency = float(math.exp(rng.uniform(math.log(low), math.log(high))))
        beeps.append(Beep(pitch, duration, glide, frequency, at, length))
        at += length
    return ToneScene(tuple(beeps), tone_caption(beeps))


def counterfactual_tone_scene(scene: ToneScene, rng: np.random.Generator, seconds: float) -> ToneScene:
    """The partner of a clip with one fact of its caption changed, drawn from ``rng``: one beep dropped (clips
    of two or more), or one beep's pitch (a new frequency in another band), glide or length (a new length in
    the other range, where it still ends MIN_GAP before the next beep, or MARGIN before the clip's end) changed;
    every other beep stays as it was, at its onset. The caption is the partner's own."""
    beeps = list(scene.beeps)
    choices = [("count", i) for i in range(len(beeps)) if len(beeps) > 1]
    for i, b in enumerate(beeps):
        choices += [("pitch", i), ("glide", i)]
        room = (beeps[i + 1].onset - MIN_GAP if i + 1 < len(beeps) else seconds - MARGIN) - b.onset
        other = "long" if b.duration == "short" else "short"
        if DURATIONS[other][1] <= room:
            choices.append(("duration", i))
    fact, i = choices[int(rng.integers(len(choices)))]
    b = beeps[i]
    if fact == "count":
        del beeps[i]
    elif fact == "pitch":
        pitch = str(rng.choice([p for p in PITCHES if p != b.pitch]))
        low, high = PITCHES[pitch]
        frequency = float(math.exp(rng.uniform(math.log(low), math.log(high))))
        beeps[i] = Beep(pitch, b.duration, b.glide, frequency, b.onset, b.seconds)
    elif fact == "glide":
        glide = str(rng.choice([g for g in GLIDES if g != b.glide]))
        beeps[i] = Beep(b.pitch, b.duration, glide, b.frequency, b.onset, b.seconds)
    else:
        duration = "long" if b.duration == "short" else "short"
        beeps[i] = Beep(b.pitch, duration, b.glide, b.frequency, b.onset, float(rng.uniform(*DURATIONS[duration])))
    return ToneScene(tuple(beeps), tone_caption(beeps))


def render_beep(beep: Beep, sample_rate: int, out: np.ndarray, amplitude: float = AMPLITUDE) -> None:
    """Add ``beep`` into ``out`` (S,) float64 in place; a beep running past the end is cut there."""
    start, whole = int(round(beep.onset * sample_rate)), int(round(beep.seconds * sample_rate))
    n = min(whole, len(out) - start)
    if n <= 0:
        return
    t = np.arange(n) / sample_rate
    ratio = {"steady": 1.0, "rising": GLIDE, "falling": 1 / GLIDE}[beep.glide]
    if ratio == 1.0:
        phase = 2 * np.pi * beep.frequency * t
    else:  # f(t) = f0 * ratio ** (t / d); the phase is its integral
        rate = math.log(ratio) / beep.seconds
        phase = 2 * np.pi * beep.frequency * np.expm1(rate * t) / rate
    end = (whole - 1) / sample_rate  # the fade out is where the whole beep ends, even when it is cut
    fade = np.minimum(1.0, np.minimum(t, end - t) / FADE)
    out[start:start + n] += amplitude * fade * np.sin(phase)


def render_tones(scene: ToneScene, seconds: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The clip of ``scene``: (S,) float32 in [-1, 1], S = round(seconds * sample_rate)."""
    out = np.zeros(int(round(seconds * sample_rate)))
    for beep in scene.beeps:
        render_beep(beep, sample_rate, out)
    return out.astype(np.float32)


class ToneDataset(Dataset):
    """Infinite captioned beep clips: ``ds[i]`` -> {"audio": (1, S) float32 in [-1, 1], "caption": str,
    "label": -1}; clip i is drawn from its own generator seeded by (seed, i)."""

    num_samples = None
    num_classes = 0
    channels = 1
    streams = ("audio",)

    def __init__(self, seconds: float = 2.0, sample_rate: int = SAMPLE_RATE, seed: int = 0) -> None:
        check_clip_seconds(seconds, sample_rate)
        if int(seed) < 0:
            raise OmniditError(f"the data seed must be >= 0, got {seed}")
        self.seconds, self.sample_rate, self.seed = float(seconds), int(sample_rate), int(seed)
        self.samples = int(round(self.seconds * self.sample_rate))

    def scene(self, index: int) -> ToneScene:
        return make_tone_scene(np.random.default_rng([self.seed, int(index)]), self.seconds)

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        audio = torch.from_numpy(render_tones(scene, self.seconds, self.sample_rate))[None]
        return {"audio": audio, "caption": scene.caption, "label": -1}

    def counterfactual(self, index: int) -> dict:
        """The clip at ``index`` with one fact of its caption changed (``counterfactual_tone_scene``, drawn from
        (seed, index) alone); used by ``train.counterfactual_weight``: the loss then contrasts two captions that
        differ in one beep, on the same layout."""
        rng = np.random.default_rng([self.seed, int(index), COUNTERFACTUAL_STREAM])
        partner = counterfactual_tone_scene(self.scene(index), rng, self.seconds)
        audio = torch.from_numpy(render_tones(partner, self.seconds, self.sample_rate))[None]
        return {"audio": audio, "caption": partner.caption, "label": -1}
