"""The ``omnidit distill`` command line (the work is in omnidit.distill_train)."""

from __future__ import annotations

from pathlib import Path


def add_distill_parser(sub) -> None:
    from omnidit.config import DISTILL_METHODS

    p = sub.add_parser("distill", help="distil a model into a student that needs fewer forward passes",
                       description="Train a student from TEACHER's weights toward the teacher, with the trainer's "
                                   "checkpoints, curves and exact resume (run it again to continue). guidance: one "
                                   "pass per step instead of the guided pair, the scale an input; progressive: "
                                   "halve the steps stage by stage down to distill.student_steps; dmd: distribution "
                                   "matching for 1-4 steps; regression: the student's 1-4 steps from a noise land on "
                                   "the teacher's sample from it (distill.pairs samples drawn once). The student is an "
                                   "ordinary model folder in OUT "
                                   "(generate, eval, convert and quantize take it). docs/distillation.md.")
    p.add_argument("teacher", help="the teacher: a model, run or checkpoint folder, or a shipped name (shapes)")
    p.add_argument("out", help="the run folder of the student (train.out_dir)")
    p.add_argument("--method", choices=DISTILL_METHODS, help="the distillation method (or --recipe)")
    p.add_argument("--recipe", default=None, metavar="JSON",
                   help="run several distillations in order, each in OUT/NAME (e.g. configs/recipes/turbo.json, "
                        "shapes-turbo's); overrides apply to every stage")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override the student's config, e.g. train.steps=500 distill.student_steps=2 "
                        "(model.depth / model.depth_single: a student deeper than its teacher)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")


def cmd_distill(args) -> None:
    from omnidit.distill_train import distill, read_recipe, student_config
    from omnidit.errors import OmniditError

    if (args.method is None) == (args.recipe is None):
        raise OmniditError("omnidit distill needs --method or --recipe (one of them)",
                           hint="e.g. --method guidance, or --recipe configs/recipes/turbo.json")
    if args.method:
        stages = [(args.out, args.method, args.teacher, [])]
    else:
        stages = read_recipe(args.recipe, args.teacher, args.out)
    # Every stage's config first: a mistake in the last stage stops the recipe before anything trains.
    for out, method, teacher, overrides in stages:
        if teacher == args.teacher or Path(teacher).exists():  # the later stages' teachers do not exist yet
            student_config(teacher, out, method, [*overrides, *args.overrides])
    for out, method, teacher, overrides in stages:
        final = distill(student_config(teacher, out, method, [*overrides, *args.overrides]),
                        progress=not args.no_progress)
        print(f"saved {final}")
