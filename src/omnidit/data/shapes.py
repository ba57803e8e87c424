"""Procedural captioned shapes: the project's main toy text-to-image domain.

Each scene is a few flat-coloured shapes on a white canvas with a caption that names exactly what is
drawn ("a red circle to the left of a green triangle"). Scenes are deterministic in (seed, index) and
cost O(1) to produce, so the dataset is infinite. Layout is stored in normalised [0, 1] box
coordinates, so a scene renders at any resolution; the renderer draws each shape as a square of side
min(box width, box height) in pixels, centred in its box, so shapes never distort.

Renders are crisp (no anti-aliasing) so that an exact detector can recover every object.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from omnidit.errors import OmniditError

SHAPES = ("circle", "square", "triangle", "diamond")
# Shapes no shipped model has seen: a data set draws them only when asked (``new_shapes``, data.new_shapes), e.g. to
# teach one to a model with a LoRA; the detector fits them only when asked.
NEW_SHAPES = ("cross",)
# Saturated, pairwise far-apart colours (min RGB distance ~90), none close to the white background (pink the closest:
# 1.14 from it in the model's [-1, 1] pixel units, every other colour at least 2).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "orange": (250, 135, 0),
    "yellow": (245, 225, 0),
    "green": (20, 165, 40),
    "cyan": (0, 205, 225),
    "blue": (30, 60, 230),
    "purple": (135, 35, 190),
    "pink": (250, 120, 200),
}
BACKGROUND = (255, 255, 255)
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
SCENE_KINDS: dict[str, float] = {"single": 0.25, "count": 0.25, "pair": 0.2, "relation": 0.3}
DEFAULT_HELD_OUT = ("red triangle", "blue circle", "green square", "yellow diamond")

# Object side as a fraction of min(H, W): at 32 px small is 8-9 px and large 14-16 px, so a size
# classifier can threshold at ~0.36 with a wide gap on both sides.
SIZE_RANGE = {"small": (0.25, 0.28), "large": (0.44, 0.50)}
BORDER = 0.03  # gap to the canvas edge, fraction of min(H, W)
GAP = 0.06  # gap between any two object boxes, fraction of min(H, W)
# In a relation scene the off-axis centre offset is at most this fraction of the on-axis offset,
# so "left of" is never also arguably "above".
OFF_AXIS_RATIO = 0.5
SIZE_MENTION_P = 0.3
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
_RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above",
                     "below": "below"}
OPPOSITE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class ShapeObject:
    """One shape; box = (x0, y0, x1, y1) in normalised [0, 1] canvas coordinates (y grows down)."""

    shape: str
    colour: str
    size: str
    box: tuple[float, float, float, float]

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2, (y0 + y1) / 2)


@dataclass(frozen=True)
class Scene:
    """A captioned scene. For kind "relation", ``objects[0] <relation> objects[1]`` holds."""

    objects: tuple[ShapeObject, ...]
    caption: str
    kind: str
    relation: str | None = None


def check_scene_kinds(kinds: Mapping[str, float], name: str = "scene kinds") -> None:
    """Raise a one-line error unless ``kinds`` maps known scene kinds to non-negative weights with a
    positive sum; ``name`` is what the message calls it (e.g. a config key)."""
    hint = f'weights over {", ".join(SCENE_KINDS)}, e.g. {{"single": 1, "relation": 3}}'
    bad = [k for k in kinds if k not in SCENE_KINDS]
    if bad:
        raise OmniditError(f"{name} has unknown scene kind {bad[0]!r}", hint=hint)
    if any(w < 0 for w in kinds.values()) or not sum(kinds.values()) > 0:
        raise OmniditError(f"{name} needs non-negative weights with a positive sum, got {dict(kinds)}", hint=hint)


def allowed_pairs(held_out: Collection[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every (colour, shape) pair not held out, in palette order; an error when fewer than two are left."""
    allowed = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held_out]
    if len(allowed) < 2:
        raise OmniditError("held_out leaves fewer than two (colour, shape) pairs to draw", hint="hold out fewer pairs")
    return allowed


def drawn_pairs(held_out: Collection[tuple[str, str]], new_shapes: Sequence[str] = ()) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a shapes data set draws: the allowed known pairs, then each new shape in every
    colour."""
    return allowed_pairs(held_out) + [(c, s) for s in check_new_shapes(new_shapes) for c in COLOURS]


MAX_NEW_SHAPE_WEIGHT = 1e6


def _check_weight(weight: float, name: str, hint: str) -> None:
    """A one-line error unless ``weight`` is a real number in (0, MAX_NEW_SHAPE_WEIGHT], not a bool, inf or NaN."""
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 < weight <= MAX_NEW_SHAPE_WEIGHT:
        raise OmniditError(f"{name} must be a number in (0, {MAX_NEW_SHAPE_WEIGHT:g}], got {weight!r}", hint=hint)


def check_new_shape_weight(weight: float, has_new_shapes: bool, name: str = "new_shape_weight") -> float:
    """``weight`` as a float: a real number in (0, MAX_NEW_SHAPE_WEIGHT] (not a bool, infinity or NaN), and 1 where
    there are no new shapes to weight; else a one-line error."""
    _check_weight(weight, name, "e.g. 3: each new shape's colour-shape pair three times as likely as a known one's")
    if weight != 1 and not has_new_shapes:
        raise OmniditError(f"{name}={float(weight):g} weights the shapes of new_shapes, and there are none",
                           hint='add new_shapes=["cross"] or leave the weight at 1')
    return float(weight)


def parse_pair_weights(weights: Mapping[str, float], allowed: Sequence[tuple[str, str]],
                       name: str = "pair_weights") -> dict[tuple[str, str], float]:
    """``weights`` ({"pink cross": 3, ...}) as {(colour, shape): factor}: each key a colour-shape pair that the data
    draws (not held out; a new shape only when it is in new_shapes), each factor a number in (0,
    MAX_NEW_SHAPE_WEIGHT]; else a one-line error."""
    if not isinstance(weights, Mapping):
        raise OmniditError(f"{name} must map 'colour shape' pairs to factors, got {weights!r}",
                           hint='e.g. {"pink cross": 3}')
    parsed = {}
    for key, factor in weights.items():
        pair = tuple(str(key).lower().split())
        if len(pair) != 2 or pair[0] not in COLOURS or pair[1] not in (*SHAPES, *NEW_SHAPES):
            raise OmniditError(f"{name} names {key!r}, not a 'colour shape' pair",
                               hint=f"colours: {', '.join(COLOURS)}; shapes: {', '.join((*SHAPES, *NEW_SHAPES))}")
        if pair not in allowed:
            fix = (f'add data.new_shapes=["{pair[1]}"]' if pair[1] in NEW_SHAPES
                   else f"drop '{key}' from data.held_out")
            raise OmniditError(f"{name} names {key!r}, a pair that this data never draws", hint=fix)
        if pair in parsed:
            raise OmniditError(f"{name} names '{' '.join(pair)}' twice", hint="keep one of the two keys")
        _check_weight(factor, f"{name}[{key!r}]", hint="e.g. 3: that pair three times as likely as before")
        parsed[pair] = float(factor)
    return parsed


def check_new_shapes(names: Sequence[str], name: str = "new shapes") -> tuple[str, ...]:
    """``names`` if each is one of NEW_SHAPES, once; else a one-line error."""
    bad = [s for s in names if s not in NEW_SHAPES]
    if bad or len(set(names)) != len(names):
        raise OmniditError(f"{name} {list(names)} must name each of {', '.join(NEW_SHAPES)} at most once",
                           hint='e.g. ["cross"]')
    return tuple(names)


def parse_held_out(items: Sequence[str] | str) -> frozenset[tuple[str, str]]:
    """Parse strings like "red triangle" into (colour, shape) pairs; a single str may list several
    separated by commas ("red triangle,blue circle")."""
    if isinstance(items, str):
        items = [s for s in items.split(",") if s.strip()]
    pairs = set()
    for item in items:
        words = str(item).lower().split()
        if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
            raise OmniditError(
                f"bad held-out pair {item!r}: expected 'colour shape'",
                hint=f"colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)}; e.g. 'red triangle'",
            )
        pairs.add((words[0], words[1]))
    return frozenset(pairs)


# ---------------------------------------------------------------------------------------------
# Layout (pixel-space floats, converted to normalised boxes at the end)


def _sides(rng: np.random.Generator, sizes: Sequence[str], unit: float) -> list[float]:
    return [float(rng.uniform(*SIZE_RANGE[s])) * unit for s in sizes]


def _separated(a: tuple[float, ...], b: tuple[float, ...], gap: float) -> bool:
    """True when boxes a and b (x0, y0, x1, y1) are at least ``gap`` apart along x or y."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _scatter(rng: np.random.Generator, sides: list[float], w: int, h: int) -> list[tuple] | None:
    """Rejection-sample non-overlapping square boxes; None if this attempt got stuck."""
    unit = min(w, h)
    border, gap = BORDER * unit, GAP * unit
    boxes: list[tuple] = []
    for side in sides:
        for _ in range(50):
            x0 = rng.uniform(border, w - border - side)
            y0 = rng.uniform(border, h - border - side)
            box = (x0, y0, x0 + side, y0 + side)
            if all(_separated(box, b, gap) for b in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _relation_layout(rng: np.random.Generator, sides: list[float], relation: str, w: int, h: int) -> list:
    """Place two boxes so that box 0 <relation> box 1 holds with a clear margin.

    Samples the main axis directly (first box's start, then the second's start after it) and the
    off axis within OFF_AXIS_RATIO of the main-axis centre offset, so no rejection is needed.
    """
    unit = min(w, h)
    border, gap = BORDER * unit, GAP * unit
    horizontal = relation in ("left of", "right of")
    # "low" is the object with the smaller coordinate on the main axis (left, or higher up).
    low_first = relation in ("left of", "above")
    s_low, s_high = (sides[0], sides[1]) if low_first else (sides[1], sides[0])
    extent, other = (w, h) if horizontal else (h, w)
    lo0 = rng.uniform(border, extent - border - s_low - gap - s_high)
    hi0 = rng.uniform(lo0 + s_low + gap, extent - border - s_high)
    offset = (hi0 + s_high / 2) - (lo0 + s_low / 2)
    # Off axis: centre of "low" uniform, centre of "high" uniform in the allowed window around it.
    c_low = rng.uniform(border + s_low / 2, other - border - s_low / 2)
    lo_c = max(border + s_high / 2, c_low - OFF_AXIS_RATIO * offset)
    hi_c = min(other - border - s_high / 2, c_low + OFF_AXIS_RATIO * offset)
    c_high = rng.uniform(lo_c, hi_c) if hi_c > lo_c else (lo_c + hi_c) / 2
    boxes = []
    for start, centre, side in ((lo0, c_low, s_low), (hi0, c_high, s_high)):
        a0, b0 = start, centre - side / 2
        boxes.append((a0, b0, a0 + side, b0 + side) if horizontal else (b0, a0, b0 + side, a0 + side))
    return boxes if low_first else boxes[::-1]


def reversed_scene(scene: Scene) -> Scene | None:
    """``scene`` with its two objects trading places along the relation's axis, captioned with the
    opposite relation; None when it has no relation. "a red circle to the left of a blue square" becomes
    "a red circle to the right of a blue square": the pair is reflected within its own extent on that
    axis, so the extent, the gap and the off-axis positions stay. The new layout is distributed like
    the ones ``_relation_layout`` draws for the opposite relation, up to the clipping of the off-axis
    window at the border (a test checks the mean positions). A reflection of the whole canvas would not
    be: the layout puts a pair's midpoint slightly past the canvas centre, toward larger x or y. The two
    scenes differ only in the direction: a counterfactual pair. Shapes keep their orientation."""
    if scene.relation is None:
        return None
    axis = 0 if scene.relation in ("left of", "right of") else 1  # x or y in the (x0, y0, x1, y1) boxes
    low = min(o.box[axis] for o in scene.objects)
    high = max(o.box[axis + 2] for o in scene.objects)

    def trade(obj: ShapeObject) -> ShapeObject:
        box = list(obj.box)
        box[axis], box[axis + 2] = low + high - obj.box[axis + 2], low + high - obj.box[axis]
        return replace(obj, box=tuple(box))

    opposite = OPPOSITE_RELATION[scene.relation]
    caption = scene.caption.replace(f" {_RELATION_PHRASES[scene.relation]} ", f" {_RELATION_PHRASES[opposite]} ", 1)
    return Scene(tuple(trade(o) for o in scene.objects), caption, scene.kind, opposite)


def swapped_colours_scene(scene: Scene, allowed: Sequence[tuple[str, str]]) -> Scene | None:
    """``scene`` with its two objects trading colours, captioned to match: "a red circle and a blue
    square" becomes "a blue circle and a red square" (pair and relation scenes; everything else stays).
    None for other kinds, for two objects of one colour or of one shape (the swap would then only move
    the colours, and "a blue triangle and a red triangle" means what "a red triangle and a blue triangle"
    does), and where a swapped (colour, shape) pair is not in ``allowed`` (held-out pairs are never
    rendered, not even as a partner)."""
    if scene.kind not in ("pair", "relation"):
        return None
    a, b = scene.objects
    if a.colour == b.colour or a.shape == b.shape:
        return None
    if (b.colour, a.shape) not in allowed or (a.colour, b.shape) not in allowed:
        return None
    objects = (replace(a, colour=b.colour), replace(b, colour=a.colour))
    return Scene(objects, _describe(scene.kind, objects, scene.relation, _names_size(scene)), scene.kind,
                 scene.relation)


def fewer_scene(scene: Scene) -> Scene | None:
    """A count scene with its last-drawn object removed (a random one: the layout is scattered),
    captioned with one fewer: "three red circles" becomes "two red circles", "two red circles" becomes
    "one red circle". None for other kinds."""
    if scene.kind != "count":
        return None
    objects = scene.objects[:-1]
    kind = "single" if len(objects) == 1 else "count"
    return Scene(objects, _describe(kind, objects, None, _names_size(scene), one=True), kind)


# What a counterfactual partner may change (data.counterfactuals), in order of preference.
COUNTERFACTUAL_FACTS = ("relation", "colours", "count")
_PARTNERS = {"relation": lambda scene, allowed: reversed_scene(scene),
             "colours": swapped_colours_scene,
             "count": lambda scene, allowed: fewer_scene(scene)}


def counterfactual_scene(scene: Scene, facts: Sequence[str], allowed: Sequence[tuple[str, str]]) -> Scene | None:
    """The partner of ``scene`` that changes the first fact of ``COUNTERFACTUAL_FACTS`` named in
    ``facts`` that applies to it: a relation scene is reversed ("relation") or else has its colours
    swapped ("colours"), a pair has its colours swapped, a count scene loses one object ("count").
    None where no named fact applies (single objects never have one)."""
    for fact in COUNTERFACTUAL_FACTS:
        partner = _PARTNERS[fact](scene, allowed) if fact in facts else None
        if partner is not None:
            return partner
    return None


def check_counterfactual_facts(facts: Sequence[str], name: str = "counterfactual facts") -> None:
    if isinstance(facts, str) or not facts or any(f not in COUNTERFACTUAL_FACTS for f in facts):
        raise OmniditError(f"{name} must be a non-empty list drawn from {', '.join(COUNTERFACTUAL_FACTS)}, "
                           f"got {facts!r}", hint='e.g. ["relation", "colours", "count"]')


# ---------------------------------------------------------------------------------------------
# Captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def _names_size(scene: Scene) -> bool:
    """Whether ``scene``'s caption names the sizes ("a small red circle", "three large red circles"):
    a partner keeps that wording choice, which Scene does not store."""
    first = scene.objects[0]
    return f"{first.size} {first.colour}" in scene.caption


def _phrase(obj: ShapeObject, with_size: bool) -> str:
    words = f"{obj.size} {obj.colour} {obj.shape}" if with_size else f"{obj.colour} {obj.shape}"
    return f"{_article(words)} {words}"


def object_caption(obj: ShapeObject) -> str:
    """One object's own caption, "a red circle": what `omnidit inpaint` is asked to draw in a mask around it."""
    return _phrase(obj, with_size=False)


def _caption(rng: np.random.Generator, kind: str, objects: list[ShapeObject], relation: str | None) -> str:
    with_size = bool(rng.random() < SIZE_MENTION_P)
    # "one red circle" as an alternative to the article for single objects
    one = kind == "single" and bool(rng.random() < 0.2)
    return _describe(kind, objects, relation, with_size, one)


def _describe(kind: str, objects: Sequence[ShapeObject], relation: str | None, with_size: bool,
              one: bool = False) -> str:
    """The caption of a scene of ``kind`` once the random wording choices are made."""
    first = objects[0]
    if kind == "single":
        return "one " + _phrase(first, with_size).split(" ", 1)[1] if one else _phrase(first, with_size)
    if kind == "count":
        adj = f"{first.size} {first.colour}" if with_size else first.colour
        return f"{COUNT_WORDS[len(objects)]} {adj} {_plural(first.shape)}"
    a, b = _phrase(objects[0], with_size), _phrase(objects[1], with_size)
    if kind == "pair":
        return f"{a} and {b}"
    return f"{a} {_RELATION_PHRASES[relation]} {b}"


def caption_words(*phrases: str) -> frozenset[str]:
    """The words of some caption phrases, lower-cased."""
    return frozenset(w for phrase in phrases for w in phrase.lower().split())


# Every word a shapes caption can contain (tests check it against sampled captions, both ways); the
# pipeline warns when a prompt for a model trained on these captions uses any other word.
VOCABULARY = caption_words("a an and", *SHAPES, *map(_plural, SHAPES), *COLOURS, *SIZES, *COUNT_WORDS.values(),
                           *_RELATION_PHRASES.values())
NEW_SHAPE_WORDS = caption_words(*NEW_SHAPES, *map(_plural, NEW_SHAPES))  # the captions of data.new_shapes


# ---------------------------------------------------------------------------------------------
# Scene sampling


def _pair_index(rng: np.random.Generator, n: int, p: np.ndarray | None) -> int:
    return int(rng.integers(n)) if p is None else int(rng.choice(n, p=p))


def make_scene(
    rng: np.random.Generator,
    width: int,
    height: int,
    allowed: Sequence[tuple[str, str]],
    kinds: Mapping[str, float] = SCENE_KINDS,
    pair_p: np.ndarray | None = None,
) -> Scene:
    """Sample one scene for a ``width`` x ``height`` canvas from (colour, shape) pairs ``allowed``, each drawn with
    probability ``pair_p`` (summing to 1; None: uniformly, with the draws of every earlier version)."""
    names = list(kinds)
    p = np.array([kinds[k] for k in names], dtype=np.float64)
    kind = names[int(rng.choice(len(names), p=p / p.sum()))]
    unit = min(width, height)
    relation = None
    while True:  # retry with fresh draws from the same rng: deterministic, and rarely loops
        if kind == "single":
            pairs = [allowed[_pair_index(rng, len(allowed), pair_p)]]
            sizes = [SIZES[rng.integers(2)]]
        elif kind == "count":
            n = int(rng.integers(2, 5))
            pairs = [allowed[_pair_index(rng, len(allowed), pair_p)]] * n
            sizes = ["small"] * n  # two large objects do not fit side by side at 32 px
        else:
            i, j = rng.choice(len(allowed), size=2, replace=False, p=pair_p)
            pairs = [allowed[i], allowed[j]]
            # At most one large object so the pair always fits with room to move.
            sizes = [("small", "small"), ("small", "large"), ("large", "small")][rng.integers(3)]
        sides = _sides(rng, sizes, unit)
        if kind == "relation":
            relation = RELATIONS[rng.integers(len(RELATIONS))]
            boxes = _relation_layout(rng, sides, relation, width, height)
        else:
            boxes = _scatter(rng, sides, width, height)
        if boxes is not None:
            break
    scale = (width, height, width, height)
    objects = [
        ShapeObject(shape=s, colour=c, size=z, box=tuple(float(v) / k for v, k in zip(b, scale, strict=True)))
        for (c, s), z, b in zip(pairs, sizes, boxes, strict=True)
    ]
    return Scene(tuple(objects), _caption(rng, kind, objects, relation), kind, relation)


# ---------------------------------------------------------------------------------------------
# Rendering


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask from pixel-centre offsets (dx, dy) to the shape centre; r = half the side."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":  # apex up at dy = -r, base at dy = +r; half-width grows linearly
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":  # a plus sign: two bars of width 2r/3 through the centre
        return ((np.abs(dx) <= r / 3) & (np.abs(dy) <= r)) | ((np.abs(dy) <= r / 3) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _object_pixels(obj: ShapeObject, width: int, height: int) -> tuple[slice, slice, np.ndarray]:
    """(rows, columns, mask): the window of pixels whose centres can fall inside ``obj``'s box, and which of them
    the shape covers."""
    x0, y0, x1, y1 = obj.box[0] * width, obj.box[1] * height, obj.box[2] * width, obj.box[3] * height
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, min(x1 - x0, y1 - y0) / 2
    i0, i1 = max(int(np.floor(cy - r)), 0), min(int(np.ceil(cy + r)) + 1, height)
    j0, j1 = max(int(np.floor(cx - r)), 0), min(int(np.ceil(cx + r)) + 1, width)
    dy = (np.arange(i0, i1) + 0.5 - cy)[:, None]
    dx = (np.arange(j0, j1) + 0.5 - cx)[None, :]
    return slice(i0, i1), slice(j0, j1), _shape_mask(obj.shape, dx, dy, r)


def render_scene(scene: Scene, width: int, height: int) -> np.ndarray:
    """Render ``scene`` to a uint8 array (height, width, 3) on a white background."""
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for obj in scene.objects:
        rows, cols, mask = _object_pixels(obj, width, height)
        img[rows, cols][mask] = COLOURS[obj.colour]
    return img


def object_mask(scene: Scene, width: int, height: int, shapes: Collection[str] | None = None) -> np.ndarray:
    """(height, width) bool: the pixels that ``render_scene`` paints with an object of ``shapes`` (None: any)."""
    mask = np.zeros((height, width), dtype=bool)
    for obj in scene.objects:  # in drawing order: a later object covers an earlier one
        rows, cols, covered = _object_pixels(obj, width, height)
        mask[rows, cols][covered] = shapes is None or obj.shape in shapes
    return mask


def to_tensor(img: np.ndarray) -> Tensor:
    """uint8 (H, W, C) -> float32 (C, H, W) in [-1, 1]."""
    return torch.from_numpy(img).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ShapesDataset(Dataset):
    """Infinite captioned shapes: ``ds[i]`` -> {"image": (3, H, W) in [-1, 1], "caption", "label": -1}.

    Scene ``i`` depends only on (seed, i). Held-out (colour, shape) pairs are never drawn.
    """

    channels = 3
    num_classes = 0
    num_samples = None

    def __init__(
        self,
        width: int = 32,
        height: int = 32,
        seed: int = 0,
        held_out: Sequence[str] | str = DEFAULT_HELD_OUT,
        kinds: Mapping[str, float] | None = None,
        counterfactuals: Sequence[str] = ("relation",),
        new_shapes: Sequence[str] = (),
        new_shape_weight: float = 1.0,
        pair_weights: Mapping[str, float] | None = None,
    ) -> None:
        if int(width) < 8 or int(height) < 8:  # below ~24 px shapes are barely recognisable
            raise OmniditError(f"shapes images must be at least 8x8, got {width}x{height}",
                               hint="use width=32 height=32 or larger")
        if int(seed) < 0:
            raise OmniditError(f"seed must be >= 0, got {seed}")
        kinds = dict(SCENE_KINDS if kinds is None else kinds)
        check_scene_kinds(kinds)
        check_counterfactual_facts(counterfactuals)
        self.counterfactuals = tuple(counterfactuals)
        self.width, self.height, self.seed = int(width), int(height), int(seed)
        self.held_out = parse_held_out(held_out)
        self.allowed = drawn_pairs(self.held_out, new_shapes)
        # new_shape_weight: a new shape's (colour, shape) pair has that many times a known pair's weight, so that a
        # LoRA teaching it sees it more often than one object in five; 1 keeps the uniform draws exactly.
        weight = check_new_shape_weight(new_shape_weight, bool(new_shapes))
        # pair_weights: named pairs' weights multiplied further, e.g. {"pink cross": 3} for the colour that a new
        # shape is learnt worst in.
        factors = parse_pair_weights(pair_weights or {}, self.allowed)
        weights = np.array([(weight if shape in new_shapes else 1.0) * factors.get((colour, shape), 1.0)
                            for colour, shape in self.allowed])
        self.pair_p = None if (weights == 1.0).all() else weights / weights.sum()
        # Canonical order: the kind is drawn by index, so {"a": 1, "b": 2} and {"b": 2, "a": 1} must agree.
        self.kinds = {k: float(kinds[k]) for k in SCENE_KINDS if k in kinds}

    def scene(self, index: int) -> Scene:
        """The scene at ``index`` (any non-negative int)."""
        if index < 0:
            raise IndexError(f"shapes index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, int(index)])
        return make_scene(rng, self.width, self.height, self.allowed, self.kinds, self.pair_p)

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        image = to_tensor(render_scene(scene, self.width, self.height))  # (3, H, W)
        return {"image": image, "caption": scene.caption, "label": -1}

    def object_mask(self, index: int, shapes: Collection[str] | None = None) -> Tensor:
        """(H, W) bool: the pixels of item ``index`` that an object of ``shapes`` (None: any) covers
        (``train.object_loss_weight``)."""
        return torch.from_numpy(object_mask(self.scene(index), self.width, self.height, shapes))

    def counterfactual(self, index: int) -> dict | None:
        """The item at ``index`` with one fact of its caption changed (``counterfactual_scene`` with the
        facts named by ``counterfactuals``), or None where none applies; used by
        ``train.counterfactual_weight``."""
        partner = counterfactual_scene(self.scene(index), self.counterfactuals, self.allowed)
        if partner is None:
            return None
        return {"image": to_tensor(render_scene(partner, self.width, self.height)), "caption": partner.caption,
                "label": -1}
