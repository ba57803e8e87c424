"""Datasets with one interface: ``ds[i] -> {"image": (C, H, W) in [-1, 1], "caption": str, "label": int}``,
or for clips ``{"video": (C, T, H, W) in [-1, 1], ...}``; data with sound add ``"audio": (1, S)`` in [-1, 1]
(bounce), and sound-only data (tones) have ``"audio"`` and no picture.

Every dataset also exposes ``num_samples`` (None = infinite), ``channels``, ``height``, ``width`` and
``num_classes`` (0 = no classes; then ``label`` is -1); clip datasets also ``frames`` and ``fps``; data with
sound ``sample_rate``, ``samples`` (per clip) and ``streams``, the generated streams an item fills (``streams(ds)``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import torch
from torch import Tensor

from omnidit.data import digits, shapes, shapes_video, tones
from omnidit.data.digits import DIGIT_NAMES, DigitsDataset
from omnidit.data.imagefolder import ImageFolderDataset
from omnidit.data.shapes import (
    COLOURS,
    DEFAULT_HELD_OUT,
    RELATIONS,
    SCENE_KINDS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    ShapesDataset,
    parse_held_out,
    render_scene,
)
from omnidit.errors import OmniditError

DATASETS = ("shapes", "shapes_video", "bounce", "tones", "digits", "imagefolder")
SPLITS = ("train", "test", "all")


def caption_vocabulary(name: str, mix_name: str = "") -> frozenset[str] | None:
    """Every word the captions of built-in data set ``name`` (and of ``mix_name``, mixed into it) can contain;
    None for data with open captions (imagefolder)."""
    if mix_name:
        parts = caption_vocabulary(name), caption_vocabulary(mix_name)
        return None if None in parts else parts[0] | parts[1]
    return {"shapes": shapes.VOCABULARY, "shapes_video": shapes_video.VOCABULARY, "bounce": shapes_video.VOCABULARY,
            "tones": tones.VOCABULARY, "digits": digits.VOCABULARY}.get(name)


def streams(ds) -> tuple[str, ...]:
    """The generated streams an item of ``ds`` fills, in the model's order: ("img",), ("img", "audio") for clips
    with sound, ("audio",) for sound alone."""
    return tuple(getattr(ds, "streams", ("img",)))


class ImageDataset(Protocol):
    """What training and evaluation code may rely on."""

    num_samples: int | None
    channels: int
    height: int
    width: int
    num_classes: int

    def __getitem__(self, index: int) -> dict: ...


def build_dataset(
    name: str,
    width: int,
    height: int,
    seed: int = 0,
    path: str = "",
    held_out: Sequence[str] | str = (),
    split: str = "train",
    scene_kinds: dict[str, float] | None = None,
    counterfactuals: Sequence[str] = ("relation",),
    counterfactual_directions: str = "any",
    frames: int = 1,
    fps: float = 8.0,
    sample_rate: int = 8000,
    seconds: float = 2.0,
    new_shapes: Sequence[str] = (),
    new_shape_weight: float = 1.0,
    pair_weights: Mapping[str, float] | None = None,
) -> ImageDataset:
    """Build a dataset by name.

    ``held_out`` ("red triangle", ...) is validated for every dataset but only shapes uses it;
    ``split`` selects the digits split ("train" | "test" | "all"); ``path`` is the imagefolder root;
    ``scene_kinds`` (shapes only) weights the scene kinds, None or {} meaning the default mix;
    ``counterfactuals`` (shapes only) names the facts a counterfactual partner changes;
    ``counterfactual_directions`` (shapes_video only) the directions a clip's partner may take; ``frames`` and
    ``fps`` size the clips of shapes_video and bounce; ``sample_rate`` is the sound's (bounce, tones) and
    ``seconds`` the length of a tones clip; ``new_shapes`` (shapes only): shapes of NEW_SHAPES drawn too, each
    colour-shape pair with ``new_shape_weight`` times a known pair's weight; ``pair_weights`` ({"pink cross": 3}, shapes
    only) multiplies named pairs' weights further.
    """
    if name not in DATASETS:
        raise OmniditError(f"unknown dataset {name!r}", hint=f"choose one of: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise OmniditError(f"unknown split {split!r}", hint=f"choose one of: {', '.join(SPLITS)}")
    parse_held_out(held_out)  # validate even where unused, so a typo never passes silently
    if name == "shapes":
        return ShapesDataset(width, height, seed=seed, held_out=held_out, kinds=scene_kinds or None,
                             counterfactuals=counterfactuals, new_shapes=new_shapes,
                             new_shape_weight=new_shape_weight, pair_weights=pair_weights)
    if name == "shapes_video":
        from omnidit.data.shapes_video import ShapesVideoDataset

        return ShapesVideoDataset(width, height, frames=frames, fps=fps, seed=seed, held_out=held_out,
                                  counterfactual_directions=counterfactual_directions)
    if name == "bounce":
        from omnidit.data.bounce import BounceDataset

        return BounceDataset(width, height, frames=frames, fps=fps, sample_rate=sample_rate, seed=seed,
                             held_out=held_out)
    if name == "tones":
        return tones.ToneDataset(seconds, sample_rate, seed=seed)
    if name == "digits":
        return DigitsDataset(width, height, split=split, seed=seed)
    if not path:
        raise OmniditError("the imagefolder dataset needs a path", hint="set data.path=/path/to/images")
    return ImageFolderDataset(path, width, height)


def batch_from_indices(ds: ImageDataset, indices: Iterable[int]) -> tuple[Tensor, list[str], Tensor]:
    """Collate ``ds[i]`` for ``indices`` -> (images (B, C, H, W) or clips (B, C, T, H, W), captions [B],
    labels (B,) int64). Sound-only items give their sound (B, 1, S) in the first place."""
    data, captions, labels = batch_streams(ds, indices)
    return data["img" if "img" in data else "audio"], captions, labels


def batch_streams(ds: ImageDataset, indices: Iterable[int]) -> tuple[dict[str, Tensor], list[str], Tensor]:
    """Collate ``ds[i]`` for ``indices`` by stream -> ({"img": (B, C, H, W) or (B, C, T, H, W), "audio":
    (B, 1, S)}, the streams the items have; captions [B]; labels (B,) int64)."""
    items = [ds[int(i)] for i in indices]
    if not items:
        raise ValueError("batch_from_indices needs at least one index")
    return _collate_streams(items)


def _collate_streams(items: Sequence[dict]) -> tuple[dict[str, Tensor], list[str], Tensor]:
    """Items -> ({"img": (B, C, H, W) or (B, C, T, H, W), "audio": (B, 1, S)}, as the first item has them;
    captions [B]; labels (B,) int64)."""
    data = {}
    if "audio" not in items[0] or "video" in items[0]:
        data["img"] = torch.stack([it["video"] if "video" in it else it["image"] for it in items])
    if "audio" in items[0]:
        data["audio"] = torch.stack([it["audio"] for it in items])
    labels = torch.tensor([it["label"] for it in items], dtype=torch.long)
    return data, [it["caption"] for it in items], labels


def _partners(ds: ImageDataset, indices: Iterable[int]) -> tuple[list[int], list[dict]]:
    """(positions in ``indices`` whose item has a counterfactual partner, the partners ``ds.counterfactual(i)``)."""
    rows, items = [], []
    for row, i in enumerate(indices):
        item = ds.counterfactual(int(i))
        if item is not None:
            rows.append(row)
            items.append(item)
    return rows, items


def counterfactual_batch(ds: ImageDataset, indices: Sequence[int]) -> tuple[list[int], Tensor | None, list[str]]:
    """Counterfactual partners of ``ds[i]`` for ``indices`` (``ds.counterfactual(i)``: the same item
    with one fact of the caption changed, e.g. a relation reversed or a clip's direction) -> (rows: positions in
    ``indices`` that have one, images (R, C, H, W) or clips (R, C, T, H, W), or None when R = 0, captions [R])."""
    rows, items = _partners(ds, indices)
    if not items:
        return rows, None, []
    return rows, torch.stack([it["video"] if "video" in it else it["image"] for it in items]), \
        [it["caption"] for it in items]


def counterfactual_streams(ds: ImageDataset, indices: Sequence[int]
                           ) -> tuple[list[int], dict[str, Tensor] | None, list[str]]:
    """``counterfactual_batch`` collated by stream, as ``batch_streams`` does: (rows, {name: (R, ...)} or None
    when R = 0, captions [R]); e.g. a tones clip with one beep dropped or changed."""
    rows, items = _partners(ds, indices)
    if not items:
        return rows, None, []
    data, captions, _ = _collate_streams(items)
    return rows, data, captions


__all__ = [
    "COLOURS",
    "DATASETS",
    "DEFAULT_HELD_OUT",
    "DIGIT_NAMES",
    "RELATIONS",
    "SCENE_KINDS",
    "SHAPES",
    "SIZES",
    "DigitsDataset",
    "ImageDataset",
    "ImageFolderDataset",
    "Scene",
    "ShapeObject",
    "ShapesDataset",
    "batch_from_indices",
    "batch_streams",
    "build_dataset",
    "counterfactual_batch",
    "counterfactual_streams",
    "parse_held_out",
    "render_scene",
    "streams",
]
