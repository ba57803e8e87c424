"""Other forms of classifier-free guidance on the shapes suite, against the library's plain guidance.

Each variant replaces v = v_uncond + cfg (v_cond - v_uncond) and keeps everything else of the sampling
(steps, shift, and skip-layer guidance as the model's config or the --skip-* flags set it):

- rescale ARG: "guidance rescale" (Lin et al. 2024), the guided velocity scaled to the per-image standard
  deviation of v_cond and mixed with the plain one: ARG * v * std(v_cond) / std(v) + (1 - ARG) * v;
- apg ARG: adaptive projected guidance (Sadat et al. 2024) in the clean-image space x0 = x - t v: the part
  of the guidance x0_cond - x0_uncond along x0_cond is kept ARG times (0 drops it), the rest in full;
- cfg_zero: CFG-Zero*'s optimised scale (Fan et al. 2025), v_uncond scaled by <v_cond, v_uncond> /
  |v_uncond|^2 first (the paper's other part, a zero velocity for the first steps, is left out);
- early ARG: guidance ARG at the high noise levels t >= --t-from (0.7), where a clip's layout and first motion
  are set, and the model's own scale below (the opposite of a guidance interval, which drops guidance there);
- plain: the library's guidance, for checking that this script reproduces ``omnidit eval``.

The variant goes in through classifier_free_guidance's ``combine`` argument, so the guidance interval and
skip-layer guidance work exactly as in the library.

They did not beat plain guidance on the shipped model (docs/default_model.md, "Other forms of guidance"), so
they stay here rather than in omnidit.sampling. "early" on shapes-video: docs/video_model.md, "Guidance aimed at
the motion".

    python scripts/guidance_variants.py VARIANT [--arg A] [--t-from T] [--suite shapes|video] [--model DIR]
        [--seed 1] [--limit N] [--json out.json] [--skip-scale S --skip-blocks I ... --skip-interval LO HI]
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from torch import Tensor

import omnidit.pipeline as pipeline_module
from omnidit.checkpoint import shipped_model_dir
from omnidit.errors import OmniditError
from omnidit.evaluate.runner import EvalReport, evaluate_model
from omnidit.sampling import classifier_free_guidance

VARIANTS = ("plain", "rescale", "apg", "cfg_zero", "early")
T_FROM = 0.7  # early: the default time from which its scale applies
SUITES = {"shapes": ("shapes", 4), "video": ("shapes-video", 1)}  # suite -> (default model, samples per prompt)


def _per_image(values: Tensor, like: Tensor) -> Tensor:
    """(B,) values shaped (B, 1, ..., 1) to broadcast against ``like``."""
    return values.view(-1, *[1] * (like.dim() - 1))


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-image inner product of (B, ...) tensors, shaped to broadcast."""
    return _per_image((a * b).flatten(1).sum(1), a)


def combine(variant: str, arg: float, x: Tensor, t: float, v_cond: Tensor, v_uncond: Tensor,
            scale: float, t_from: float = T_FROM) -> Tensor:
    """The guided velocity (B, N, D) from the conditional and unconditional ones at time t."""
    if variant == "early":
        variant, scale = "plain", arg if t >= t_from - 1e-6 else scale  # t may be a float32's 0.69999...
    if variant == "plain":
        return v_uncond + scale * (v_cond - v_uncond)
    if variant == "rescale":
        v = v_uncond + scale * (v_cond - v_uncond)
        ratio = _per_image(v_cond.flatten(1).std(1) / v.flatten(1).std(1).clamp_min(1e-8), v)
        return arg * v * ratio + (1 - arg) * v
    if variant == "apg":
        x0_cond, x0_uncond = x - t * v_cond, x - t * v_uncond
        diff = x0_cond - x0_uncond
        along = _dot(diff, x0_cond) / _dot(x0_cond, x0_cond).clamp_min(1e-8) * x0_cond
        x0 = x0_cond + (scale - 1) * (diff - along + arg * along)
        return (x - x0) / max(t, 1e-4)
    if variant == "cfg_zero":
        s = _dot(v_cond, v_uncond) / _dot(v_uncond, v_uncond).clamp_min(1e-8)
        return s * v_uncond + scale * (v_cond - s * v_uncond)
    raise OmniditError(f"unknown guidance variant '{variant}'", hint=f"choose one of {', '.join(VARIANTS)}")


def guidance_factory(variant: str, arg: float, t_from: float = T_FROM) -> Callable:
    """omnidit.sampling.classifier_free_guidance with its guidance rule replaced by ``variant``: the same
    arguments, guidance interval and skip-layer guidance."""

    def rule(x: Tensor, t: Tensor, v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
        return combine(variant, arg, x, float(t), v_cond, v_uncond, scale, t_from)

    return functools.partial(classifier_free_guidance, combine=rule)


def run(model: str, variant: str, arg: float, seed: int, n_per_prompt: int = 4, limit: int | None = None,
        progress: bool = True, suite: str = "shapes", t_from: float = T_FROM, **sampling) -> EvalReport:
    """The shapes or video suite (no Fréchet distance) with ``variant`` guidance; ``sampling``: Pipeline.generate's
    settings (skip_scale=..., ...), the model's config for those not given."""
    if variant == "early" and not (arg > 0 and 0 <= t_from <= 1):
        raise OmniditError(f"early needs a scale --arg > 0 and --t-from in [0, 1], got {arg} and {t_from}",
                           hint="e.g. early --arg 8 --t-from 0.7")
    original = pipeline_module.classifier_free_guidance
    pipeline_module.classifier_free_guidance = guidance_factory(variant, arg, t_from)
    try:
        pipe = pipeline_module.load_pipeline(model, device="cpu")
        report = evaluate_model(pipe, suite, n_per_prompt=n_per_prompt, seed=seed, limit=limit,
                                progress=progress, frechet=False, **sampling)
    finally:
        pipeline_module.classifier_free_guidance = original
    report.settings["guidance"] = {"variant": variant, "arg": arg}
    if variant == "early":
        report.settings["guidance"]["t_from"] = t_from
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--arg", type=float, default=0.0, help="rescale: the mix (0.7 in the paper); apg: how "
                        "much of the parallel part to keep (0); early: the scale at t >= --t-from; ignored otherwise")
    parser.add_argument("--t-from", type=float, default=T_FROM, metavar="T",
                        help=f"early: the time from which its scale applies, up to 1 (default: {T_FROM})")
    parser.add_argument("--suite", choices=tuple(SUITES), default="shapes",
                        help="the suite (default: shapes, 4 images per prompt; video: one clip per prompt)")
    parser.add_argument("--model", default=None, help="run or checkpoint folder, or a shipped model's name (default: "
                        "shapes for the shapes suite, shapes-video for the video suite)")
    parser.add_argument("--seed", type=int, default=1, help="noise seed (1: the validation run)")
    parser.add_argument("--limit", type=int, default=None, help="prompts per category (default: all)")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--skip-scale", type=float, default=None, metavar="S",
                        help="skip-layer guidance scale (default: the model's sample.skip_scale)")
    parser.add_argument("--skip-blocks", type=int, nargs="+", default=None, metavar="I",
                        help="single-stream blocks it leaves out (default: the model's sample.skip_blocks)")
    parser.add_argument("--skip-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="times at which it applies (default: the model's sample.skip_interval)")
    args = parser.parse_args(argv)
    try:
        default_model, n_per_prompt = SUITES[args.suite]
        report = run(args.model or str(shipped_model_dir(default_model)), args.variant, args.arg, args.seed,
                     n_per_prompt=n_per_prompt, limit=args.limit, suite=args.suite,
                     t_from=args.t_from, skip_scale=args.skip_scale, skip_blocks=args.skip_blocks,
                     skip_interval=args.skip_interval)
    except OmniditError as e:
        print(f"guidance_variants: error: {e}", file=sys.stderr)
        return 2
    print(report.table())
    if args.json:
        report.save(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
