"""The edit suite: exact faithfulness of inpainting and of prompt editing on shapes scenes, judged by the detector.

Each case is a ground-truth two-object scene (the shapes data's pair and relation kinds, drawn with EDIT_SEED,
a data seed no recipe trains on), whose first object is to change:

- ``inpaint_recolour`` / ``inpaint_replace``: the first object's box, grown by MASK_MARGIN pixels, is masked and
  filled from the caption that names the object in another colour ("a red circle above a blue square" becomes
  "a green circle above a blue square") or as another shape in the same colour;
- ``inpaint_restore``: the object is painted out (background) and the caption is the scene's own: the model
  must draw it back;
- ``edit_recolour`` / ``edit_replace``: no mask is given: the image is inverted under its own caption and
  sampled back under the edited one (omnidit.editing: value injection, the mask the model finds itself, best of
  EDIT_CANDIDATES).
- ``move`` (every model): the first object's box, grown by MASK_MARGIN pixels, is moved to a new place
  (``inpaint.move_region``: its pixels pasted there exactly) and the hole it leaves is inpainted under the scene's
  caption: the model must fill it with background, not another object.
- ``inpaint_move`` (models with a layout adapter only, omnidit.layout): the first object's old and new boxes,
  each grown by MASK_MARGIN pixels, are masked and inpainted under the scene's caption with layout boxes for both
  objects, the first at its new place (a box of its size elsewhere on the canvas, clear of the other object).

A case passes when the detector finds exactly two objects: the requested one (colour and shape) centred inside
the first object's (grown) box, and the other one unchanged (same colour and shape, box IoU >= KEEP_IOU with its
detected box before). For inpainting, the pixels outside the mask must come back bit for bit (``kept_exact``);
for editing, the report adds ``reconstruction_psnr``: the mean PSNR of every case's image inverted and sampled
back under its own caption (no edit). Colour-shape pairs held out from the model's training are never used.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from tqdm.auto import tqdm

from omnidit.data.shapes import (
    BACKGROUND,
    COLOURS,
    SHAPES,
    Scene,
    allowed_pairs,
    make_scene,
    object_caption,
    parse_held_out,
    render_scene,
    to_tensor,
)
from omnidit.data.shapes import _describe as describe
from omnidit.errors import OmniditError
from omnidit.layout import layout_adapter

EDIT_SEED = 7_777
CATEGORIES = ("inpaint_recolour", "inpaint_replace", "inpaint_restore", "edit_recolour", "edit_replace")
INPAINTS = CATEGORIES[:3]  # an object drawn in a mask: the categories that inpaint_prompt="object" asks by name
PASTE_MOVE = "move"  # moved by pasting its pixels, the hole inpainted: every model
MOVE = "inpaint_move"  # drawn anew at its new place by layout boxes: models with a layout adapter
MASK_MARGIN = 2  # pixels around the object's box: its anti-aliased rim and a little room
KEEP_IOU = 0.8
DEFAULT_CASES = 16  # per category
INPAINT_PROMPTS = ("auto", "scene", "object")  # evaluate_edit's inpaint_prompt


def _pixel_box(box: tuple[float, ...], width: int, height: int, margin: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return (max(0, int(np.floor(x0 * width)) - margin), max(0, int(np.floor(y0 * height)) - margin),
            min(width, int(np.ceil(x1 * width)) + margin), min(height, int(np.ceil(y1 * height)) + margin))


def _overlaps(a: tuple[int, ...], b: tuple[float, ...], width: int, height: int) -> bool:
    bx0, by0, bx1, by1 = b[0] * width, b[1] * height, b[2] * width, b[3] * height
    return a[0] < bx1 and bx0 < a[2] and a[1] < by1 and by0 < a[3]


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def edit_cases(width: int, height: int, held_out, per_category: int = DEFAULT_CASES,
               data_seed: int = EDIT_SEED) -> list[dict]:
    """``per_category`` cases of each category: {"category", "prompt", "source" (the input's own caption),
    "object_prompt" (the filled object's own caption, "a red circle"), "image"
    (3, H, W) in [-1, 1], "mask" (H, W)
    bool, "want" (colour, shape) of the filled object, "keep" (the other object as the detector sees it before the
    edit), "box" (mask pixels),
    "answer" (the edited scene rendered: what a perfect edit gives)}; the scenes are drawn with ``data_seed`` (the
    suite's EDIT_SEED; others to choose settings on)."""
    from omnidit.evaluate.detector import detect_objects

    held = parse_held_out(held_out) if not isinstance(held_out, frozenset) else held_out
    allowed = allowed_pairs(held)
    rng = np.random.default_rng(data_seed)
    cases: dict[str, list[dict]] = {c: [] for c in CATEGORIES}
    for _ in range(100 * per_category):
        if all(len(v) >= per_category for v in cases.values()):
            break
        scene = make_scene(rng, width, height, allowed, {"pair": 0.5, "relation": 0.5})
        first, other = scene.objects
        box = _pixel_box(first.box, width, height, MASK_MARGIN)
        if _overlaps(box, other.box, width, height):
            continue  # the mask would cut into the object that must stay
        category = min(CATEGORIES, key=lambda c: len(cases[c]))
        change = category.split("_")[1]
        if change == "recolour":
            options = [c for c in COLOURS if c not in (first.colour, other.colour) and (c, first.shape) in allowed]
            edited = replace(first, colour=options[int(rng.integers(len(options)))]) if options else None
        elif change == "replace":
            options = [s for s in SHAPES if s not in (first.shape, other.shape) and (first.colour, s) in allowed]
            edited = replace(first, shape=options[int(rng.integers(len(options)))]) if options else None
        else:
            edited = first
        if edited is None:
            continue
        pixels = render_scene(scene if change != "restore" else Scene((other,), "", "single"), width, height)
        mask = torch.zeros(height, width, dtype=torch.bool)
        mask[box[1]:box[3], box[0]:box[2]] = True
        if change == "restore":
            pixels = pixels.copy()
            pixels[box[1]:box[3], box[0]:box[2]] = BACKGROUND
        before = [d for d in detect_objects(pixels) if (d.colour, d.shape) == (other.colour, other.shape)]
        if len(before) != 1:
            continue  # the detector must see the object that stays before the edit, to see it after
        prompt = describe(scene.kind, (edited, other), scene.relation, with_size=False)
        answer = to_tensor(render_scene(Scene((edited, other), prompt, scene.kind), width, height))
        source = describe(scene.kind, (first, other), scene.relation, with_size=False)
        cases[category].append({"category": category, "prompt": prompt, "source": source,
                                "object_prompt": object_caption(edited),
                                "image": to_tensor(pixels), "mask": mask,
                                "want": (edited.colour, edited.shape), "keep": before[0], "box": box,
                                "answer": answer})
    return [case for c in CATEGORIES for case in cases[c][:per_category]]


def move_cases(width: int, height: int, held_out, count: int, paste: bool = False,
               data_seed: int = EDIT_SEED) -> list[dict]:
    """``count`` move cases (the keys of ``edit_cases``, plus "boxes": the layout, the first object at its new
    place), from their own random stream (``data_seed`` + 1) so that the other categories' cases stay as they
    are. ``paste``: the ``move`` category's cases instead, the same scenes and new places: "image" is the scene
    with the object's grown box pasted at its new place and "mask" the hole it left."""
    from omnidit.data.shapes import GAP, _separated
    from omnidit.evaluate.detector import detect_objects
    from omnidit.inpaint import move_region
    from omnidit.layout import scene_boxes

    held = parse_held_out(held_out) if not isinstance(held_out, frozenset) else held_out
    rng = np.random.default_rng(data_seed + 1)
    cases = []
    for _ in range(100 * count):
        if len(cases) == count:
            break
        scene = make_scene(rng, width, height, allowed_pairs(held), {"pair": 1.0})
        first, other = scene.objects
        side_x, side_y = first.box[2] - first.box[0], first.box[3] - first.box[1]
        x0, y0 = float(rng.uniform(0, 1 - side_x)), float(rng.uniform(0, 1 - side_y))
        new = (x0, y0, x0 + side_x, y0 + side_y)
        old_px, new_px = (_pixel_box(b, width, height, MASK_MARGIN) for b in (first.box, new))
        if _iou(new, first.box) > 0 or not _separated(new, other.box, GAP) \
                or any(_overlaps(b, other.box, width, height) for b in (old_px, new_px)):
            continue  # not a move, or the object would touch the other one, or the mask would cut into it
        before = [d for d in detect_objects(render_scene(scene, width, height))
                  if (d.colour, d.shape) == (other.colour, other.shape)]
        if len(before) != 1:
            continue
        moved = replace(first, box=new)
        mask = torch.zeros(height, width, dtype=torch.bool)
        for b in (old_px, new_px):
            mask[b[1]:b[3], b[0]:b[2]] = True
        prompt = describe("pair", (first, other), None, with_size=False)
        after = Scene((moved, other), prompt, "pair")
        image = to_tensor(render_scene(scene, width, height))
        if paste:  # the object's grown box moved by whole pixels (its new corner rounded)
            dx, dy = round((new[0] - first.box[0]) * width), round((new[1] - first.box[1]) * height)
            region = torch.zeros(height, width, dtype=torch.bool)  # cropped where its copy would leave the canvas
            rows = slice(max(old_px[1], -dy), min(old_px[3], height - dy))
            region[rows, max(old_px[0], -dx):min(old_px[2], width - dx)] = True
            pasted, mask = move_region(image[None], region, (dx, dy))
            image = pasted[0]
        cases.append({"category": PASTE_MOVE if paste else MOVE, "prompt": prompt, "source": prompt,
                      "image": image, "mask": mask, "want": (first.colour, first.shape), "keep": before[0],
                      "box": new_px, "boxes": None if paste else scene_boxes(after),
                      "answer": to_tensor(render_scene(after, width, height))})
    return cases


def judge_edit(case: dict, result: torch.Tensor) -> tuple[bool, str]:
    """Whether ``result`` (3, H, W) in [-1, 1] holds the requested object inside the mask and the other unchanged."""
    from omnidit.evaluate.detector import detect_objects

    found = detect_objects(result)
    h, w = result.shape[-2:]
    x0, y0, x1, y1 = case["box"]
    keep = case["keep"]
    kept = [d for d in found if (d.colour, d.shape) == (keep.colour, keep.shape) and _iou(d.box, keep.box) >= KEEP_IOU]
    filled = [d for d in found if (d.colour, d.shape) == case["want"]
              and x0 <= d.centre[0] * w <= x1 and y0 <= d.centre[1] * h <= y1]
    seen = ", ".join(d.describe() for d in found) or "nothing"
    if not filled:
        return False, f"no {' '.join(case['want'])} in the mask (found {seen})"
    if not kept:
        return False, f"the {keep.colour} {keep.shape} changed (found {seen})"
    if len(found) != 2:
        return False, f"{len(found)} objects (found {seen})"
    return True, ""


def check_edit_model(pipe) -> None:
    """A one-line error unless ``pipe`` is an image model of the shapes data, which the edit cases are drawn for."""
    dc = pipe.config.data
    if dc.frames > 1 or pipe.model.config.extra_streams or dc.name != "shapes":
        raise OmniditError("the edit suite needs an image model of the shapes data",
                           hint="pass a shapes model, e.g. the shipped one")


def asked_prompt(case: dict, inpaint_prompt: str) -> str:
    """What ``case`` is asked for: with ``inpaint_prompt`` "object" an inpaint (INPAINTS) names the filled object
    alone; prompt edits and moves (whose hole is background) keep the scene's caption."""
    return case["object_prompt"] if inpaint_prompt == "object" and case["category"] in INPAINTS else case["prompt"]


def evaluate_edit(pipe, n_per_prompt: int = 1, seed: int = 0, limit: int | None = None, batch_size: int = 16,
                  progress: bool = True, frechet: bool = False, inpaint_mode: str = "auto",
                  inject_until: float | None = None, inpaint_prompt: str = "auto", **sampling):
    """The edit suite on an image model: ``limit`` cases per category (default DEFAULT_CASES). Inpainting draws
    ``n_per_prompt`` seeds per case; editing is deterministic (one result per case) and uses the model's steps and
    guidance scale. ``inpaint_prompt``: what the recolour / replace / restore inpaints are asked for: ``scene``,
    the whole scene's caption; ``object``, the filled object's own ("a red circle"); ``auto``, ``object`` for a
    model trained on such captions (train.region_caption) and ``scene`` otherwise. -> EvalReport (details:
    kept_exact, reconstruction_psnr, the inpainting mode and prompts)."""
    from omnidit.editing import DEFAULT_INJECT_UNTIL, EDIT_CANDIDATES, edit
    from omnidit.evaluate.runner import EvalReport, Judged, _aggregate, _seeds
    from omnidit.inpaint import resolve_mode

    dc = pipe.config.data
    check_edit_model(pipe)
    if inpaint_prompt not in INPAINT_PROMPTS:
        raise OmniditError(f"unknown inpainting prompt '{inpaint_prompt}'", hint=f"choose {', '.join(INPAINT_PROMPTS)}")
    if inpaint_prompt == "auto":
        inpaint_prompt = "object" if pipe.config.train.region_caption else "scene"
    cases = edit_cases(dc.width, dc.height, dc.held_out, limit or DEFAULT_CASES)
    cases += move_cases(dc.width, dc.height, dc.held_out, limit or DEFAULT_CASES, paste=True)
    categories = (*CATEGORIES, PASTE_MOVE)
    if layout_adapter(pipe.model) is not None:  # it can place the moved object
        cases += move_cases(dc.width, dc.height, dc.held_out, limit or DEFAULT_CASES)
        categories = (*categories, MOVE)
    seeds = _seeds(seed, len(cases) * n_per_prompt)
    settings = pipe.sampling_settings(**{k: sampling.get(k) for k in ("steps", "cfg", "shift")})
    until = DEFAULT_INJECT_UNTIL if inject_until is None else inject_until
    judged, exact, inpainted, psnrs = [], 0, 0, []
    for i, case in enumerate(tqdm(cases, desc="edit", unit="case", disable=not progress)):
        asked = asked_prompt(case, inpaint_prompt)
        if case["category"].startswith("edit_"):
            image = case["image"][None]
            edited = edit(pipe, image, case["source"], case["prompt"], settings["steps"], settings["cfg"],
                          inject_until=until, shift=settings["shift"])
            back = edit(pipe, image, case["source"], case["source"], settings["steps"], 1.0, inject_until=1.0,
                        shift=settings["shift"], mask=None)
            psnrs.append(float(10 * torch.log10(4 / ((back - image) ** 2).mean().clamp_min(1e-12))))
            results, case_seeds = edited, [None]
        else:
            case_seeds = seeds[i * n_per_prompt:(i + 1) * n_per_prompt]
            results = pipe.inpaint([asked] * n_per_prompt, case["image"], case["mask"], mode=inpaint_mode,
                                   seed=case_seeds, boxes=case.get("boxes"), **sampling)
        for result, k in zip(results, case_seeds):
            if k is not None:
                inpainted += 1
                exact += bool(torch.equal(result[:, ~case["mask"]], case["image"][:, ~case["mask"]]))
            passed, reason = judge_edit(case, result)
            judged.append(Judged(case["category"], asked, result, passed, reason, seed=k))
    overall, scores = _aggregate("edit", judged, categories)
    details = {"kept_exact": exact / max(1, inpainted), "inpaint_mode": resolve_mode(inpaint_mode, pipe.config),
               "reconstruction_psnr": sum(psnrs) / len(psnrs) if psnrs else None, "inject_until": until,
               "edit_mask": "auto", "edit_candidates": EDIT_CANDIDATES, "inpaint_prompt": inpaint_prompt}
    return EvalReport("edit", overall, scores, len(judged), None, judged=judged, details=details)
