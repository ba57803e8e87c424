"""Prompt suite for shape videos (``omnidit.data.shapes_video``), judged exactly by tracking the shapes
detector's objects through every frame (``tracker``).

Categories, each a seeded list of prompts written with the training captions' own templates:

- single_object       one object: present in every frame with the named colour and shape (so it never
                      vanishes or changes colour or shape), nothing else in any frame
- direction           as single_object, and its initial motion is in the named direction
- speed               as single_object, and its speed class (slow / fast) is the named one
- two_objects         two objects, both as in direction, nothing else
- novel_compositions  as direction, for a held-out (colour, shape) pair
- image_to_video      given the first frame of a reference clip: the clip's first frame holds the same
                      objects within POSITION_TOLERANCE of where they are, and the caption holds as in
                      direction (``judge_continuation``)

Every prompt outside novel_compositions uses in-distribution pairs only. A caption is turned into what
it claims by ``parse_caption``, so any caption in the training grammar can be judged (``judge_clip``).

Fréchet video distance (``frechet_distance_videos``), with the fixed random-feature network of
``frechet.py`` and no download: a clip's features are the mean over frames of the per-frame image
features, concatenated with the mean over consecutive frame pairs of the features of the temporal
difference (x[t + 1] - x[t]) / 2 (scaled into [-1, 1] like an image). The first half measures what the
frames look like, the second how things move; 2 * 256 = 512 features, so use a few hundred clips or more.
Comparable between runs of this library only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from omnidit.data.shapes import COLOURS, DEFAULT_HELD_OUT, SHAPES, SIZES, allowed_pairs
from omnidit.data.shapes_video import (
    DIRECTIONS,
    SPEED_ADJECTIVES,
    SPEED_WORDS,
    SPEEDS,
    ShapesVideoDataset,
    VideoScene,
    check_clip_size,
    place_objects,
    render_video,
    video_caption,
    video_tensor,
)
from omnidit.errors import OmniditError
from omnidit.evaluate.detector import Detection, detect_objects
from omnidit.evaluate.frechet import fit_gaussian, frechet_distance, image_features
from omnidit.evaluate.shapes_suite import _held_pairs
from omnidit.evaluate.tracker import (
    MISREAD_FRACTION,
    Track,
    clip_frames,
    detect_clip,
    initial_motion,
    link,
    max_step,
    speed_class,
)

if TYPE_CHECKING:
    from omnidit.evaluate.runner import EvalReport

CATEGORIES = ("single_object", "direction", "speed", "two_objects", "novel_compositions", "image_to_video")
FACTS = ("size", "direction", "speed")  # what a caption can claim beyond the objects themselves
# What each category judges besides presence and consistency (image_to_video also the first frame).
JUDGED: dict[str, tuple[str, ...]] = {"single_object": (), "direction": ("direction",), "speed": ("speed",),
                                      "two_objects": ("direction",), "novel_compositions": ("direction",),
                                      "image_to_video": ("direction",)}
# How often a prompt names the speed: always where it is judged, never where a model could fail the
# direction only for getting a speed it was told wrong; single_object mixes both wordings.
SPEED_P = {"speed": 1.0, "single_object": 0.5}
DEFAULT_PER_CATEGORY = 32
POSITION_TOLERANCE = 0.1  # unit (min(H, W)); image_to_video: start within this of the given frame's object
REFERENCE_CLIPS = 500  # reference clips for the Fréchet video distance (at least)

Pair = tuple[str, str]  # (colour, shape)


@dataclass(frozen=True)
class MotionSpec:
    """What a caption says about one object; ``speed`` or ``size`` None when it does not name them."""

    colour: str
    shape: str
    direction: str
    speed: str | None = None
    size: str | None = None

    def describe(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class VideoPrompt:
    """One suite prompt and what a clip for it must show. ``seed`` fixes the reference clip
    (``reference_scene``): for image_to_video its first frame is the frame given to the model."""

    category: str
    prompt: str
    objects: tuple[MotionSpec, ...]
    seed: int


# ---------------------------------------------------------------------------------------------
# Captions -> specs


_SPEED_OF = {word: speed for speed, words in SPEED_WORDS.items() for word in words}
_VERTICAL = {"up": "up", "upwards": "up", "down": "down", "downwards": "down"}
_HORIZONTAL = {"right": "right", "left": "left"}
_ADJECTIVES = (*SIZES, *SPEED_ADJECTIVES.values())
_OBJECT = re.compile(rf"\b(?:a|an)\s+((?:(?:{'|'.join(_ADJECTIVES)})\s+)*)({'|'.join(COLOURS)})\s+"
                     rf"({'|'.join(SHAPES)})\b")
_HINT = 'write captions like "a red circle moving to the right" or "a blue square moves up quickly"'


def parse_caption(caption: str) -> tuple[MotionSpec, ...]:
    """What a caption in the training grammar claims, one MotionSpec per object named ("a [size] [speed]
    colour shape" and the words up to the next object: its direction and speed)."""
    text = caption.lower()
    matches = list(_OBJECT.finditer(text))
    if not matches:
        raise OmniditError(f"no object named in the caption {caption!r}", hint=_HINT)
    specs = []
    for m, after in zip(matches, [*matches[1:], None]):
        words = re.findall(r"[a-z]+", m.group(1) + " " + text[m.end():after.start() if after else len(text)])
        vertical = {_VERTICAL[w] for w in words if w in _VERTICAL}
        horizontal = {_HORIZONTAL[w] for w in words if w in _HORIZONTAL}
        speeds = {_SPEED_OF[w] for w in words if w in _SPEED_OF}
        sizes = {w for w in m.group(1).split() if w in SIZES}
        name = f"{m.group(2)} {m.group(3)}"
        if len(vertical) > 1 or len(horizontal) > 1 or not vertical | horizontal:
            raise OmniditError(f"the caption {caption!r} gives the {name} no single direction", hint=_HINT)
        if len(speeds) > 1:
            raise OmniditError(f"the caption {caption!r} gives the {name} two speeds", hint=_HINT)
        (v,), (h,) = vertical or {""}, horizontal or {""}
        direction = f"{v} and to the {h}" if v and h else v or h
        specs.append(MotionSpec(m.group(2), m.group(3), direction, next(iter(speeds), None),
                                next(iter(sizes), None)))
    if len({(s.colour, s.shape) for s in specs}) < len(specs):
        raise OmniditError(f"the caption {caption!r} names one colour and shape twice",
                           hint="the judge tells objects apart by colour and shape")
    return tuple(specs)


def scene_specs(scene: VideoScene) -> tuple[MotionSpec, ...]:
    """The ground truth of a clip, every fact filled in."""
    return tuple(MotionSpec(o.colour, o.shape, o.direction, o.speed, o.size) for o in scene.objects)


def _specs(caption: str | Sequence[MotionSpec]) -> tuple[MotionSpec, ...]:
    return parse_caption(caption) if isinstance(caption, str) else tuple(caption)


# ---------------------------------------------------------------------------------------------
# Judging


def _frames_text(frames: Iterable[int]) -> str:
    """[3, 4, 5, 9] -> "frames 3-5, 9"."""
    runs: list[list[int]] = []
    for f in sorted(frames):
        if runs and f == runs[-1][-1] + 1:
            runs[-1].append(f)
        else:
            runs.append([f])
    text = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)
    return ("frames " if len(runs) > 1 or len(runs[0]) > 1 else "frame ") + text


def _follow(spec: MotionSpec, tracks: list[Track], n_frames: int) -> tuple[Track | None, str]:
    """The one track that follows ``spec``'s object through every frame -> (track, ""), else (None, why)."""
    mine = [t for t in tracks if (t.colour, t.shape) == (spec.colour, spec.shape)]
    if not mine:
        others = [t.describe() for t in tracks if t.colour == spec.colour]
        return None, f"no {spec.describe()} in any frame" + (f" ({', '.join(others)} instead)" if others else "")
    seen = [f for t in mine for f in t.frames]
    if len(seen) > len(set(seen)):
        twice = sorted({f for f in seen if seen.count(f) > 1})
        return None, f"two of the {spec.describe()} in {_frames_text(twice)}"
    missing = sorted(set(range(n_frames)) - set(seen))
    if missing:
        return None, f"{spec.describe()} missing in {_frames_text(missing)}"
    if len(mine) > 1:
        return None, f"{spec.describe()} jumps at frame {mine[1].frames[0]}"
    misread = mine[0].misread
    if len(misread) > int(n_frames * MISREAD_FRACTION):
        shapes = sorted({d.shape for d in mine[0].detections} - {spec.shape})
        return None, f"the {spec.describe()} turns {' / '.join(shapes)} in {_frames_text(misread)}"
    return mine[0], ""


def _judge_tracks(specs: Sequence[MotionSpec], tracks: list[Track], n_frames: int, fps: float, unit: int,
                  facts: Collection[str]) -> tuple[bool, str]:
    followed = []
    for spec in specs:
        track, why = _follow(spec, tracks, n_frames)
        if track is None:
            return False, why
        followed.append(track)
    extra = [t for t in tracks if not any(t is f for f in followed)]
    if extra:
        return False, "extra object: " + ", ".join(f"{t.describe()} ({t.span()})" for t in extra)
    for spec, track in zip(specs, followed):
        if "size" in facts and spec.size is not None:
            sizes = [d.size for d in track.detections]
            size = max(SIZES, key=sizes.count)
            if size != spec.size:
                return False, f"the {spec.describe()} is {size}, not {spec.size}"
        direction, speed = initial_motion(track.centres, fps, unit)
        if "direction" in facts:
            if direction is None:
                return False, f"the {spec.describe()} does not move"
            if direction != spec.direction:
                return False, f"the {spec.describe()} first moves {direction}, not {spec.direction}"
        if "speed" in facts and spec.speed is not None and speed_class(speed) != spec.speed:
            return False, f"the {spec.describe()} moves {speed_class(speed)} ({speed:.2f} units/s), not {spec.speed}"
    return True, "ok"


def judge_clip(clip: np.ndarray | Tensor | Sequence, caption: str | Sequence[MotionSpec], fps: float = 8.0,
               facts: Collection[str] = FACTS) -> tuple[bool, str]:
    """Judge one clip against a caption (or its specs) -> (passed, reason).

    ``clip``: uint8 (T, H, W, 3), or float tensor (3, T, H, W) in [-1, 1]. Always judged: every named
    object is in every frame with its colour and shape, nothing else is in any frame. Then the ``facts``
    the caption names: size, the initial direction, the speed class at ``fps``."""
    passed, reason, _, _ = _judge(clip, _specs(caption), fps, facts)
    return passed, reason


def _judge(clip, specs: Sequence[MotionSpec], fps: float, facts: Collection[str]) -> tuple[bool, str, list, int]:
    """judge_clip, also returning the tracks and min(H, W)."""
    if not (fps > 0):
        raise OmniditError(f"fps must be > 0, got {fps}")
    detections, (w, h) = detect_clip(clip)
    unit = min(w, h)
    tracks = link(detections, max_step(fps, unit))
    return (*_judge_tracks(specs, tracks, len(detections), fps, unit, facts), tracks, unit)


def _same_start(given: list[Detection], tracks: list[Track], unit: int) -> tuple[bool, str]:
    """Whether a clip starts with the objects of the given frame (colour, the track's shape), each within
    POSITION_TOLERANCE of where it is given."""
    names = sorted(f"{d.colour} {d.shape}" for d in given)
    found = sorted(t.describe() for t in tracks if t.frames[0] == 0)
    if names != found:
        return False, (f"the first frame holds {', '.join(found) or 'nothing'}, the given frame "
                       f"{', '.join(names) or 'nothing'}")
    for d in given:
        twin = next(t for t in tracks if t.frames[0] == 0 and (t.colour, t.shape) == (d.colour, d.shape))
        off = float(np.hypot(*np.subtract(twin.centres[0], d.centre_px)))
        if off > POSITION_TOLERANCE * unit:
            return False, f"the {d.colour} {d.shape} starts {off:.1f} px from where the given frame has it"
    return True, ""


def judge_continuation(first_frame: np.ndarray | Tensor, clip: np.ndarray | Tensor | Sequence,
                       caption: str | Sequence[MotionSpec], fps: float = 8.0,
                       facts: Collection[str] = ("direction",)) -> tuple[bool, str]:
    """Image-to-video: the clip starts from ``first_frame`` (its first frame holds the same colours and
    shapes, each within POSITION_TOLERANCE of where they are given) and then does what the caption says,
    judged as ``judge_clip`` with ``facts``."""
    passed, reason, tracks, unit = _judge(clip, _specs(caption), fps, facts)
    if not passed:
        return False, reason
    ok, why = _same_start(detect_objects(first_frame), tracks, unit)
    return (True, "ok") if ok else (False, why)


# ---------------------------------------------------------------------------------------------
# Prompts


def _prompt(category: str, rng: np.random.Generator, specs: tuple[MotionSpec, ...], speed_p: float) -> VideoPrompt:
    """A prompt worded like a training caption; its objects are what the caption says (a speed only
    where it names one; sizes never), read back by parse_caption."""
    caption = video_caption(rng, specs, speed_p=speed_p, size_p=0.0)
    return VideoPrompt(category, caption, parse_caption(caption), int(rng.integers(2**31)))


def _category(category: str, rng: np.random.Generator, allowed: list[Pair], held: list[Pair],
              n: int) -> list[VideoPrompt]:
    """``n`` prompts of ``category`` (fewer when it has fewer distinct ones): directions and speeds
    cycle, so any prefix is balanced."""
    directions, speeds = list(DIRECTIONS), list(SPEEDS)
    order = [directions[i] for i in rng.permutation(len(directions))]
    pool = held if category == "novel_compositions" else allowed
    out: list[VideoPrompt] = []
    seen: set[str] = set()
    for i in range(50 * n):
        if len(out) == n or not pool:
            break
        direction, speed = order[i % len(order)], speeds[(i + i // len(order)) % 2]  # both speeds per direction
        pairs = [pool[rng.integers(len(pool))]]
        two = category == "two_objects" or category == "image_to_video" and i % 2 == 1
        if two:
            other = pool[rng.integers(len(pool))]
            if other == pairs[0]:
                continue
            pairs.append(other)
        motions = [(direction, speed)] + [(order[rng.integers(len(order))], speeds[rng.integers(2)])] * two
        specs = tuple(MotionSpec(c, s, d, v) for (c, s), (d, v) in zip(pairs, motions))
        prompt = _prompt(category, rng, specs, SPEED_P.get(category, 0.0))
        if prompt.prompt not in seen:
            seen.add(prompt.prompt)
            out.append(prompt)
    return out


def suite_prompts(seed: int = 0, per_category: int | None = None,
                  held_out: Iterable[str] | Iterable[Pair] | str = DEFAULT_HELD_OUT) -> list[VideoPrompt]:
    """The suite: up to ``per_category`` (default DEFAULT_PER_CATEGORY) prompts per category, in CATEGORIES
    order. Deterministic in ``seed``; a smaller ``per_category`` gives a prefix of each category's list.
    novel_compositions is empty when nothing is held out."""
    if per_category is not None and int(per_category) < 1:
        raise OmniditError(f"per_category must be >= 1, got {per_category}")
    n = DEFAULT_PER_CATEGORY if per_category is None else int(per_category)
    held = _held_pairs(held_out)
    allowed = allowed_pairs(held)
    prompts = []
    for k, category in enumerate(CATEGORIES):
        rng = np.random.default_rng([int(seed), k])  # one stream per category: lists don't shift together
        prompts += _category(category, rng, allowed, sorted(held), n)
    return prompts


# ---------------------------------------------------------------------------------------------
# Reference clips and judging suite prompts


def reference_scene(prompt: VideoPrompt, width: int = 32, height: int = 32, frames: int = 16,
                    fps: float = 8.0) -> VideoScene:
    """A ground-truth clip for ``prompt``, laid out like training clips from ``prompt.seed``: the suite's
    upper bound, a test oracle, and for image_to_video the source of the given first frame. Speeds and
    sizes the prompt does not name are drawn (a pair with a large object only where it fits)."""
    check_clip_size(width, height, frames, fps)
    rng = np.random.default_rng(prompt.seed)
    speeds = [s.speed or list(SPEEDS)[rng.integers(len(SPEEDS))] for s in prompt.objects]
    sizes = [s.size or SIZES[rng.integers(len(SIZES))] for s in prompt.objects]
    if sizes == ["large", "large"]:
        sizes[rng.integers(2)] = "small"  # at most one large
    for sizes_now in (sizes, ["small"] * len(sizes)):
        requests = [(s.colour, s.shape, z, s.direction, v) for s, z, v in zip(prompt.objects, sizes_now, speeds)]
        objects = place_objects(rng, requests, width, height, frames, fps, tries=200)
        if objects is not None:
            kind = "single" if len(objects) == 1 else "pair"
            return VideoScene(objects, prompt.prompt, kind)
    raise OmniditError(f"could not lay out {prompt.prompt!r} at {width}x{height}", hint="use a larger canvas")


def condition_frame(prompt: VideoPrompt, width: int = 32, height: int = 32, frames: int = 16,
                    fps: float = 8.0) -> np.ndarray:
    """The frame an image_to_video prompt gives the model: the first frame of its reference clip, uint8
    (H, W, 3). The layout depends on the whole clip geometry: pass the size, frames and fps of the clips."""
    return render_video(reference_scene(prompt, width, height, frames, fps), 1, width, height, fps)[0]


def judge_prompt(prompt: VideoPrompt, clip: np.ndarray | Tensor, fps: float = 8.0) -> tuple[bool, str]:
    """Judge a clip made for a suite prompt, as its category says -> (passed, reason)."""
    facts = JUDGED[prompt.category]
    if prompt.category != "image_to_video":
        return judge_clip(clip, prompt.objects, fps, facts)
    frames = clip_frames(clip)
    h, w = frames[0].shape[:2]
    return judge_continuation(condition_frame(prompt, w, h, len(frames), fps), frames, prompt.objects, fps, facts)


def clip_strip(clip: np.ndarray | Tensor) -> Tensor:
    """The first, middle and last frames side by side with 1-px grey seams, enlarged (nearest) to at
    least 64 px high -> (3, H', W') in [-1, 1]: a clip's picture in the report grid."""
    frames = clip_frames(clip)
    picks = [frames[0], frames[len(frames) // 2], frames[-1]]
    h = picks[0].shape[0]
    seam = np.full((h, 1, 3), 170, dtype=np.uint8)  # grey: the frames' backgrounds are white
    strip = np.concatenate([picks[0], seam, picks[1], seam, picks[2]], axis=1)  # (H, 3W + 2, 3)
    scale = max(1, 64 // h)
    strip = strip.repeat(scale, axis=0).repeat(scale, axis=1)
    return video_tensor(strip[None])[:, 0]  # (3, H', W')


def evaluate_clips(prompts: Sequence[VideoPrompt], clips: Sequence[np.ndarray | Tensor], fps: float = 8.0,
                   seeds: Sequence[int] | None = None, frechet: bool = False) -> EvalReport:
    """Judge one clip per entry of ``prompts`` -> a runner EvalReport (suite "video"): ``to_json()`` gives
    {"overall": mean over categories, "categories": {name: pass rate}, "failures": [{category, prompt,
    reason, seed}], ...}, ``grid()`` the first / middle / last frames of each clip framed green or red.
    ``seeds``: each clip's noise seed, for the failures; ``frechet``: add the Fréchet video distance to
    REFERENCE_CLIPS training clips (or as many as judged)."""
    from omnidit.evaluate.runner import EvalReport, Judged, _aggregate

    if len(prompts) != len(clips):
        raise OmniditError(f"{len(prompts)} prompts but {len(clips)} clips", hint="pass one clip per prompt")
    seeds = list(seeds) if seeds is not None else [None] * len(prompts)
    judged = []
    for prompt, clip, seed in zip(prompts, clips, seeds):
        passed, reason = judge_prompt(prompt, clip, fps)
        judged.append(Judged(prompt.category, prompt.prompt, clip_strip(clip), passed, reason, seed=seed))
    overall, scores = _aggregate("video", judged, CATEGORIES)
    fd = None
    if frechet:
        batch = torch.stack([c if isinstance(c, Tensor) else video_tensor(np.asarray(c)) for c in clips])
        fd = frechet_distance(*fit_gaussian(video_features(batch)), *video_reference_statistics(
            max(REFERENCE_CLIPS, len(clips)), batch.shape[-1], batch.shape[-2], batch.shape[2], fps))
    return EvalReport("video", overall, scores, len(judged), fd, settings={"fps": fps}, judged=judged)


# A video model's generate: (prompts, noise seeds, first frames (B, 3, H, W) in [-1, 1] or None) -> clips
# (B, 3, T, H, W) in [-1, 1].
Generate = Callable[[list[str], list[int], "Tensor | None"], Tensor]


def evaluate_video_model(generate: Generate, seed: int = 0, limit: int | None = None, n_per_prompt: int = 1,
                         width: int = 32, height: int = 32, frames: int = 16, fps: float = 8.0,
                         held_out: Iterable[str] | str = DEFAULT_HELD_OUT, batch_size: int = 16,
                         frechet: bool = True) -> EvalReport:
    """Run the suite on a model: ``n_per_prompt`` clips per prompt from ``generate`` (image_to_video
    batches get their first frames, the others None; batches never mix the two), then
    ``evaluate_clips``. Clip i of a run with ``seed`` uses the runner's noise seed for image i."""
    from omnidit.evaluate.runner import _seeds

    prompts = [p for p in suite_prompts(0, limit, held_out) for _ in range(int(n_per_prompt))]
    seeds = _seeds(seed, len(prompts))
    clips: list[Tensor] = []
    i = 0
    while i < len(prompts):
        image = prompts[i].category == "image_to_video"
        j = i
        while j < len(prompts) and j - i < batch_size and (prompts[j].category == "image_to_video") == image:
            j += 1
        firsts = None
        if image:
            firsts = torch.stack([video_tensor(condition_frame(p, width, height, frames, fps)[None])[:, 0]
                                  for p in prompts[i:j]])  # (B, 3, H, W)
        out = generate([p.prompt for p in prompts[i:j]], seeds[i:j], firsts)
        if tuple(out.shape[1:]) != (3, frames, height, width):
            raise OmniditError(f"generate returned clips of shape {tuple(out.shape)}, expected "
                               f"(B, 3, {frames}, {height}, {width})")
        clips += list(out)
        i = j
    report = evaluate_clips(prompts, clips, fps, seeds, frechet)
    report.settings.update({"seed": seed, "limit": limit, "n_per_prompt": n_per_prompt, "frames": frames})
    return report


# ---------------------------------------------------------------------------------------------
# Fréchet video distance

_REFERENCE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def video_features(clips: Tensor, batch_size: int = 256) -> Tensor:
    """(B, 3, T, H, W) in [-1, 1], T >= 2 -> (B, 2 * NUM_FEATURES) float64 (module docstring)."""
    if not isinstance(clips, Tensor) or clips.ndim != 5 or clips.shape[1] != 3 or clips.shape[2] < 2:
        shape = tuple(clips.shape) if isinstance(clips, Tensor) else type(clips).__name__
        raise OmniditError(f"video features expect clips of shape (B, 3, T >= 2, H, W), got {shape}")
    b, _, t, h, w = clips.shape
    x = clips.detach().to("cpu", torch.float64).clamp(-1, 1)
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, 3, h, w)
    motion = ((x[:, :, 1:] - x[:, :, :-1]) / 2).permute(0, 2, 1, 3, 4).reshape(b * (t - 1), 3, h, w)
    look = image_features(frames, batch_size).reshape(b, t, -1).mean(1)
    move = image_features(motion, batch_size).reshape(b, t - 1, -1).mean(1)
    return torch.cat([look, move], dim=1)


def frechet_distance_videos(generated: Tensor, reference: Tensor) -> float:
    """Fréchet distance between two clip batches (B, 3, T, H, W) in [-1, 1]."""
    return frechet_distance(*fit_gaussian(video_features(generated)), *fit_gaussian(video_features(reference)))


def video_reference_statistics(n: int, width: int, height: int, frames: int, fps: float,
                               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the features of the first ``n`` clips of ``ShapesVideoDataset(width, height, frames,
    fps, seed, held_out=())`` (held-out pairs included). Cached per process; callers get copies."""
    if int(n) < 2:
        raise OmniditError(f"need at least 2 reference clips, got n={n}")
    key = (int(n), int(width), int(height), int(frames), float(fps), int(seed))
    if key not in _REFERENCE:
        ds = ShapesVideoDataset(width, height, frames, fps, seed=seed, held_out=())
        _REFERENCE[key] = fit_gaussian(video_features(torch.stack([ds[i]["video"] for i in range(int(n))])))
    mu, sigma = _REFERENCE[key]
    return mu.copy(), sigma.copy()
