"""Distilled students against their teacher in one run: the shapes suite (or the video suite, `--suite video`) per
category (the teacher at 1/2/4/8/30 steps with one candidate; each student at 1/2/4 steps and its own), and
images (clips) per second of each student at its own settings against the teacher's defaults (alternated, best of
three rounds, a warm-up first).

**Peer: internal** (the teacher itself, same prompts and seeds). Issue #31's targets: a 4-step student >= 0.88
overall, a 1-step student >= 0.75, the 4-step student >= 20x the images/s of the teacher's defaults.

Example:
    python benchmarks/distillation.py --student progressive=runs/shapes_pd --student dmd=runs/shapes_dmd
    python benchmarks/distillation.py --suite video --student progressive=runs/video_turbo/progressive
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from omnidit.evaluate.runner import evaluate_model
from omnidit.pipeline import load_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import run_meta, write_report  # noqa: E402

TEACHER_STEPS = (1, 2, 4, 8, 30)
STUDENT_STEPS = (1, 2, 4)
# Per suite: the default teacher and the 16 prompts of the speed comparison.
SUITES = {"shapes": ("shapes", ["a red circle above a blue square", "two green triangles", "a yellow diamond",
                                "a pink square to the left of a cyan circle"] * 4),
          "video": ("shapes-video", ["a red circle moving to the right", "a green triangle moving up slowly",
                                     "a yellow diamond moving down and to the left", "a blue square moving left"] * 4)}


def score(pipe, suite: str, limit: int | None, seed: int, **sampling) -> dict:
    report = evaluate_model(pipe, suite, limit=limit, seed=seed, progress=False, frechet=False, **sampling)
    return {"overall": report.overall, "categories": report.categories, "images": report.n_images,
            "settings": {k: report.settings[k] for k in ("steps", "cfg", "skip_scale", "candidates")}}


def images_per_second(pipes: dict, suite: str, rounds: int = 3) -> dict[str, float]:
    """Each pipeline at its own defaults on the suite's 16 speed prompts, alternated; best round of each. Images
    per second, or whole clips (the model's frames) per second for the video suite."""
    prompts = SUITES[suite][1]

    def draw(pipe, batch: list[str]):
        return pipe.generate_video(batch, seed=0) if suite == "video" else pipe.generate(batch, seed=0)

    best = {name: float("inf") for name in pipes}
    for pipe in pipes.values():  # warm-up
        draw(pipe, prompts[:2])
    for _ in range(rounds):
        for name, pipe in pipes.items():
            t0 = time.perf_counter()
            draw(pipe, prompts)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: len(prompts) / seconds for name, seconds in best.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="shapes", help="shapes (images) or video")
    p.add_argument("--teacher", default=None, help="default: shapes, or shapes-video for --suite video")
    p.add_argument("--student", action="append", default=[], metavar="NAME=DIR", help="a student folder (repeat)")
    p.add_argument("--limit", type=int, default=None, help="prompts per category (default: the whole suite)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/distillation.json"))
    p.add_argument("--no-teacher-scores", action="store_true", help="score the students only")
    p.add_argument("--no-speed", action="store_true", help="skip the images/s (clips/s) comparison")
    args = p.parse_args(argv)
    args.teacher = args.teacher or SUITES[args.suite][0]
    start = time.perf_counter()
    teacher = load_pipeline(args.teacher, device="cpu")
    students = {name: load_pipeline(path, device="cpu") for name, path in (s.split("=", 1) for s in args.student)}
    # The teacher's defaults (shapes: best of two at 30 steps, 0.923 on the whole suite, docs/default_model.md) are
    # the speed baseline below; their score is not re-measured here.
    rows = [] if args.no_teacher_scores else [
        {"model": "teacher", "label": f"{n} steps, one candidate",
         **score(teacher, args.suite, args.limit, args.seed, steps=n, candidates=1)} for n in TEACHER_STEPS]
    for name, pipe in students.items():
        steps = sorted({*STUDENT_STEPS, pipe.config.sample.steps})
        rows += [{"model": name, "label": f"{n} steps", **score(pipe, args.suite, args.limit, args.seed, steps=n)}
                 for n in steps]
        print(f"{name}: " + ", ".join(f"{r['label']} {r['overall']:.3f}" for r in rows if r["model"] == name),
              flush=True)
    speed = {} if args.no_speed else images_per_second({"teacher": teacher, **students}, args.suite)
    speedup = {k: v / speed["teacher"] for k, v in speed.items()} if speed else {}
    meta = run_meta("distillation.py", argv, torch.device("cpu"), start, teacher=args.teacher,
                    students=dict(s.split("=", 1) for s in args.student), suite=args.suite, limit=args.limit,
                    seed=args.seed, images_per_s=speed, speedup=speedup)
    categories = list(rows[0]["categories"])
    print(f"\n{meta['device_name']}, torch {meta['torch']}, {meta['threads']} threads; {args.suite} suite"
          + (f", {args.limit} prompts per category" if args.limit else "") + f", seed {args.seed}")
    print(f"{'model':<14} {'setting':<24} " + " ".join(f"{c[:8]:>8}" for c in categories) + f" {'overall':>8}")
    for r in rows:
        print(f"{r['model']:<14} {r['label']:<24} " + " ".join(f"{r['categories'][c]:>8.3f}" for c in categories)
              + f" {r['overall']:>8.3f}")
    if speed:
        unit = "clips/s" if args.suite == "video" else "images/s"
        print(f"\n{unit} at each model's own defaults: " + ", ".join(
            f"{k} {v:.1f} ({meta['speedup'][k]:.1f}x)" for k, v in speed.items()))
    write_report(args.json, meta, rows)


if __name__ == "__main__":
    main()
