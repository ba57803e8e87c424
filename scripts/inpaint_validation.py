"""Inpainting on edit cases drawn with data seeds other than the suite's, to choose settings without its seed.

    python scripts/inpaint_validation.py MODEL --data-seed 1234 4321 --prompt object --cfg 7 --moves

Each data seed draws the edit suite's recolour / replace / restore inpainting cases (``edit_suite.edit_cases``
with that seed, ``--limit`` per category) and, with ``--moves``, its move cases; every case is inpainted once at
the model's settings (``--cfg`` overrides the guidance scale; best of the model's ``sample.candidates``; the noise
seed is the case's index among its data seed's cases, inpaints first) and judged as the suite judges it.
``--prompt``: the scene's caption or the filled object's own (moves always take the scene's). Prints a table per
seed and in total, and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

from omnidit.errors import OmniditError


def inpaint_validation(model: str, data_seeds: list[int], prompt: str = "scene", cfg: float | None = None,
                       limit: int = 16, moves: bool = False) -> dict:
    """{"passed": {seed: {category: count}}, "cases": {seed: {category: count}}, "failures": [...]}."""
    from omnidit.evaluate.edit_suite import (
        EDIT_SEED,
        INPAINTS,
        PASTE_MOVE,
        asked_prompt,
        check_edit_model,
        edit_cases,
        judge_edit,
        move_cases,
    )
    from omnidit.pipeline import load_pipeline

    if prompt not in ("scene", "object"):
        raise OmniditError(f"unknown prompt '{prompt}'", hint="choose scene or object")
    suites = {EDIT_SEED, EDIT_SEED - 1}  # a seed's moves are drawn with seed + 1
    if suites & set(data_seeds):
        raise OmniditError(f"data seeds {EDIT_SEED - 1} and {EDIT_SEED} draw the suite's own cases",
                           hint="validate on other seeds, e.g. 1234 4321")
    data_seeds = list(dict.fromkeys(data_seeds))  # each once
    pipe = load_pipeline(model, device="cpu")
    check_edit_model(pipe)
    dc = pipe.config.data
    extra = {} if cfg is None else {"cfg": cfg}
    categories = (*INPAINTS, PASTE_MOVE) if moves else INPAINTS
    passed = {seed: dict.fromkeys(categories, 0) for seed in data_seeds}
    cases_per = {seed: dict.fromkeys(categories, 0) for seed in data_seeds}
    failures = []
    for seed in data_seeds:
        cases = [c for c in edit_cases(dc.width, dc.height, dc.held_out, limit, data_seed=seed)
                 if c["category"] in INPAINTS]
        if moves:
            cases += move_cases(dc.width, dc.height, dc.held_out, limit, paste=True, data_seed=seed)
        for i, case in enumerate(cases):
            asked = asked_prompt(case, prompt)
            result = pipe.inpaint([asked], case["image"], case["mask"], seed=[i], **extra)[0]
            ok, reason = judge_edit(case, result)
            passed[seed][case["category"]] += ok
            cases_per[seed][case["category"]] += 1
            if not ok:
                failures.append({"data_seed": seed, "category": case["category"], "prompt": asked, "reason": reason})
    return {"passed": passed, "cases": cases_per, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model folder or shipped name")
    parser.add_argument("--data-seed", type=int, nargs="+", default=[1234, 4321],
                        help="data seeds of the cases (default: 1234 4321; the suite's is 7777)")
    parser.add_argument("--prompt", choices=["scene", "object"], default="scene",
                        help="ask for the whole scene's caption or the filled object's own (default: scene)")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--limit", type=int, default=16, help="cases per category and seed (default: 16)")
    parser.add_argument("--moves", action="store_true", help="also the move category (the hole a move leaves)")
    parser.add_argument("--json", default=None, help="write the scores and failures here")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        if args.limit < 1:
            raise OmniditError(f"--limit must be >= 1, got {args.limit}")
        report = inpaint_validation(args.model, args.data_seed, args.prompt, args.cfg, args.limit, args.moves)
    except OmniditError as e:
        print(f"inpaint_validation: error: {e}", file=sys.stderr)
        return 2
    passed, cases = report["passed"], report["cases"]
    categories = list(next(iter(passed.values())))
    total = {c: sum(p[c] for p in passed.values()) for c in categories}
    count = {c: sum(n[c] for n in cases.values()) for c in categories}
    print(f"{'data seed':<10}" + "".join(f"{c:>18}" for c in categories))
    for seed in passed:
        print(f"{seed:<10}" + "".join(f"{passed[seed][c]:>15}/{cases[seed][c]:<2}" for c in categories))
    print(f"{'total':<10}" + "".join(f"{total[c]:>15}/{count[c]:<2}" for c in categories))
    if args.json:
        command = ["python", "scripts/inpaint_validation.py", args.model, "--data-seed", *map(str, args.data_seed),
                   "--prompt", args.prompt, "--limit", str(args.limit)]
        command += (["--cfg", str(args.cfg)] if args.cfg is not None else []) + (["--moves"] if args.moves else [])
        with open(args.json, "w") as f:
            json.dump({"command": shlex.join(command), "total": total, "cases": count,
                       "passed": {str(s): p for s, p in passed.items()}, "seconds": round(time.time() - start, 1),
                       "failures": report["failures"]}, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
