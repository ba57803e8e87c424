"""Procedural captioned shape videos: one or two shapes objects moving and bouncing off the walls.

A clip is a ``VideoScene``: each object has a start centre and a velocity, moves in a straight line and
bounces: at a wall the velocity component that hits it flips, and when the two objects of a pair come
within GAP of each other each flips its component along the axis they met on, as at a wall (so every
object keeps its speed, and two objects never overlap). Bounce times are computed exactly
(``_simulate``), so a scene is continuous motion: the same scene at 8 fps and at 16 fps is the same
motion sampled at different instants. The caption names each object, the direction of its INITIAL
motion (before any bounce) and, in most captions, its speed ("a red circle moving to the right", "a
blue square moves up quickly while a green triangle moves down", "a small yellow diamond drifting to
the left").

Units. Lengths are fractions of min(H, W) (the "unit", as object sizes in ``shapes``); speeds are units
per SECOND, whatever the fps:

- slow: 0.5-0.6 unit/s. At 32x32 and 8 fps that is 2.0-2.4 px per frame.
- fast: 1.2-1.4 unit/s. At 32x32 and 8 fps that is 4.8-5.6 px per frame.

The classes are a factor 2 apart; a tracker separates them at SPEED_THRESHOLD = sqrt(0.6 * 1.2) ~ 0.85
unit/s (3.4 px per frame at 32x32, 8 fps), about 1 px per frame from either class.

Layout rules that make the clips judgeable exactly (``omnidit.evaluate.video_suite``):

- Every object moves straight (no wall, no other object) for DIRECTION_WINDOW + one frame of motion +
  FREE_MARGIN, so the judge can read the initial direction from the first frame that is DIRECTION_WINDOW
  away from the start. (Capped at the room the canvas has: that only binds for fast motion below ~5 fps.)
- At most one object of a pair is large. At 32 px a large object sweeps most of the canvas in that
  first stretch, so a small one beside it has room to move straight only for some pairs of directions:
  a pair with a large object is tried a few times (LARGE_TRIES), then both become small. Directions and
  speeds stay uniform.
- Objects keep BORDER from the walls (they bounce there) and GAP from each other, as in ``shapes``.
  Failed layouts are redrawn from the same rng, so scenes stay deterministic in (seed, index).

Renders are crisp, drawn with the ``shapes`` renderer's own mask, so the exact shapes detector reads
every frame.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from omnidit.data.shapes import (
    BACKGROUND,
    BORDER,
    COLOURS,
    DEFAULT_HELD_OUT,
    GAP,
    SHAPES,
    SIZE_MENTION_P,
    SIZE_RANGE,
    SIZES,
    Scene,
    ShapeObject,
    _article,
    _shape_mask,
    allowed_pairs,
    caption_words,
    parse_held_out,
)
from omnidit.errors import OmniditError

# Unit vectors (x, y) in pixels, y grows down; diagonals are normalised so speed is the same in every direction.
_D = 1 / math.sqrt(2)
DIRECTIONS: dict[str, tuple[float, float]] = {
    "right": (1.0, 0.0),
    "left": (-1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up and to the right": (_D, -_D),
    "up and to the left": (-_D, -_D),
    "down and to the right": (_D, _D),
    "down and to the left": (-_D, _D),
}
# Two wordings per direction: after "moving" ("moving to the right") and after "moves" ("moves right").
DIRECTION_PHRASES: dict[str, tuple[str, str]] = {
    "right": ("to the right", "right"),
    "left": ("to the left", "left"),
    "up": ("upwards", "up"),
    "down": ("downwards", "down"),
    "up and to the right": ("up and to the right", "up and right"),
    "up and to the left": ("up and to the left", "up and left"),
    "down and to the right": ("down and to the right", "down and right"),
    "down and to the left": ("down and to the left", "down and left"),
}
SPEEDS: dict[str, tuple[float, float]] = {"slow": (0.5, 0.6), "fast": (1.2, 1.4)}  # unit / s, uniform
SPEED_THRESHOLD = math.sqrt(SPEEDS["slow"][1] * SPEEDS["fast"][0])  # ~0.85 unit / s
VIDEO_KINDS: dict[str, float] = {"single": 0.5, "pair": 0.5}
DIRECTION_WINDOW = 0.15  # unit; the judge reads the initial direction over this much travel
FREE_MARGIN = 0.02  # unit; extra free travel before the first bounce, for rasterisation jitter
COLLISION_RATE = 64  # overlap-check samples per second: 1.4 unit/s / 64 < GAP / 2
LARGE_TRIES = 4  # layouts tried for a pair with a large object before both become small
CANDIDATES = 64  # second-object starts drawn at once when placing a pair
COUNTERFACTUAL_STREAM = 7  # the rng stream (seed, index, 7) that draws a clip's counterfactual direction
# Which directions a clip's counterfactual partner may take (data.counterfactual_directions): any other one, or
# only those that change the vertical part of the motion (up against down, the left-right part kept), or only
# the horizontal part, or either of the two but never both ("either": the union of the two).
PARTNER_DIRECTIONS = ("any", "vertical", "horizontal", "either")
MAX_EVENTS = 10_000  # bounces per simulated clip; a placed scene has a few dozen at most
MIN_CANVAS = 16  # the exact detector needs min(H, W) >= 16
SPEED_MENTION_P = 0.75  # captions name an object's speed this often (explicitly or by the verb)

# Caption vocabulary: (-ing form, third person form). The judge's caption parser reads the same words.
NEUTRAL_VERBS = (("moving", "moves"), ("heading", "heads"), ("travelling", "travels"))
SPEED_VERBS = {"slow": (("drifting", "drifts"), ("creeping", "creeps")),
               "fast": (("racing", "races"), ("darting", "darts"), ("zooming", "zooms"))}
SPEED_ADVERBS = {"slow": ("slowly",), "fast": ("quickly", "fast")}
SPEED_ADJECTIVES = {"slow": "slow", "fast": "fast"}
# Every word that names a speed, for parsing captions back.
SPEED_WORDS = {speed: frozenset({*SPEED_ADVERBS[speed], SPEED_ADJECTIVES[speed],
                                 *(w for pair in SPEED_VERBS[speed] for w in pair)}) for speed in SPEEDS}


@dataclass(frozen=True)
class VideoObject:
    """One moving shape. ``side`` is a fraction of min(H, W); ``start`` the centre at t = 0 normalised
    to the canvas, (x / W, y / H); ``velocity`` (vx, vy) in min(H, W) per second before any bounce,
    y grows down; ``direction`` (a DIRECTIONS key) and ``speed`` ("slow" | "fast") name it."""

    shape: str
    colour: str
    size: str
    side: float
    start: tuple[float, float]
    velocity: tuple[float, float]
    direction: str
    speed: str


@dataclass(frozen=True)
class VideoScene:
    """A captioned clip: kind "single" (one object) or "pair" (two objects of different
    (colour, shape) pairs, at most one large)."""

    objects: tuple[VideoObject, ...]
    caption: str
    kind: str


def check_clip_size(width: int, height: int, frames: int, fps: float) -> None:
    """Raise a one-line error unless the clip geometry is usable."""
    if int(width) < MIN_CANVAS or int(height) < MIN_CANVAS:
        raise OmniditError(f"shapes videos must be at least {MIN_CANVAS}x{MIN_CANVAS}, got {width}x{height}",
                           hint="use width=32 height=32 or larger")
    if int(frames) < 2:
        raise OmniditError(f"a clip needs at least 2 frames, got {frames}", hint="use frames=16")
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise OmniditError(f"fps must be a finite number > 0, got {fps!r}", hint="use fps=8")


def check_video_kinds(kinds: Mapping[str, float], name: str = "video kinds") -> None:
    """Raise a one-line error unless ``kinds`` weights known video kinds, with a positive sum."""
    hint = f'weights over {", ".join(VIDEO_KINDS)}, e.g. {{"single": 1, "pair": 1}}'
    bad = [k for k in kinds if k not in VIDEO_KINDS]
    if bad:
        raise OmniditError(f"{name} has unknown kind {bad[0]!r}", hint=hint)
    if any(w < 0 for w in kinds.values()) or not sum(kinds.values()) > 0:
        raise OmniditError(f"{name} needs non-negative weights with a positive sum, got {dict(kinds)}", hint=hint)


# ---------------------------------------------------------------------------------------------
# Motion


def _bounds(side: float, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(lowest, highest) centre (x, y) in pixels for an object of ``side`` (fraction of min(H, W))."""
    unit = min(width, height)
    margin = BORDER * unit + side * unit / 2
    return np.array([margin, margin]), np.array([width - margin, height - margin])


def _simulate(scene: VideoScene, width: int, height: int, until: float) -> tuple[np.ndarray, ...]:
    """Event-driven motion up to ``until`` seconds -> (event times (E,), centres (E, N, 2) px, velocities
    (E, N, 2) px/s): from event e on, the objects move in straight lines until event e + 1.

    An event is a wall contact (that object's velocity component along the wall's axis flips) or the two
    objects' boxes coming within GAP of each other (each flips its component along the axis they met on,
    as at a wall, so every object keeps its speed). Event times are exact, so the motion does not depend
    on the frame rate it is sampled at."""
    unit = min(width, height)
    p = np.array([[o.start[0] * width, o.start[1] * height] for o in scene.objects])  # (N, 2)
    v = np.array([o.velocity for o in scene.objects], dtype=np.float64) * unit  # (N, 2)
    lo, hi = (np.array(b) for b in zip(*(_bounds(o.side, width, height) for o in scene.objects)))  # (N, 2)
    reach = GAP * unit + sum(o.side for o in scene.objects) * unit / 2  # centre distance at which a pair meets
    t, log = 0.0, [(0.0, p, v)]
    for _ in range(MAX_EVENTS):
        with np.errstate(divide="ignore", invalid="ignore"):
            wall = np.where(v > 0, (hi - p) / v, np.where(v < 0, (lo - p) / v, np.inf))  # (N, 2) s until contact
        wall = np.maximum(wall, 0.0)
        meet = np.inf
        if len(p) == 2:
            enter, leave = _within_reach(p[1] - p[0], v[1] - v[0], reach)  # (2,) each
            # Only a future meeting with real overlap: just after a bounce the pair touches and moves apart.
            if enter.max() >= -1e-9 and leave.min() - enter.max() > 1e-9:
                meet, axes = max(float(enter.max()), 0.0), enter >= enter.max() - 1e-9  # axes: the later entries
        step = min(float(wall.min()), meet)
        if t + step >= until:
            break
        t += step
        p = np.clip(p + v * step, lo, hi)
        v = np.where(wall <= step + 1e-12, -v, v)
        if meet <= step:
            v = np.where(axes, -v, v)
        log.append((t, p, v))
    else:
        raise RuntimeError(f"more than {MAX_EVENTS} bounces in {until} s")  # never for placed scenes
    times, centres, velocities = zip(*log)
    return np.array(times), np.stack(centres), np.stack(velocities)


def _within_reach(d: np.ndarray, w: np.ndarray, reach: float) -> tuple[np.ndarray, np.ndarray]:
    """The times two boxes are within ``reach`` of each other along both axes (their gap is below GAP),
    for centre offsets ``d`` (..., 2) px changing at ``w`` (..., 2) px/s -> (enter, leave), each (..., 2)
    per axis: the pair is within reach from the largest enter to the smallest leave, if that is later."""
    with np.errstate(divide="ignore", invalid="ignore"):
        a, b = (-reach - d) / w, (reach - d) / w
    inside = np.abs(d) < reach  # an axis that does not change (w = 0) is always within reach, or never
    enter = np.where(w != 0, np.minimum(a, b), np.where(inside, -np.inf, np.inf))
    leave = np.where(w != 0, np.maximum(a, b), np.where(inside, np.inf, -np.inf))
    return enter, leave


def _at(log: tuple[np.ndarray, ...], times: np.ndarray) -> np.ndarray:
    """Centres at ``times`` from a ``_simulate`` log -> (N objects, len(times), 2) px."""
    events, centres, velocities = log
    e = np.searchsorted(events, times, side="right") - 1  # the last event at or before each time
    out = centres[e] + velocities[e] * (times - events[e])[:, None, None]  # (len(times), N, 2)
    return out.transpose(1, 0, 2)


def positions(scene: VideoScene, times: np.ndarray, width: int, height: int) -> np.ndarray:
    """Centres (x, y) in pixels of every object at ``times`` (seconds, >= 0) -> (N objects, len(times), 2),
    with the bounces off walls and off each other (``_simulate``)."""
    times = np.asarray(times, dtype=np.float64)
    return _at(_simulate(scene, width, height, float(times.max(initial=0.0))), times)


def frame_times(frames: int, fps: float) -> np.ndarray:
    """The instants (seconds) of ``frames`` frames at ``fps``: 0, 1 / fps, 2 / fps, ..."""
    return np.arange(int(frames)) / float(fps)


def trajectory(scene: VideoScene, frames: int, fps: float, width: int, height: int) -> np.ndarray:
    """Centres (x, y) in pixels per object per frame -> (N objects, frames, 2), bounces included."""
    return positions(scene, frame_times(frames, fps), width, height)


def snapshot(scene: VideoScene, time: float, width: int, height: int) -> Scene:
    """The still ``shapes`` Scene of ``scene`` at ``time`` seconds (renders with ``render_scene``)."""
    unit = min(width, height)
    centres = positions(scene, np.array([time]), width, height)[:, 0]  # (N, 2) px
    objects = []
    for obj, (cx, cy) in zip(scene.objects, centres):
        half = obj.side * unit / 2
        box = ((cx - half) / width, (cy - half) / height, (cx + half) / width, (cy + half) / height)
        objects.append(ShapeObject(obj.shape, obj.colour, obj.size, box))
    return Scene(tuple(objects), scene.caption, scene.kind)


def object_masks(scene: VideoScene, frames: int, width: int, height: int, fps: float) -> list[np.ndarray]:
    """Each object's pixels in every frame -> one (T, H, W) bool per object, in drawing order: the ``shapes``
    renderer's mask on pixel centres, along the object's ``trajectory``."""
    unit = min(width, height)
    centres = trajectory(scene, frames, fps, width, height)  # (N, T, 2)
    xs, ys = np.arange(width) + 0.5, np.arange(height) + 0.5
    masks = []
    for obj, path in zip(scene.objects, centres):
        dx = xs[None, None, :] - path[:, None, None, 0]  # (T, 1, W)
        dy = ys[None, :, None] - path[:, None, None, 1]  # (T, H, 1)
        masks.append(_shape_mask(obj.shape, dx, dy, obj.side * unit / 2))  # (T, H, W)
    return masks


def render_video(scene: VideoScene, frames: int, width: int, height: int, fps: float) -> np.ndarray:
    """Render ``frames`` frames at ``fps`` -> uint8 (T, H, W, 3) on a white background (``object_masks``)."""
    video = np.empty((int(frames), height, width, 3), dtype=np.uint8)
    video[:] = BACKGROUND
    for obj, mask in zip(scene.objects, object_masks(scene, frames, width, height, fps)):
        video[mask] = COLOURS[obj.colour]
    return video


def object_mask(scene: VideoScene, frames: int, width: int, height: int, fps: float,
                shapes: Collection[str] | None = None) -> np.ndarray:
    """(T, H, W) bool: the pixels that ``render_video`` paints with an object of ``shapes`` (None: any)."""
    mask = np.zeros((int(frames), height, width), dtype=bool)
    for obj, covered in zip(scene.objects, object_masks(scene, frames, width, height, fps)):
        mask[covered] = shapes is None or obj.shape in shapes  # a later object covers an earlier one
    return mask


def video_tensor(video: np.ndarray) -> Tensor:
    """uint8 (T, H, W, 3) -> float32 (3, T, H, W) in [-1, 1], scaled as ``shapes.to_tensor`` scales images.

    Converted in numpy: torch's float() of the permuted uint8 view takes ~20 ms per 16x32x32 clip on a
    2-core CPU, numpy ~0.1 ms, and this runs for every clip of every training batch."""
    return torch.from_numpy(np.ascontiguousarray(video.transpose(3, 0, 1, 2), dtype=np.float32) / 127.5 - 1.0)


# ---------------------------------------------------------------------------------------------
# Layout


def _room(side: float, direction: str, speed_value: float, width: int, height: int,
          fps: float) -> tuple[np.ndarray, np.ndarray, float]:
    """(lowest, highest) start centre (x, y) in pixels from which the object travels DIRECTION_WINDOW + one
    frame + FREE_MARGIN before it reaches a wall (less only where the canvas has no such room), and the
    seconds until then."""
    unit = min(width, height)
    lo, hi = _bounds(side, width, height)
    travel = (DIRECTION_WINDOW + speed_value / fps + FREE_MARGIN) * unit  # path length, px
    low, high, free = lo.copy(), hi.copy(), travel
    for axis, u in enumerate(DIRECTIONS[direction]):
        need = min(travel * abs(u), hi[axis] - lo[axis])  # distance to the wall ahead, px
        if u != 0:
            free = min(free, need / abs(u))
        if u > 0:
            high[axis] = hi[axis] - need
        elif u < 0:
            low[axis] = lo[axis] + need
    return low, high, free / (speed_value * unit)


def _starts(rng: np.random.Generator, side: float, direction: str, speed_value: float, width: int, height: int,
            fps: float, n: int) -> tuple[np.ndarray, float]:
    """``n`` candidate start centres (n, 2) in pixels drawn uniformly from ``_room``, and the seconds the
    object moves straight from them."""
    low, high, free = _room(side, direction, speed_value, width, height, fps)
    return np.stack([rng.uniform(low[axis], high[axis], size=n) for axis in range(2)], axis=1), free


def _clear(scene: VideoScene, free: Sequence[float], frames: int, fps: float, width: int, height: int) -> bool:
    """True when each object keeps its first velocity for its ``free`` seconds (no early meeting) and no two
    boxes are ever within GAP: checked on at least COLLISION_RATE samples per second, a safety net under
    the bounces that keep them apart."""
    if len(scene.objects) < 2:
        return True
    duration = (int(frames) - 1) / fps
    log = _simulate(scene, width, height, duration)
    events, _, velocities = log
    for k, seconds in enumerate(free):
        turned = (velocities[:, k] != velocities[0, k]).any(axis=1)  # (E,) object k's velocity changed
        if (turned & (events < seconds)).any():
            return False
    times = np.linspace(0.0, duration, max(int(frames), math.ceil(duration * COLLISION_RATE) + 1))
    centres = _at(log, times)  # (N, S, 2)
    unit = min(width, height)
    apart = np.abs(centres[0] - centres[1]) - sum(o.side for o in scene.objects) * unit / 2  # (S, 2) px
    return bool((apart.max(axis=1) >= GAP * unit - 1e-6).all())  # apart along x or along y at every sample


ObjectRequest = tuple[str, str, str, str, str]  # (colour, shape, size, direction, speed)


def place_objects(rng: np.random.Generator, requests: Sequence[ObjectRequest], width: int, height: int,
                  frames: int, fps: float, tries: int = 50) -> tuple[VideoObject, ...] | None:
    """One or two objects with the requested (colour, shape, size, direction, speed), placed by the layout
    rules (module docstring); None when ``tries`` draws from ``rng`` all fail them.

    The second object's start is the first of CANDIDATES draws that does not come within GAP of the first
    object while either still has to move straight (a vectorised rejection: uniform over the starts that
    work), since in a 32 px canvas most independent draws would."""
    unit = min(width, height)
    for _ in range(tries):
        drawn = []
        for k, (_colour, _shape, size, direction, speed) in enumerate(requests):
            side, value = float(rng.uniform(*SIZE_RANGE[size])), float(rng.uniform(*SPEEDS[speed]))
            starts, free = _starts(rng, side, direction, value, width, height, fps, 1 if k == 0 else CANDIDATES)
            drawn.append((side, value, starts, free))
        if len(drawn) == 2:
            (side_a, value_a, start_a, free_a), (side_b, value_b, starts_b, free_b) = drawn
            velocity_a, velocity_b = (np.array(DIRECTIONS[r[3]]) * v * unit for r, v in zip(requests,
                                                                                          (value_a, value_b)))
            enter, leave = _within_reach(starts_b - start_a, velocity_b - velocity_a, GAP * unit +
                                         (side_a + side_b) * unit / 2)
            enter, leave = enter.max(axis=1), leave.min(axis=1)  # (CANDIDATES,)
            works = (leave - enter <= 1e-9) | (leave <= 0) | (enter >= max(free_a, free_b))
            if not works.any():
                continue
            drawn[1] = (side_b, value_b, starts_b[int(works.argmax()):][:1], free_b)
        objects = tuple(
            VideoObject(shape, colour, size, side, (float(starts[0, 0]) / width, float(starts[0, 1]) / height),
                        (value * DIRECTIONS[direction][0], value * DIRECTIONS[direction][1]), direction, speed)
            for (colour, shape, size, direction, speed), (side, value, starts, _) in zip(requests, drawn))
        if _clear(VideoScene(objects, "", "pair"), [d[3] for d in drawn], frames, fps, width, height):
            return objects
    return None


# ---------------------------------------------------------------------------------------------
# Captions


def _clause(rng: np.random.Generator, obj, with_size: bool, form: int, mention_speed: bool) -> str:
    """"a red circle moving to the right", "a small red circle moves up quickly", "a fast blue square
    heads left", "a red circle drifting upwards"; ``form`` 0 = -ing verbs, 1 = third person."""
    direction = DIRECTION_PHRASES[obj.direction][int(rng.integers(2))]
    style = int(rng.integers(3)) if mention_speed else -1  # 0 adverb, 1 speed verb, 2 speed adjective
    adjectives = [obj.size] if with_size else []
    if style == 2:
        adjectives.append(SPEED_ADJECTIVES[obj.speed])
    words = " ".join([*adjectives, obj.colour, obj.shape])
    verbs = SPEED_VERBS[obj.speed] if style == 1 else NEUTRAL_VERBS
    verb = verbs[int(rng.integers(len(verbs)))][form]
    motion = direction
    if style == 0:
        adverb = SPEED_ADVERBS[obj.speed][int(rng.integers(len(SPEED_ADVERBS[obj.speed])))]
        motion = f"{adverb} {direction}" if rng.random() < 0.5 else f"{direction} {adverb}"
    return f"{_article(words)} {words} {verb} {motion}"


def video_caption(rng: np.random.Generator, objects: Sequence, speed_p: float = SPEED_MENTION_P,
                  size_p: float = SIZE_MENTION_P) -> str:
    """A caption for ``objects`` with random wording: one clause per object, joined by "and" or "while".
    Sizes are named with probability ``size_p`` (as in ``shapes``), each object's speed with ``speed_p``.

    ``objects`` are VideoObjects or anything with colour, shape, size, direction and speed attributes (the
    judge's specs); a size or speed of None is never named."""
    with_size = bool(rng.random() < size_p) and all(o.size is not None for o in objects)
    form = int(rng.integers(2))
    clauses = [_clause(rng, o, with_size, form, bool(rng.random() < speed_p) and o.speed is not None)
               for o in objects]
    joiner = " and " if form == 0 or rng.random() < 0.5 else " while "  # "moving ... while ..." is no sentence
    return joiner.join(clauses)


# Every word a shapes_video caption can contain (the shapes words without counts, plurals and relations).
VOCABULARY = caption_words("a an and while", *SHAPES, *COLOURS, *SIZES, *DIRECTION_PHRASES,
                           *(p for pair in DIRECTION_PHRASES.values() for p in pair), *SPEED_ADJECTIVES.values(),
                           *(w for verbs in (NEUTRAL_VERBS, *SPEED_VERBS.values()) for pair in verbs for w in pair),
                           *(w for words in SPEED_ADVERBS.values() for w in words))


# ---------------------------------------------------------------------------------------------
# Sampling


def make_video_scene(rng: np.random.Generator, width: int, height: int, frames: int, fps: float,
                     allowed: Sequence[tuple[str, str]], kinds: Mapping[str, float] | None = None) -> VideoScene:
    """Sample one clip for a ``width`` x ``height`` canvas, ``frames`` frames at ``fps``, from the
    (colour, shape) pairs ``allowed``; ``kinds`` weights "single" and "pair" (default VIDEO_KINDS)."""
    kinds = VIDEO_KINDS if kinds is None else kinds
    names = [k for k in VIDEO_KINDS if k in kinds]  # canonical order, so dict order does not matter
    p = np.array([kinds[k] for k in names], dtype=np.float64)
    kind = names[int(rng.choice(len(names), p=p / p.sum()))]
    directions, speeds = list(DIRECTIONS), list(SPEEDS)
    while True:  # redraw everything from the same rng when the layout fails: deterministic, and rare
        if kind == "single":
            pairs = [allowed[rng.integers(len(allowed))]]
            sizes = [SIZES[rng.integers(2)]]
        else:
            i, j = rng.choice(len(allowed), size=2, replace=False)
            pairs = [allowed[i], allowed[j]]
            sizes = [("small", "small"), ("small", "large"), ("large", "small")][rng.integers(3)]
        motions = [(directions[rng.integers(len(directions))], speeds[rng.integers(len(speeds))]) for _ in pairs]
        tries = LARGE_TRIES if len(sizes) == 2 and "large" in sizes else 50
        objects = place_objects(rng, [(c, s, z, d, v) for (c, s), z, (d, v) in zip(pairs, sizes, motions)],
                                width, height, frames, fps, tries)
        if objects is None and len(sizes) == 2:
            # A large object leaves a small one room to move straight beside it only for some pairs of
            # directions (at 32 px); fall back to two small ones, so directions and speeds stay uniform.
            objects = place_objects(rng, [(c, s, "small", d, v) for (c, s), (d, v) in zip(pairs, motions)],
                                    width, height, frames, fps, tries=200)
        if objects is not None:
            return VideoScene(objects, video_caption(rng, objects), kind)


def check_partner_directions(directions: str) -> None:
    """One line naming the choices unless ``directions`` is one of PARTNER_DIRECTIONS."""
    if directions not in PARTNER_DIRECTIONS:
        raise OmniditError(f"unknown counterfactual directions {directions!r}",
                           hint=f"choose one of: {', '.join(PARTNER_DIRECTIONS)}")


def _changes(old: str, new: str, part: str) -> bool:
    """Whether moving ``new`` instead of ``old`` is the change ``part`` of PARTNER_DIRECTIONS allows."""
    same_x, same_y = np.sign(np.round(DIRECTIONS[old], 9)) == np.sign(np.round(DIRECTIONS[new], 9))
    if part == "vertical":
        return same_x and not same_y
    if part == "horizontal":
        return same_y and not same_x
    if part == "either":
        return same_x != same_y
    return new != old


def counterfactual_video_scene(scene: VideoScene, rng: np.random.Generator, width: int, height: int,
                               fps: float, directions: str = "any") -> VideoScene | None:
    """The partner of a single-object clip with its direction changed: the same object, start and speed moving
    another way, drawn from ``rng`` among the directions its start leaves room for (``_room``, as the data's
    own layout does) and that ``directions`` allows (PARTNER_DIRECTIONS), and the caption with its direction
    phrase swapped for the new direction's (the same wording). None for two-object clips, or where no allowed
    direction has room."""
    check_partner_directions(directions)
    if len(scene.objects) != 1:
        return None
    obj = scene.objects[0]
    value = math.hypot(*obj.velocity)  # unit / s: the speed before any bounce
    centre = np.array([obj.start[0] * width, obj.start[1] * height])
    choices = []
    for direction in DIRECTIONS:
        if not _changes(obj.direction, direction, directions):
            continue
        low, high, _ = _room(obj.side, direction, value, width, height, fps)
        if ((centre >= low - 1e-9) & (centre <= high + 1e-9)).all():
            choices.append(direction)
    if not choices:
        return None
    direction = choices[int(rng.integers(len(choices)))]
    ux, uy = DIRECTIONS[direction]
    moved = dataclasses.replace(obj, velocity=(value * ux, value * uy), direction=direction)
    old_phrases = DIRECTION_PHRASES[obj.direction]
    found = [k for k in range(2) if re.search(rf"\b{re.escape(old_phrases[k])}\b", scene.caption)]
    if not found:  # a caption that does not name the direction has no partner
        return None
    form = max(found, key=lambda k: len(old_phrases[k]))  # "to the right" over the "right" inside it
    caption = re.sub(rf"\b{re.escape(old_phrases[form])}\b", DIRECTION_PHRASES[direction][form], scene.caption,
                     count=1)
    return VideoScene((moved,), caption, scene.kind)


class ShapesVideoDataset(Dataset):
    """Infinite captioned shape clips: ``ds[i]`` -> {"video": (3, T, H, W) float32 in [-1, 1],
    "caption": str, "label": -1}.

    Clip ``i`` depends only on (seed, i). Held-out (colour, shape) pairs are never drawn.
    """

    channels = 3
    num_classes = 0
    num_samples = None

    def __init__(
        self,
        width: int = 32,
        height: int = 32,
        frames: int = 16,
        fps: float = 8.0,
        seed: int = 0,
        held_out: Sequence[str] | str = DEFAULT_HELD_OUT,
        kinds: Mapping[str, float] | None = None,
        counterfactual_directions: str = "any",
    ) -> None:
        check_clip_size(width, height, frames, fps)
        check_partner_directions(counterfactual_directions)
        if int(seed) < 0:
            raise OmniditError(f"seed must be >= 0, got {seed}")
        kinds = dict(VIDEO_KINDS if kinds is None else kinds)
        check_video_kinds(kinds)
        self.width, self.height, self.frames, self.fps = int(width), int(height), int(frames), float(fps)
        self.seed = int(seed)
        self.held_out = parse_held_out(held_out)
        self.allowed = allowed_pairs(self.held_out)
        self.kinds = kinds
        self.counterfactual_directions = counterfactual_directions

    def scene(self, index: int) -> VideoScene:
        """The clip's scene at ``index`` (any non-negative int)."""
        if index < 0:
            raise IndexError(f"shapes video index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, int(index)])
        return make_video_scene(rng, self.width, self.height, self.frames, self.fps, self.allowed, self.kinds)

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        video = render_video(scene, self.frames, self.width, self.height, self.fps)  # (T, H, W, 3)
        return {"video": video_tensor(video), "caption": scene.caption, "label": -1}

    def object_mask(self, index: int, shapes: Collection[str] | None = None) -> Tensor:
        """(T, H, W) bool: the pixels of clip ``index`` that an object of ``shapes`` (None: any) covers in each
        frame (``train.object_loss_weight``)."""
        mask = object_mask(self.scene(index), self.frames, self.width, self.height, self.fps, shapes)
        return torch.from_numpy(mask)

    def counterfactual(self, index: int) -> dict | None:
        """The clip at ``index`` with its direction changed as ``counterfactual_directions`` allows
        (``counterfactual_video_scene``, drawn from (seed, index) alone), or None for a two-object clip or one
        without such a partner; used by ``train.counterfactual_weight``: the loss then contrasts two captions
        that differ in the direction only, on one start."""
        rng = np.random.default_rng([self.seed, int(index), COUNTERFACTUAL_STREAM])
        partner = counterfactual_video_scene(self.scene(index), rng, self.width, self.height, self.fps,
                                             self.counterfactual_directions)
        if partner is None:
            return None
        video = render_video(partner, self.frames, self.width, self.height, self.fps)
        return {"video": video_tensor(video), "caption": partner.caption, "label": -1}
