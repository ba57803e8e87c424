"""GenEval-style prompt suite for the shapes domain, judged exactly by ``detector.detect_objects``.

Seven categories, each a fixed, seeded list of prompts written with the training captions' own
templates ("a red circle", "three green triangles", "a red circle to the left of a blue square"),
since the model has only ever seen such captions. What each category judges:

- single_object       exactly one object, of the named shape (colour not judged)
- two_objects         exactly two objects, one of each named shape (colours not judged)
- counting            exactly N objects (N = 1..4), all of the named shape (colour not judged)
- colours             exactly one object, right shape and right colour
- position            exactly two objects, each the named colour + shape, and their centres in the
                      named relation (see ``relation_holds``)
- colour_attribution  exactly two objects of different colours and shapes, each shape bound to its colour
- novel_compositions  exactly one object of a held-out (colour, shape) pair, right shape and colour

Every prompt outside novel_compositions uses only in-distribution (not held-out) pairs.
The manifest (``manifest.json``) maps image file names to their specs, so images made by any
system can be scored: write it with ``write_manifest``, fill the folder, then
``omnidit.evaluate.runner.evaluate_folder`` (``omnidit eval DIR --suite shapes``) reads it back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnidit.data.shapes import (  # the caption helpers, so prompts match training captions word for word
    _RELATION_PHRASES,
    COLOURS,
    COUNT_WORDS,
    DEFAULT_HELD_OUT,
    OPPOSITE_RELATION,
    RELATIONS,
    SHAPES,
    Scene,
    ShapeObject,
    _article,
    _plural,
    _relation_layout,
    _scatter,
    _sides,
    allowed_pairs,
    parse_held_out,
)
from omnidit.errors import OmniditError
from omnidit.evaluate.detector import Detection

CATEGORIES = ("single_object", "two_objects", "counting", "colours", "position", "colour_attribution",
              "novel_compositions")
DEFAULT_PER_CATEGORY = 32
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "omnidit-shapes-suite"
MANIFEST_VERSION = 1

Pair = tuple[str, str]  # (colour, shape)


@dataclass(frozen=True)
class PromptSpec:
    """One prompt and what an image for it must contain.

    ``objects`` holds (colour or None for any colour, shape, count) entries with disjoint matches;
    for position, ``objects[0] <relation> objects[1]``.
    """

    category: str
    prompt: str
    objects: tuple[tuple[str | None, str, int], ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        bad = None
        if self.category not in CATEGORIES:
            bad = f"unknown category {self.category!r}"
        elif not self.objects:
            bad = "no objects"
        elif any(c is not None and c not in COLOURS or s not in SHAPES or int(n) < 1 for c, s, n in self.objects):
            bad = f"bad objects {self.objects}"
        elif self.relation is not None and (self.relation not in RELATIONS or len(self.objects) != 2
                                            or any(int(n) != 1 for _, _, n in self.objects)):
            bad = f"bad relation {self.relation!r} for object entries {self.objects} (it needs two single objects)"
        if bad:
            raise OmniditError(f"invalid prompt spec for {self.prompt!r}: {bad}",
                               hint=f"categories: {', '.join(CATEGORIES)}; relations: {', '.join(RELATIONS)}")


# ---------------------------------------------------------------------------------------------
# Prompts


def _a(colour: str, shape: str) -> str:
    words = f"{colour} {shape}"
    return f"{_article(words)} {words}"


def _counted(colour: str, shape: str, n: int) -> str:
    return f"one {colour} {shape}" if n == 1 else f"{COUNT_WORDS[n]} {colour} {_plural(shape)}"


def _held_pairs(held_out: Iterable[str] | Iterable[Pair] | str) -> frozenset[Pair]:
    """"red triangle,blue circle", ["red triangle", ...] or [("red", "triangle"), ...] -> pairs."""
    if isinstance(held_out, str):
        return parse_held_out(held_out)
    return parse_held_out([i if isinstance(i, str) else " ".join(i) for i in held_out])


def _interleave(groups: list[list]) -> list:
    """Round-robin over groups, so any prefix is balanced (e.g. over counts or relations)."""
    out = []
    for i in range(max(len(g) for g in groups)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def _candidates(category: str, rng: np.random.Generator, allowed: list[Pair], held: list[Pair]) -> list[PromptSpec]:
    """Every prompt of ``category``, in a seeded order."""
    def shuffled(items: list) -> list:
        return [items[i] for i in rng.permutation(len(items))]

    pairs = [(p, q) for p in allowed for q in allowed if p != q]
    if category == "single_object":
        return [PromptSpec(category, _a(c, s), ((None, s, 1),)) for c, s in shuffled(allowed)]
    if category == "colours":
        return [PromptSpec(category, _a(c, s), ((c, s, 1),)) for c, s in shuffled(allowed)]
    if category == "two_objects":
        return [PromptSpec(category, f"{_a(*p)} and {_a(*q)}", ((None, p[1], 1), (None, q[1], 1)))
                for p, q in shuffled([(p, q) for p, q in pairs if p[1] != q[1]])]
    if category == "colour_attribution":
        return [PromptSpec(category, f"{_a(*p)} and {_a(*q)}", ((*p, 1), (*q, 1)))
                for p, q in shuffled([(p, q) for p, q in pairs if p[0] != q[0] and p[1] != q[1]])]
    if category == "counting":
        return _interleave([[PromptSpec(category, _counted(c, s, n), ((None, s, n),)) for c, s in shuffled(allowed)]
                            for n in COUNT_WORDS])
    if category == "position":
        return _interleave([
            [PromptSpec(category, f"{_a(*p)} {_RELATION_PHRASES[rel]} {_a(*q)}", ((*p, 1), (*q, 1)), rel)
             for p, q in shuffled(pairs)]
            for rel in RELATIONS])
    # novel_compositions: both single-object templates the captions use ("a ..." and "one ...").
    return shuffled([PromptSpec(category, phrase, ((c, s, 1),)) for c, s in held for phrase in (_a(c, s),
                                                                                                _counted(c, s, 1))])


def build_prompts(seed: int = 0, per_category: int | None = None,
                  held_out: Iterable[str] | Iterable[Pair] | str = DEFAULT_HELD_OUT) -> list[PromptSpec]:
    """The suite: up to ``per_category`` (default DEFAULT_PER_CATEGORY) prompts per category, in
    CATEGORIES order. Deterministic in ``seed``; a smaller ``per_category`` gives a prefix of each
    category's list. novel_compositions is empty when nothing is held out."""
    if per_category is not None and int(per_category) < 1:
        raise OmniditError(f"per_category must be >= 1, got {per_category}")
    n = DEFAULT_PER_CATEGORY if per_category is None else int(per_category)
    held = _held_pairs(held_out)
    allowed = allowed_pairs(held)
    specs = []
    for k, category in enumerate(CATEGORIES):
        rng = np.random.default_rng([int(seed), k])  # one stream per category: lists don't shift together
        specs += _candidates(category, rng, allowed, sorted(held))[:n]
    return specs


# ---------------------------------------------------------------------------------------------
# Judging


def relation_holds(relation: str, a: Detection | ShapeObject, b: Detection | ShapeObject,
                   image_size: tuple[int, int] = (1, 1)) -> bool:
    """``a <relation> b``: the centre offset along the relation's axis has the right sign and is
    larger than the offset along the other axis (measured in pixels, so aspect ratio is fair).

    Training scenes keep the off-axis offset under half the on-axis one, so true renders pass with
    a margin, while a pair that is mostly side by side is never judged "above".
    """
    size = a.image_size if isinstance(a, Detection) else image_size
    (ax, ay), (bx, by) = a.centre, b.centre
    dx, dy = (bx - ax) * size[0], (by - ay) * size[1]  # from a to b; y grows down
    on, off = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return on > abs(off)


def _name(colour: str | None, shape: str, n: int) -> str:
    noun = shape if n == 1 else _plural(shape)
    return f"{colour} {noun}" if colour else noun


def _match_objects(spec: PromptSpec, detections: Sequence[Detection]) -> tuple[list[list[Detection]] | None, str]:
    """The detections of each object entry of ``spec`` when the image holds exactly the named objects
    -> (matches, ""), else (None, why)."""
    found = "; found: " + (", ".join(d.describe() for d in detections) or "nothing")
    matches = []
    for colour, shape, n in spec.objects:
        hits = [d for d in detections if d.shape == shape and (colour is None or d.colour == colour)]
        if len(hits) != n:
            return None, f"expected {n} {_name(colour, shape, n)}, found {len(hits)}{found}"
        matches.append(hits)
    expected = sum(n for _, _, n in spec.objects)
    if len(detections) != expected:
        return None, f"expected {expected} object{'s' * (expected > 1)}, found {len(detections)}{found}"
    return matches, ""


def check(spec: PromptSpec, detections: Sequence[Detection]) -> tuple[bool, str]:
    """Judge one image's detections against ``spec`` -> (passed, reason)."""
    matches, why = _match_objects(spec, detections)
    if matches is None:
        return False, why
    if spec.relation is not None:
        (a,), (b,) = matches
        if not relation_holds(spec.relation, a, b):
            return False, f"{a.describe()} is not {_RELATION_PHRASES[spec.relation]} {b.describe()}"
    return True, "ok"


def relation_verdict(spec: PromptSpec, detections: Sequence[Detection]) -> str | None:
    """Where the pair was placed, judged only where the image holds exactly the two named objects:
    "right" (the named relation holds), "reversed" (the opposite one holds: right axis, wrong
    direction) or "off_axis" (neither); None where the pair was not drawn or no relation is named.

    Over the position images, the "right" fraction is the relation accuracy and "right" plus
    "reversed" the axis accuracy. A model that places the pair at random scores about 0.25 and
    0.5; one that reads the axis words ("to the left of" or "above") but not the direction scores
    about 0.5 and 1.
    """
    if spec.relation is None:
        return None
    matches, _ = _match_objects(spec, detections)
    if matches is None:
        return None
    (a,), (b,) = matches
    if relation_holds(spec.relation, a, b):
        return "right"
    return "reversed" if relation_holds(OPPOSITE_RELATION[spec.relation], a, b) else "off_axis"


def score(results: Sequence[tuple[PromptSpec, bool]]) -> dict:
    """[(spec, passed)] -> {"overall": mean of the category pass rates, "categories": {name: pass rate},
    "n_images": N}. Categories without results are left out (not counted as zero)."""
    if not results:
        raise OmniditError("no results to score", hint="the manifest lists no images, or none were judged")
    by_category: dict[str, list[bool]] = {}
    for spec, passed in results:
        by_category.setdefault(spec.category, []).append(bool(passed))
    rates = {c: float(np.mean(by_category[c])) for c in CATEGORIES if c in by_category}
    return {"overall": float(np.mean(list(rates.values()))), "categories": rates, "n_images": len(results)}


def reference_scene(spec: PromptSpec, width: int = 32, height: int = 32, seed: int = 0) -> Scene:
    """A ground-truth scene that satisfies ``spec`` (laid out like training scenes): the suite's
    upper bound, and a test oracle. Unnamed colours are drawn at random."""
    rng = np.random.default_rng(seed)
    entries = [(c or list(COLOURS)[rng.integers(len(COLOURS))], s) for c, s, n in spec.objects for _ in range(n)]
    sizes = [("small", "large")[rng.integers(2)]] if len(entries) == 1 else ["small"] * len(entries)
    for _ in range(100):
        sides = _sides(rng, sizes, min(width, height))
        if spec.relation:
            boxes = _relation_layout(rng, sides, spec.relation, width, height)
        else:
            boxes = _scatter(rng, sides, width, height)
        if boxes is not None:
            break
    else:
        raise OmniditError(f"could not lay out {spec.prompt!r} at {width}x{height}", hint="use a larger canvas")
    scale = (width, height, width, height)
    objects = tuple(ShapeObject(s, c, z, tuple(float(v) / k for v, k in zip(b, scale)))
                    for (c, s), z, b in zip(entries, sizes, boxes))
    kind = {"counting": "count", "position": "relation"}.get(spec.category, "single" if len(objects) == 1 else "pair")
    return Scene(objects, spec.prompt, kind, spec.relation)


# ---------------------------------------------------------------------------------------------
# Manifest: image file name -> spec, so any system's images can be scored


def image_name(prompt_index: int, sample: int) -> str:
    """File name of sample ``sample`` of prompt ``prompt_index``, e.g. "00012_3.png"."""
    return f"{prompt_index:05d}_{sample}.png"


def _manifest_path(path: str | Path) -> Path:
    path = Path(path)
    return path / MANIFEST_NAME if path.suffix.lower() != ".json" else path


def write_prompt_list(specs: Sequence[PromptSpec], path: str | Path) -> Path:
    """Write one prompt per line (line i is prompt index i, e.g. prompts.txt)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(spec.prompt + "\n" for spec in specs))
    return path


def write_manifest(specs: Sequence[PromptSpec], n_per_prompt: int, path: str | Path) -> Path:
    """Write the manifest for ``n_per_prompt`` images per prompt; ``path`` is a folder (gets
    manifest.json) or a .json file. Returns the file written."""
    if int(n_per_prompt) < 1:
        raise OmniditError(f"n_per_prompt must be >= 1, got {n_per_prompt}")
    images = [{"file": image_name(i, k), "prompt_index": i, "sample": k, "category": spec.category,
               "prompt": spec.prompt, "objects": [list(o) for o in spec.objects], "relation": spec.relation}
              for i, spec in enumerate(specs) for k in range(int(n_per_prompt))]
    data = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "n_prompts": len(specs),
            "n_per_prompt": int(n_per_prompt), "images": images}
    path = _manifest_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def read_manifest(path: str | Path) -> list[tuple[str, PromptSpec]]:
    """Read a manifest (a folder holding manifest.json, or the file) -> [(image file name, spec)]."""
    path = _manifest_path(path)
    hint = "write one with omnidit.evaluate.shapes_suite.write_manifest next to the images"
    if not path.is_file():
        raise OmniditError(f"no shapes-suite manifest at {path}", hint=hint)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OmniditError(f"cannot read manifest {path}: {e}", hint=hint) from e
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise OmniditError(f"{path} is not a shapes-suite manifest (format != {MANIFEST_FORMAT!r})", hint=hint)
    if data.get("version") != MANIFEST_VERSION:
        raise OmniditError(f"manifest {path} has version {data.get('version')!r}, expected {MANIFEST_VERSION}",
                           hint="regenerate the manifest with this version of omnidit")
    try:
        entries = [(str(e["file"]), PromptSpec(e["category"], e["prompt"],
                                               tuple((c, s, int(n)) for c, s, n in e["objects"]), e["relation"]))
                   for e in data["images"]]
    except (KeyError, TypeError, ValueError) as e:
        raise OmniditError(f"malformed manifest {path}: {type(e).__name__}: {e}", hint=hint) from e
    return entries

