"""The new-shape suite: does a model draw a shape that the shipped models never saw (omnidit.data.shapes.NEW_SHAPES,
taught e.g. by a LoRA on data.new_shapes), in every colour? Judged by the detector with that shape added.

One prompt per colour, "a red cross", ``n_per_prompt`` images each: an image passes when the detector finds
exactly one object, of that shape and colour. Categories are the colours; ``overall`` is their mean.
"""

from __future__ import annotations

from omnidit.data.shapes import COLOURS, NEW_SHAPES, _article
from omnidit.errors import OmniditError


def new_shape_prompts(shape: str) -> list[tuple[str, str]]:
    """(colour, prompt) for every colour."""
    return [(c, f"{_article(c)} {c} {shape}") for c in COLOURS]


def judge_new_shape(shape: str, colour: str, image) -> tuple[bool, str]:
    """Whether ``image`` holds exactly one object, a ``colour`` ``shape``; else why not."""
    from omnidit.evaluate.detector import detect_objects

    found = detect_objects(image, new_shapes=(shape,))
    if len(found) == 1 and (found[0].shape, found[0].colour) == (shape, colour):
        return True, ""
    return False, f"found {', '.join(d.describe() for d in found) or 'nothing'}"


def evaluate_new_shape(pipe, n_per_prompt: int = 4, seed: int = 0, limit: int | None = None, batch_size: int = 64,
                       progress: bool = True, frechet: bool = False, **sampling):
    """The suite for the model's first data.new_shapes shape (default the first of NEW_SHAPES); ``limit``: the
    first ``limit`` colours. -> EvalReport (details: the shape)."""
    from omnidit.evaluate.runner import EvalReport, Judged, _aggregate, _generate, _seeds

    dc = pipe.config.data
    if dc.frames > 1 or pipe.model.config.extra_streams or dc.name != "shapes":
        raise OmniditError("the new-shape suite needs an image model of the shapes data",
                           hint="pass a shapes model, e.g. one with a LoRA trained on data.new_shapes")
    shape = (list(dc.new_shapes) or list(NEW_SHAPES))[0]
    prompts = new_shape_prompts(shape)[:limit]
    expanded = [(c, p) for c, p in prompts for _ in range(n_per_prompt)]
    seeds = _seeds(seed, len(expanded))
    images = _generate(pipe, [p for _, p in expanded], seeds, batch_size, progress, **sampling)
    judged = [Judged(c, p, image, *judge_new_shape(shape, c, image), seed=k)
              for (c, p), image, k in zip(expanded, images, seeds)]
    overall, scores = _aggregate("new_shape", judged, tuple(c for c, _ in prompts))
    return EvalReport("new_shape", overall, scores, len(judged), None, judged=judged, details={"shape": shape})
