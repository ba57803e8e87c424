"""Does a video model move objects the way the caption says? One prompt per direction ("a red circle moving
to the right", ...), drawn from the same seeds 0..N-1 for every direction, and the first direction of motion
that the video suite's tracker reads from each clip. A model that ignores the caption's direction moves each
seed's object the same way whatever the prompt: the columns of the table repeat.

    python scripts/direction_probe.py MODEL [--n 8] [--cfg S] [--negative "a red circle"] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from omnidit.data.shapes_video import DIRECTION_PHRASES, DIRECTIONS
from omnidit.evaluate.tracker import detect_clip, initial_motion, link, max_step
from omnidit.pipeline import load_pipeline


def first_direction(clip, fps: float) -> str:
    """The first direction of the longest track of a clip, or "none"."""
    detections, (w, h) = detect_clip(clip)
    tracks = [t for t in link(detections, max_step(fps, min(w, h))) if len(t.frames) >= 4]
    if not tracks:
        return "none"
    track = max(tracks, key=lambda t: len(t.frames))
    centres = np.array([[(d.box[0] + d.box[2]) / 2 * w, (d.box[1] + d.box[3]) / 2 * h] for d in track.detections])
    return str(initial_motion(centres, fps, min(w, h))[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--n", type=int, default=8, help="seeds per direction (default: 8)")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--negative", default="",
                        help="negative prompt, e.g. the object alone (\"a red circle\"), meant to aim guidance at the "
                             "motion words (it moved fewer clips the captioned way: docs/video_model.md); default: "
                             "none, the empty caption")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    pipe = load_pipeline(args.model, device="cpu")
    fps = pipe.config.data.fps
    table = {}
    for direction in DIRECTIONS:
        prompt = f"a red circle moving {DIRECTION_PHRASES[direction][0]}"
        clips = pipe.generate_video([prompt] * args.n, seed=list(range(args.n)), cfg=args.cfg,
                                   negative_prompt=args.negative)
        table[direction] = [first_direction(c, fps) for c in clips]
        print(f"{direction:>22}: {sum(d == direction for d in table[direction])}/{args.n} right; "
              f"{', '.join(table[direction])}", flush=True)
    right = sum(d == k for k, row in table.items() for d in row)
    total = args.n * len(DIRECTIONS)
    print(f"right first direction: {right}/{total} ({right / total:.2f}; chance 0.125)")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "negative": args.negative, "right": right,
                                               "total": total, "table": table}, indent=2))


if __name__ == "__main__":
    main()
