"""Recolour ground-truth clips with a video model and judge the results with the video suite's judge.

    python scripts/clip_edits.py --model shapes-video --cases 8 --prompt-seed 1234

Each case is a single-object prompt of the video suite (drawn with ``--prompt-seed``, not the suite's seed 0), its
ground-truth clip (``video_suite.reference_scene``) and the same caption with the object's colour changed (a
seeded choice); ``omnidit.editing.edit`` changes the clip at the model's defaults (automatic mask, best of
``EDIT_CANDIDATES``) and the edited clip passes when the judge finds the new colour and shape in every frame with
the motion the caption names (docs/editing.md, "Clips").
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import replace

import numpy as np


def recolour_cases(cases: int, prompt_seed: int, width: int, height: int, frames: int, fps: float) -> list[dict]:
    """``cases`` cases: {"source", "target" (captions), "specs" (what the edited clip must show), "clip"
    (3, T, H, W) in [-1, 1]}."""
    from omnidit.data.shapes import COLOURS, _article
    from omnidit.data.shapes_video import render_video, video_tensor
    from omnidit.evaluate.video_suite import reference_scene, suite_prompts

    prompts = [p for p in suite_prompts(seed=prompt_seed) if p.category == "single_object"][:cases]
    rng = np.random.default_rng(prompt_seed)
    out = []
    for p in prompts:
        old = p.objects[0].colour
        new = [c for c in COLOURS if c != old][rng.integers(len(COLOURS) - 1)]
        scene = reference_scene(p, width, height, frames, fps)
        target = re.sub(rf"\b(an?) ({old})\b", f"{_article(new)} {new}", p.prompt, count=1)  # "a red" -> "an orange"
        target = target if target != p.prompt else p.prompt.replace(old, new, 1)  # "A red ..." at the start
        out.append({"source": p.prompt, "target": target,
                    "specs": (replace(p.objects[0], colour=new),),
                    "clip": video_tensor(render_video(scene, frames, width, height, fps))})
    return out


def main(argv: list[str] | None = None) -> dict:
    from omnidit.editing import edit
    from omnidit.evaluate.video_suite import judge_clip
    from omnidit.pipeline import load_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-video", help="a video model (default: shapes-video)")
    parser.add_argument("--cases", type=int, default=8, help="clips to recolour (default: 8)")
    parser.add_argument("--prompt-seed", type=int, default=1234, help="the video suite prompts' seed (default: 1234)")
    parser.add_argument("--steps", type=int, default=None, help="edit steps (default: the model's)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model, device="cpu")
    dc, s = pipe.config.data, pipe.config.sample
    started, results = time.perf_counter(), []
    for case in recolour_cases(args.cases, args.prompt_seed, dc.width, dc.height, dc.frames, dc.fps):
        given_right = judge_clip(case["clip"], case["source"], dc.fps)[0]
        edited = edit(pipe, case["clip"][None], case["source"], case["target"], args.steps or s.steps, s.cfg)[0]
        passed, reason = judge_clip(edited, case["specs"], dc.fps)
        results.append({"source": case["source"], "target": case["target"], "given_right": given_right,
                        "passed": passed, "reason": reason})
        print(f"{'pass' if passed else 'FAIL'}  {case['source']} -> {case['target']}  {reason}")
    report = {"model": args.model, "cases": len(results), "prompt_seed": args.prompt_seed,
              "passed": sum(r["passed"] for r in results), "given_right": sum(r["given_right"] for r in results),
              "seconds_per_clip": (time.perf_counter() - started) / max(1, len(results)), "results": results}
    print(f"{report['passed']} of {report['cases']} edited clips right (ground truth right: {report['given_right']}); "
          f"{report['seconds_per_clip']:.1f} s per clip")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
