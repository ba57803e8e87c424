"""Which of the model's own scores picks the best of N samples? Best-of-N on the shapes suite.

The suite is sampled once per noise seed (plain sampling, one candidate), every image is judged by the
detector and scored by the model under three rules (omnidit.selection's fixed times and noise):

- cond: the mean velocity error under the image's prompt (omnidit.selection, what ``--candidates`` uses);
- uncond: the same under the empty prompt (how typical the image is, whatever was asked);
- diff: cond - uncond, the implicit classifier log p(c | x) of diffusion classifiers (lower = the prompt
  explains the image better than no prompt does).

Consecutive seeds form groups of N candidates per image; for each rule and N the script reports the
suite's score of the images the rule keeps, next to one candidate (the mean over the seeds) and the
oracle (an image slot passes if any candidate does). The detector only measures here: it never chooses.
The script scores the finished images (clamped to [-1, 1]); ``--candidates`` scores the sampler's output
before the clamp, so the two can pick differently for an image that leaves the range.

    python scripts/self_verifiers.py [--model DIR] [--seeds 1 2 3 4 5 6] [--n 2 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from omnidit.checkpoint import default_model_dir
from omnidit.errors import OmniditError
from omnidit.evaluate.runner import _aggregate, _generate, _judge_shapes, _seeds
from omnidit.evaluate.shapes_suite import CATEGORIES, build_prompts
from omnidit.pipeline import load_pipeline
from omnidit.selection import denoising_scores
from omnidit.tokens import image_position_ids, patchify

RULES = {"cond": lambda c, u: c, "uncond": lambda c, u: u, "diff": lambda c, u: c - u}


@torch.inference_mode()
def judge_and_score(pipe, seed: int, limit: int | None, n_per_prompt: int, batch_size: int = 64) -> dict:
    """One plain run of the suite: {"categories", "passed" (n,) bool, "cond" (n,), "uncond" (n,)}."""
    specs = build_prompts(seed=0, per_category=limit, held_out=pipe.config.data.held_out)
    expanded = [s for s in specs for _ in range(n_per_prompt)]
    prompts, seeds = [s.prompt for s in expanded], _seeds(seed, len(expanded))
    images = _generate(pipe, prompts, seeds, batch_size, False, candidates=1)
    passed = torch.tensor([_judge_shapes(s, im, im, seed=k).passed for s, im, k in zip(expanded, images, seeds)])
    mc = pipe.model.config
    ids = image_position_ids(images.shape[2] // mc.patch_size, images.shape[3] // mc.patch_size, len(mc.axes_dim))
    model_fn = lambda x, t, c: pipe.model(x, ids, t, c)  # noqa: E731
    cond, uncond = [], []
    for start in range(0, len(prompts), batch_size):
        x0 = patchify(images[start:start + batch_size], mc.patch_size)
        c, null = pipe.conditions(prompts[start:start + batch_size])
        cond.append(denoising_scores(model_fn, x0, c.without_full_mask()))
        uncond.append(denoising_scores(model_fn, x0, null.repeat(len(x0)).without_full_mask()))
    return {"categories": [s.category for s in expanded], "passed": passed, "cond": torch.cat(cond),
            "uncond": torch.cat(uncond)}


def suite_score(categories: list[str], passed: torch.Tensor) -> tuple[float, dict[str, float]]:
    """(overall, per category) as ``omnidit eval`` aggregates them."""
    judged = [SimpleNamespace(category=c, passed=bool(p)) for c, p in zip(categories, passed)]
    return _aggregate("shapes", judged, CATEGORIES)


def best_of(runs: list[dict], group: list[int], rule: str) -> torch.Tensor:
    """(n,) the verdicts of the images ``rule`` keeps among the runs in ``group``."""
    scores = torch.stack([RULES[rule](runs[i]["cond"], runs[i]["uncond"]) for i in group])  # (N, n)
    passed = torch.stack([runs[i]["passed"] for i in group])
    return passed.gather(0, scores.argmin(0, keepdim=True))[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model or run folder (default: the shipped model)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6], help="noise seeds, one run each")
    p.add_argument("--n", type=int, nargs="+", default=[2, 3], help="candidates per image (consecutive seeds)")
    p.add_argument("--n-per-prompt", type=int, default=4)
    p.add_argument("--limit", type=int, default=None, help="prompts per category (default: the whole suite)")
    p.add_argument("--json", default=None, help="write the table here")
    args = p.parse_args(argv)
    try:
        if any(n < 1 or n > len(args.seeds) for n in args.n):
            raise OmniditError(f"--n must lie in 1..{len(args.seeds)} (the number of --seeds)")
        pipe = load_pipeline(args.model or default_model_dir(), device="cpu")
        if pipe.config.data.name != "shapes":
            raise OmniditError(f"this model draws '{pipe.config.data.name}', not shapes",
                               hint="pass a shapes model, or leave --model out for the shipped one")
        runs = []
        for s in args.seeds:
            runs.append(judge_and_score(pipe, s, args.limit, args.n_per_prompt))
            print(f"seed {s}: {suite_score(runs[-1]['categories'], runs[-1]['passed'])[0]:.3f}", file=sys.stderr)
    except OmniditError as e:
        print(f"self_verifiers: error: {e}", file=sys.stderr)
        return 2
    cats = runs[0]["categories"]
    rows = {"one candidate (mean over seeds)": [suite_score(cats, r["passed"])[0] for r in runs]}
    for n in args.n:
        groups = [list(range(i, i + n)) for i in range(0, len(runs) - n + 1, n)]
        rows[f"oracle, best of {n}"] = [suite_score(cats, torch.stack([runs[i]["passed"] for i in g]).any(0))[0]
                                        for g in groups]
        for rule in RULES:
            rows[f"{rule}, best of {n}"] = [suite_score(cats, best_of(runs, g, rule))[0] for g in groups]
    print(f"{'selection':34s} {'mean':>6s}  per group")
    for name, values in rows.items():
        print(f"{name:34s} {sum(values) / len(values):6.3f}  " + " ".join(f"{v:.3f}" for v in values))
    if args.json:
        Path(args.json).write_text(json.dumps({"seeds": args.seeds, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
