"""Does a shapes model read the relation words? The flow loss on relation scenes with the true
captions against the same scenes with the relation flipped ("above" <-> "below", "to the left of"
<-> "to the right of") or the two objects swapped, at fixed times t and fixed noise.

A model that places objects by their relation loses more with a wrong caption (a positive gap);
a gap near 0 means it ignores the relation, whatever the sampler does. The empty caption is the
reference for how much the caption helps at all.

    python scripts/relation_sensitivity.py [MODEL] [--scenes 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from omnidit.checkpoint import default_model_dir
from omnidit.data import batch_from_indices, build_dataset
from omnidit.flow import interpolate, velocity_target
from omnidit.pipeline import load_pipeline
from omnidit.tokens import image_position_ids, patchify

OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
            "below": "above"}
TIMES = (0.3, 0.6, 0.8, 0.9, 0.95, 0.98)


def _split(caption: str) -> tuple[str, str, str]:
    """'A <relation> B' -> (A, relation, B)."""
    for phrase in OPPOSITE:
        if f" {phrase} " in caption:
            a, b = caption.split(f" {phrase} ")
            return a, phrase, b
    raise ValueError(f"no relation in caption {caption!r}")


def caption_variants(caption: str) -> dict[str, str]:
    """The true caption, its relation flipped, its objects swapped, and the empty caption."""
    a, phrase, b = _split(caption)
    return {"true": caption, "flipped": f"{a} {OPPOSITE[phrase]} {b}", "swapped": f"{b} {phrase} {a}", "empty": ""}


@torch.no_grad()
def relation_sensitivity(model_dir: str | None = None, scenes: int = 256, seed: int = 77) -> dict:
    """{t: {variant: mean squared velocity error}} on ``scenes`` relation scenes (fresh data seed)."""
    pipe = load_pipeline(model_dir or default_model_dir(), device="cpu")
    model, cfg = pipe.model.float().eval(), pipe.config
    ds = build_dataset("shapes", cfg.data.width, cfg.data.height, seed=seed, held_out=cfg.data.held_out,
                       scene_kinds={"relation": 1.0})
    images, captions, _ = batch_from_indices(ds, range(scenes))
    p = cfg.model.patch_size
    ids = image_position_ids(cfg.data.height // p, cfg.data.width // p, len(cfg.model.axes_dim))
    x0 = patchify(images, p)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    variants = [caption_variants(c) for c in captions]
    conds = {name: pipe.text_encoder.encode([v[name] for v in variants]) for name in variants[0]}
    out = {}
    for t in TIMES:
        tt = torch.full((scenes,), t)
        x_t, target = interpolate(x0, noise, tt), velocity_target(x0, noise)
        out[t] = {name: (model(x_t, ids, tt, c) - target).pow(2).mean().item() for name, c in conds.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="model folder (default: the shipped model)")
    ap.add_argument("--scenes", type=int, default=256, help="relation scenes to average over (default 256)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    result = relation_sensitivity(args.model, args.scenes)
    print(f"{'t':>5}  {'true':>8}  {'flipped':>13}  {'swapped':>13}  {'empty caption':>14}")
    for t, r in result.items():
        rel = {k: f"{r[k]:.5f} {100 * (r[k] / r['true'] - 1):+5.1f}%" for k in ("flipped", "swapped", "empty")}
        print(f"{t:5.2f}  {r['true']:.5f}  {rel['flipped']:>13}  {rel['swapped']:>13}  {rel['empty']:>14}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model or "shipped", "scenes": args.scenes,
                       "loss": {str(t): r for t, r in result.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
