"""Video -> audio under two guidance rules, judged by the av suite's sync judge (docs/av_model.md).

    python scripts/av_guidance.py shapes-av --seed 1 --limit 24 --json av_guidance.json

For each sound guidance scale, the suite's video -> audio direction (the scenes and seeds that
``omnidit eval --suite av --seed SEED --limit LIMIT`` draws) is sampled twice:

- ``text``: as shipped: the guidance's null branch drops the caption and keeps the given video;
- ``text+video``: the null branch also loses the given video (its tokens are noise at t = 1, as the model saw them
  when the streams' times were drawn independently), so guidance also pushes the sound toward the video.

Each row reports the bounces heard within one frame, and the missing and extra beeps: a rule that matches more
bounces only by beeping more often is not in sync. This is a measuring script, not a sampling option.
"""

from __future__ import annotations

import argparse
import json

import torch

from omnidit.condition import Condition
from omnidit.evaluate import av_suite
from omnidit.pipeline import load_pipeline


class NullLosesVideo(torch.nn.Module):
    """The model, except that in a guided call (batch 2B: B conditioned rows, then B null rows) the null rows'
    video tokens are replaced by fixed noise at t = 1. Every call must be such a guided call: ``check_settings``
    refuses the settings under which the sampler also makes other calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.autocast_dtype = getattr(model, "autocast_dtype", None)

    def forward(self, x, ids, t, cond: Condition, **kw):
        if not isinstance(t, dict) or "img" not in x or kw.get("skip_single") or x["img"].shape[0] % 2:
            raise RuntimeError("NullLosesVideo expects only guided video -> audio calls")
        img = x["img"]
        b = img.shape[0] // 2
        noise = torch.randn(img[b:].shape, generator=torch.Generator().manual_seed(1234)).to(img)
        x = {**x, "img": torch.cat([img[:b], noise])}
        times = {n: v.expand(img.shape[0], -1) if v.dim() == 2 else v for n, v in t.items()}
        times["img"] = torch.cat([times["img"][:b], torch.ones_like(times["img"][b:])])
        return self.model(x, ids, times, cond, **kw)


def check_settings(pipe) -> None:
    """Refuse sampling settings with calls other than the guided pair: skip-layer guidance, guidance limited to
    an interval, or no guidance of the picture (its scale 1)."""
    sc = pipe.config.sample
    if sc.skip_scale or tuple(sc.cfg_interval) != (0.0, 1.0) or sc.cfg == 1:
        raise SystemExit("av_guidance.py: the model's sampling settings make unguided calls (skip-layer guidance, "
                         "a guidance interval or cfg 1); this script needs every step guided")


def _f(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def video_to_audio(pipe, seed: int, limit: int, cfg_audio: float) -> dict:
    report = av_suite.evaluate_av(pipe, seed=seed, limit=limit, progress=False, directions=("video_to_audio",),
                                  cfg_audio=cfg_audio)
    return report.details["directions"]["video_to_audio"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="shapes-av")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--text-scales", type=float, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--video-scales", type=float, nargs="+", default=[2, 4])
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    pipe = load_pipeline(args.model)
    check_settings(pipe)
    model = pipe.model
    rows = []
    for rule, scales in (("text", args.text_scales), ("text+video", args.video_scales)):
        pipe.model = model if rule == "text" else NullLosesVideo(model)
        for scale in scales:
            d = video_to_audio(pipe, args.seed, args.limit, scale)
            rows.append({"rule": rule, "cfg_audio": scale, **d})
            print(f"{rule:11s} cfg_audio {scale:4g}: {_f(d['sync_within_one_frame'])} of {d['bounces']} bounces "
                  f"within a frame, {d['missing']} missing, {d['extra']} extra beeps, pitch {_f(d['pitch_match'])}",
                  flush=True)
            if args.json:  # after every row, so that an interrupted run keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"model": args.model, "seed": args.seed, "limit": args.limit, "rows": rows}, f,
                              indent=1)


if __name__ == "__main__":
    main()
