"""The layout suite: does a model with a layout adapter put each object in its box? Judged by the detector.

Each case is a ground-truth shapes scene (every scene kind, drawn with LAYOUT_SEED, a data seed no recipe trains
on; held-out colour-shape pairs never appear): its caption is the prompt and its objects' boxes, phrased "a red
circle", are the layout. An object is placed when the detector finds an object of its colour and shape whose
box has IoU >= PLACED_IOU with the object's box (each detection serves one object; the best IoU first). The
score of a category (scene kind) and ``overall`` are fractions of objects placed; an image passes when all its
objects are placed and nothing else is drawn. A model without a layout adapter is sampled from the caption alone
(``boxes_given`` false in the report): the baseline that shows what the boxes add.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from omnidit.data.shapes import SCENE_KINDS, Scene, allowed_pairs, make_scene, parse_held_out
from omnidit.errors import OmniditError
from omnidit.evaluate.edit_suite import _iou
from omnidit.layout import Box, layout_adapter, scene_boxes

LAYOUT_SEED = 8_888
PLACED_IOU = 0.5
DEFAULT_CASES = 16  # per scene kind
CATEGORIES = tuple(SCENE_KINDS)


def layout_cases(width: int, height: int, held_out, per_category: int = DEFAULT_CASES) -> list[Scene]:
    """``per_category`` scenes of each kind, in kind order."""
    held = parse_held_out(held_out) if not isinstance(held_out, frozenset) else held_out
    allowed = allowed_pairs(held)
    rng = np.random.default_rng(LAYOUT_SEED)
    return [make_scene(rng, width, height, allowed, {kind: 1.0}) for kind in CATEGORIES for _ in range(per_category)]


def placed_objects(boxes: list[Box], colours_shapes: list[tuple[str, str]], result: torch.Tensor
                   ) -> tuple[list[bool], int, str]:
    """Which objects (their boxes and (colour, shape)) ``result`` (3, H, W) in [-1, 1] draws in place, how many
    objects the detector found, and what it found (for the failure list)."""
    from omnidit.evaluate.detector import detect_objects

    found = detect_objects(result)
    pairs = sorted(((_iou(d.box, b.coords), i, j) for i, (b, want) in enumerate(zip(boxes, colours_shapes))
                    for j, d in enumerate(found) if (d.colour, d.shape) == want), reverse=True)
    placed, used = [False] * len(boxes), set()
    for iou, i, j in pairs:
        if iou >= PLACED_IOU and not placed[i] and j not in used:
            placed[i] = True
            used.add(j)
    return placed, len(found), ", ".join(d.describe() for d in found) or "nothing"


def evaluate_layout(pipe, n_per_prompt: int = 1, seed: int = 0, limit: int | None = None, batch_size: int = 16,
                    progress: bool = True, frechet: bool = False, **sampling):
    """The layout suite on an image model of the shapes data: ``limit`` scenes per kind (default DEFAULT_CASES),
    ``n_per_prompt`` seeds each. -> EvalReport (details: objects, objects_placed, boxes_given, iou)."""
    from omnidit.evaluate.runner import EvalReport, Judged, _seeds

    dc = pipe.config.data
    if dc.frames > 1 or pipe.model.config.extra_streams or dc.name != "shapes":
        raise OmniditError("the layout suite needs an image model of the shapes data",
                           hint="pass a shapes model with a layout adapter (docs/editing.md#layout-boxes)")
    scenes = layout_cases(dc.width, dc.height, dc.held_out, limit or DEFAULT_CASES)
    given = layout_adapter(pipe.model) is not None
    expanded = [s for s in scenes for _ in range(n_per_prompt)]
    seeds = _seeds(seed, len(expanded))
    judged, placed_per_kind = [], {k: [] for k in CATEGORIES}
    with tqdm(total=len(expanded), desc="layout", unit="image", disable=not progress) as bar:
        for start in range(0, len(expanded), batch_size):
            part = expanded[start:start + batch_size]
            boxes = [scene_boxes(s) for s in part]
            images = pipe.generate([s.caption for s in part], seed=seeds[start:start + batch_size],
                                   boxes=boxes if given else None, **sampling)
            for scene, rows, image, k in zip(part, boxes, images, seeds[start:start + batch_size]):
                placed, count, seen = placed_objects(rows, [(o.colour, o.shape) for o in scene.objects], image)
                placed_per_kind[scene.kind] += placed
                missing = [b.phrase for b, ok in zip(rows, placed) if not ok]
                reason = (f"not in its box: {', '.join(missing)}" if missing else
                          f"{count} objects for {len(rows)}" if count != len(rows) else "") + \
                    (f" (found {seen})" if missing or count != len(rows) else "")
                judged.append(Judged(scene.kind, scene.caption, image, not reason, reason, seed=k))
            bar.update(len(part))
    scores = {k: sum(v) / len(v) for k, v in placed_per_kind.items() if v}
    objects = [ok for v in placed_per_kind.values() for ok in v]
    overall = sum(objects) / len(objects)
    details = {"objects": len(objects), "objects_placed": overall, "boxes_given": given, "iou": PLACED_IOU,
               "images_exact": sum(j.passed for j in judged) / len(judged)}
    return EvalReport("layout", overall, scores, len(judged), None, judged=judged, details=details)
