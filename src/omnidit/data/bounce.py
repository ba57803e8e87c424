"""Joint audio-video clips: the ``shapes_video`` objects move and bounce, and every bounce sounds a beep whose
pitch belongs to the object's colour, starting at the exact instant of the bounce.

Pitches (``COLOUR_PITCHES``) climb from C4 in steps of three semitones, one per colour, so that no two are
closer than 19% in frequency: red C4 262 Hz, orange D#4 311, yellow F#4 370, green A4 440, cyan C5 523, blue
D#5 622, purple F#5 740, pink A5 880. A bounce is a wall contact or the two objects meeting (then both
bounce, so both beep). Beeps last BEEP_SECONDS with 5 ms fades; two at once simply add. Captions are the
``shapes_video`` captions, so a joint model reads the same words as the video model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from omnidit.data.shapes import COLOURS
from omnidit.data.shapes_video import (
    ShapesVideoDataset,
    VideoScene,
    _simulate,
    make_video_scene,
    render_video,
    video_tensor,
)
from omnidit.data.tones import SAMPLE_RATE, Beep, render_beep
from omnidit.errors import OmniditError

COLOUR_PITCHES: dict[str, float] = {colour: 261.63 * 2 ** (3 * i / 12) for i, colour in enumerate(COLOURS)}
BEEP_SECONDS = 0.08
MIN_BOUNCE_GAP = 0.2  # seconds: an object that bounces again sooner (a corner) sounds one beep
BEEP_AMPLITUDE = 0.4  # two simultaneous beeps stay within [-1, 1]


@dataclass(frozen=True)
class Bounce:
    """One bounce: ``time`` in seconds, the index of the object in its scene, and that object's colour."""

    time: float
    object: int
    colour: str


def bounces(scene: VideoScene, width: int, height: int, seconds: float) -> list[Bounce]:
    """Every sounded bounce before ``seconds``, in time order: the events of the exact simulation at which an
    object's velocity changes, except one within MIN_BOUNCE_GAP of that object's previous beep (a corner)."""
    times, _, velocities = _simulate(scene, width, height, seconds)
    found: list[Bounce] = []
    last = [-np.inf] * len(scene.objects)
    for e in range(1, len(times)):
        for k, obj in enumerate(scene.objects):
            if not np.array_equal(velocities[e, k], velocities[e - 1, k]) and times[e] - last[k] >= MIN_BOUNCE_GAP:
                found.append(Bounce(float(times[e]), k, obj.colour))
                last[k] = float(times[e])
    return found


def render_bounce_audio(events: list[Bounce], seconds: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The soundtrack of ``events``: (S,) float32, S = round(seconds * sample_rate); steady ``tones`` beeps
    (``render_beep``), cut at the end of the clip."""
    out = np.zeros(int(round(seconds * sample_rate)))
    for event in events:
        beep = Beep("", "", "steady", COLOUR_PITCHES[event.colour], event.time, BEEP_SECONDS)
        render_beep(beep, sample_rate, out, BEEP_AMPLITUDE)
    return out.astype(np.float32)


class BounceDataset(Dataset):
    """Infinite captioned clips with sound: ``ds[i]`` -> {"video": (3, T, H, W) in [-1, 1], "audio": (1, S) in
    [-1, 1], "caption": str, "label": -1}: ``shapes_video`` clips whose objects have different colours
    (``scene``), with their bounces as the soundtrack. S = T / fps * sample_rate must be a whole number."""

    channels = 3
    num_classes = 0
    num_samples = None
    streams = ("img", "audio")

    def __init__(self, width: int = 32, height: int = 32, frames: int = 16, fps: float = 8.0,
                 sample_rate: int = SAMPLE_RATE, seed: int = 0, **video_options) -> None:
        self.video = ShapesVideoDataset(width, height, frames, fps, seed, **video_options)
        samples = frames / fps * sample_rate
        if not float(samples).is_integer() or not 2 * max(COLOUR_PITCHES.values()) < sample_rate <= 192_000:
            raise OmniditError(f"{frames} frames at {fps:g} fps last {frames / fps:g} s, which is not a whole number "
                               f"of samples at {sample_rate} Hz (or the rate is outside (1760, 192000])",
                               hint="e.g. 16 frames at 8 fps with 8000 Hz audio")
        self.sample_rate, self.samples = int(sample_rate), int(samples)
        self.width, self.height, self.frames, self.fps = width, height, frames, fps

    @property
    def seconds(self) -> float:
        return self.frames / self.fps

    def scene(self, index: int) -> VideoScene:
        """The ``shapes_video`` scene drawn from (seed, index, attempt), for the first attempt whose objects
        have different colours (each colour is one pitch, so two objects of one colour would sound alike)."""
        if index < 0:
            raise IndexError(f"bounce index must be >= 0, got {index}")
        v = self.video
        for attempt in range(1000):
            rng = np.random.default_rng([v.seed, int(index), attempt])
            scene = make_video_scene(rng, v.width, v.height, v.frames, v.fps, v.allowed, v.kinds)
            if len({o.colour for o in scene.objects}) == len(scene.objects):
                return scene
        raise RuntimeError("no scene with distinct colours in 1000 draws")  # never: most draws qualify

    def bounces(self, index: int) -> list[Bounce]:
        return bounces(self.scene(index), self.width, self.height, self.seconds)

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        video = render_video(scene, self.frames, self.width, self.height, self.fps)
        events = bounces(scene, self.width, self.height, self.seconds)
        audio = render_bounce_audio(events, self.seconds, self.sample_rate)
        return {"video": video_tensor(video), "audio": torch.from_numpy(audio)[None], "caption": scene.caption,
                "label": -1}
