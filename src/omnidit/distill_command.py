"""The ``omnidit distill`` command line (the work is in omnidit.distill_train)."""

from __future__ import annotations


def add_distill_parser(sub) -> None:
    from omnidit.config import DISTILL_METHODS

    p = sub.add_parser("distill", help="distil a model into a student that needs fewer forward passes",
                       description="Train a student from TEACHER's weights toward the teacher, with the trainer's "
                                   "checkpoints, curves and exact resume (run it again to continue). guidance: one "
                                   "pass per step instead of the guided pair, the scale an input; progressive: "
                                   "halve the steps stage by stage down to distill.student_steps; dmd: distribution "
                                   "matching for 1-4 steps. The student is an ordinary model folder in OUT "
                                   "(generate, eval, convert and quantize take it). docs/distillation.md.")
    p.add_argument("teacher", help="the teacher: a model, run or checkpoint folder, or a shipped name (shapes)")
    p.add_argument("out", help="the run folder of the student (train.out_dir)")
    p.add_argument("--method", required=True, choices=DISTILL_METHODS, help="the distillation method")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override the student's config, e.g. train.steps=500 distill.student_steps=2")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")


def cmd_distill(args) -> None:
    from omnidit.distill_train import distill, student_config

    config = student_config(args.teacher, args.out, args.method, args.overrides)
    final = distill(config, progress=not args.no_progress)
    print(f"saved {final}")
