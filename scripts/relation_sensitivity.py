"""Does a shapes model read the relation words? The flow loss on relation scenes with the true
captions against the same scenes with the caption changed, at fixed times t and fixed noise:

- flipped: the direction reversed ("above" <-> "below", "to the left of" <-> "to the right of");
- swapped: the two objects named in the other order (also a reversed direction);
- axis: the relation moved to the other axis ("to the left of" -> "above", "below" -> "to the right of");
- empty: no caption at all, for how much the caption helps in the first place.

A model that places objects by the relation loses more with a wrong caption (a positive gap); a gap
near 0 means it ignores that part of the caption, whatever the sampler does.

    python scripts/relation_sensitivity.py [MODEL] [--scenes 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from omnidit.checkpoint import default_model_dir
from omnidit.data import batch_from_indices, build_dataset
from omnidit.data.shapes import _RELATION_PHRASES, OPPOSITE_RELATION
from omnidit.errors import OmniditError
from omnidit.flow import training_loss
from omnidit.pipeline import load_pipeline
from omnidit.tokens import image_position_ids, patchify

OTHER_AXIS = {"left of": "above", "right of": "below", "above": "left of", "below": "right of"}
TIMES = (0.3, 0.6, 0.8, 0.9, 0.95, 0.98)


def caption_variants(caption: str) -> dict[str, str]:
    """'A <relation> B' -> the true caption, its relation flipped, its objects swapped, its relation on
    the other axis, and the empty caption."""
    phrase = _RELATION_PHRASES  # relation -> its words in captions, e.g. "left of" -> "to the left of"
    for relation, words in phrase.items():
        if f" {words} " in caption:
            a, b = caption.split(f" {words} ")
            return {"true": caption, "flipped": f"{a} {phrase[OPPOSITE_RELATION[relation]]} {b}",
                    "swapped": f"{b} {words} {a}", "axis": f"{a} {phrase[OTHER_AXIS[relation]]} {b}", "empty": ""}
    raise ValueError(f"no relation in caption {caption!r}")


@torch.no_grad()
def relation_sensitivity(model_dir: str | None = None, scenes: int = 256, seed: int = 77) -> dict:
    """{t: {variant: mean squared velocity error}} on ``scenes`` relation scenes (a fresh data seed)."""
    if int(scenes) < 1:
        raise OmniditError(f"--scenes must be >= 1, got {scenes}")
    pipe = load_pipeline(model_dir or default_model_dir(), device="cpu")
    cfg = pipe.config
    if cfg.data.name != "shapes" or pipe.text_encoder is None or cfg.data.codec != "identity":
        raise OmniditError(f"{model_dir} is not a text-conditional pixel-space shapes model "
                           f"(data.name={cfg.data.name}, text encoder: {pipe.text_encoder is not None}, "
                           f"codec: {cfg.data.codec})", hint="pass a model trained on the shapes data set")
    model = pipe.model.float().eval()
    ds = build_dataset("shapes", cfg.data.width, cfg.data.height, seed=seed, held_out=cfg.data.held_out,
                       scene_kinds={"relation": 1.0})
    images, captions, _ = batch_from_indices(ds, range(int(scenes)))
    p = cfg.model.patch_size
    ids = image_position_ids(cfg.data.height // p, cfg.data.width // p, len(cfg.model.axes_dim))
    x0 = patchify(images, p)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    variants = [caption_variants(c) for c in captions]
    conds = {name: pipe.text_encoder.encode([v[name] for v in variants]) for name in variants[0]}
    velocity = lambda x, t, c: model(x, ids, t, c)  # noqa: E731
    return {t: {name: training_loss(velocity, x0, c, torch.full((len(x0),), t), noise).item()
                for name, c in conds.items()} for t in TIMES}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="model folder (default: the shipped model)")
    ap.add_argument("--scenes", type=int, default=256, help="relation scenes to average over (default 256)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    try:
        result = relation_sensitivity(args.model, args.scenes)
    except OmniditError as e:
        print(f"relation_sensitivity: error: {e}", file=sys.stderr)
        return 2
    names = ("flipped", "swapped", "axis", "empty")
    print(f"{'t':>5}  {'true':>8}  " + "  ".join(f"{n:>14}" for n in names))
    for t, r in result.items():
        gaps = [f"{r[n]:.5f} {100 * (r[n] / r['true'] - 1):+5.1f}%" for n in names]
        print(f"{t:5.2f}  {r['true']:.5f}  " + "  ".join(f"{g:>14}" for g in gaps))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model or "shipped", "scenes": args.scenes,
                       "loss": {str(t): r for t, r in result.items()}}, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
