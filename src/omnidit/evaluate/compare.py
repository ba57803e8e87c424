"""Is one eval report better than another beyond chance? A paired test on the images both judged.

Two runs of ``omnidit eval`` with the same suite, seed, limit and images per prompt judge the same (prompt, noise
seed) pairs, so their verdicts pair up image by image. Only the discordant images tell the runs apart: those
that fail in one run and pass in the other. Under the null hypothesis that the runs are equally good, each
discordant image is equally likely to fall either way, so their split is Binomial(n, 1/2), and the exact
two-sided McNemar p-value is the binomial tail on both sides (McNemar 1947; the exact form for small counts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from math import comb
from pathlib import Path

from omnidit.errors import OmniditError

# The settings that decide which images a run judges; two reports must agree on all of them to be paired.
PAIRING_KEYS = ("seed", "limit", "n_per_prompt", "held_out")
# The held-out pairs decide some prompts; reports written before they were recorded lack the key and pair with
# any report on trust: only the image counts and categories are checked then, so two such reports of models with
# other held-out pairs would pair wrongly.
RECORDED_LATER = ("held_out",)


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value for ``only_a`` images failing only in run A and ``only_b`` only in run B:
    P(a split at least as uneven) under Binomial(only_a + only_b, 1/2); 1 when there is no discordant image."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n)


@dataclass
class PairedComparison:
    """Two eval reports' verdicts paired image by image (``images`` judged by both)."""

    images: int
    overall: tuple[float, float]
    failed: tuple[int, int]  # failures in A, in B
    only_a: int  # failed in A, passed in B
    only_b: int
    both: int
    categories: dict[str, tuple[float, float]]

    @property
    def p_value(self) -> float:
        return mcnemar_p(self.only_a, self.only_b)


def _failure_keys(report: dict) -> set[tuple]:
    """The judged images that failed, each named by (category, prompt, noise seed or image file)."""
    return {(f["category"], f["prompt"], f.get("seed"), f.get("file")) for f in report["failures"]}


_SAME_IMAGES_HINT = "evaluate both with the same omnidit, suite, --seed, --limit and --n-per-prompt"
_AUDIO_HINT = ("the audio suite sets apart the captions a run never drew, so its prompts depend on the model's "
               "training data: compare runs that drew the same captions")


def _failed_prompts(report: dict) -> dict[tuple, str]:
    """{(category, noise seed, file): prompt} of the failed images that have a seed or a file."""
    return {(f["category"], f.get("seed"), f.get("file")): f["prompt"] for f in report["failures"]
            if f.get("seed") is not None or f.get("file") is not None}


def paired_comparison(a: dict, b: dict) -> PairedComparison:
    """``a``, ``b``: two eval reports as ``omnidit eval --json`` writes them, of the same suite and images."""
    if a["suite"] != b["suite"]:
        raise OmniditError(f"the reports are of different suites ({a['suite']} and {b['suite']})",
                           hint="compare two runs of the same suite")
    for key in PAIRING_KEYS:
        if key in RECORDED_LATER and not (key in a["settings"] and key in b["settings"]):
            continue
        left, right = a["settings"].get(key), b["settings"].get(key)
        if left != right:
            raise OmniditError(f"the reports did not judge the same images: {key} {left} and {right}",
                               hint="evaluate both with the same --seed, --limit and --n-per-prompt (and models "
                                    "with the same held-out pairs)")
    if a["n_images"] != b["n_images"]:
        raise OmniditError(f"the reports did not judge the same images ({a['n_images']} and {b['n_images']})",
                           hint="evaluate both with the same --seed, --limit and --n-per-prompt")
    if a["categories"].keys() != b["categories"].keys():
        raise OmniditError(f"the reports have different categories ({', '.join(a['categories'])} and "
                           f"{', '.join(b['categories'])})", hint="compare two runs of the same suite")
    hint = _AUDIO_HINT if a["suite"] == "audio" else _SAME_IMAGES_HINT
    digests = a.get("images_digest"), b.get("images_digest")  # absent in reports from before it was recorded
    if None not in digests and digests[0] != digests[1]:
        raise OmniditError("the reports did not judge the same images: their prompts or noise seeds differ", hint=hint)
    # Older reports: within a report one (category, noise seed or file) names one image, so the same one failing
    # under two prompts proves other images.
    prompts_a, prompts_b = _failed_prompts(a), _failed_prompts(b)
    if any(prompts_a[k] != prompts_b[k] for k in prompts_a.keys() & prompts_b.keys()):
        raise OmniditError("the reports did not judge the same images: the same noise seed failed under other "
                           "prompts", hint=hint)
    fail_a, fail_b = _failure_keys(a), _failure_keys(b)
    if len(fail_a | fail_b) > a["n_images"]:
        raise OmniditError("the reports did not judge the same images: together they fail more images than each "
                           "judged", hint=hint)
    return PairedComparison(images=a["n_images"], overall=(a["overall"], b["overall"]),
                            failed=(len(fail_a), len(fail_b)), only_a=len(fail_a - fail_b),
                            only_b=len(fail_b - fail_a), both=len(fail_a & fail_b),
                            categories={c: (a["categories"][c], b["categories"][c]) for c in a["categories"]})


def _is_failure(entry: object) -> bool:
    """Whether a report's failure entry has what a comparison reads: category and prompt as text, seed and file
    (each optional) as a number or text."""
    return (isinstance(entry, dict) and isinstance(entry.get("category"), str) and isinstance(entry.get("prompt"), str)
            and all(entry.get(k) is None or isinstance(entry[k], (int, str)) for k in ("seed", "file")))


def read_report(path: str | Path) -> dict:
    """An eval report written by ``omnidit eval --json``, checked for the fields a comparison reads."""
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise OmniditError(f"no such report: {path}", hint="write one with omnidit eval ... --json FILE") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OmniditError(f"cannot read {path} as JSON: {e}", hint="pass a file omnidit eval --json wrote") from None
    needed = ("suite", "overall", "categories", "n_images", "settings", "failures")
    missing = [k for k in needed if not isinstance(report, dict) or k not in report]
    if missing:
        raise OmniditError(f"{path} is not an eval report: it has no '{missing[0]}'",
                           hint="pass a file omnidit eval --json wrote")
    failures = report["failures"]
    wrong = next((key for key, ok in (
        ("overall", isinstance(report["overall"], (int, float)) and not isinstance(report["overall"], bool)),
        ("categories", isinstance(report["categories"], dict)
         and all(isinstance(v, (int, float)) for v in report["categories"].values())),
        ("n_images", isinstance(report["n_images"], int)),
        ("settings", isinstance(report["settings"], dict)),
        ("failures", isinstance(failures, list) and all(_is_failure(f) for f in failures))) if not ok), None)
    if wrong:
        raise OmniditError(f"{path} is not an eval report: its '{wrong}' is malformed",
                           hint="pass a file omnidit eval --json wrote, unedited")
    return report


def comparison_table(c: PairedComparison, names: tuple[str, str]) -> str:
    """The comparison as plain text: scores per category, the discordant images and the p-value."""
    width = max(len(n) for n in [*c.categories, "overall"])
    lines = [f"{'category':<{width}}  {'A':>6}  {'B':>6}  {'B - A':>6}", "-" * (width + 26)]
    rows = [*c.categories.items(), ("overall", c.overall)]
    lines += [f"{name:<{width}}  {x:6.3f}  {y:6.3f}  {y - x:+6.3f}" for name, (x, y) in rows]
    verdict = "a difference beyond chance" if c.p_value < 0.05 else "within chance"
    lines += ["", f"A: {names[0]} ({c.failed[0]} of {c.images} images failed)",
              f"B: {names[1]} ({c.failed[1]} of {c.images} images failed)",
              f"paired on the same {c.images} images: {c.only_a} fail only in A, {c.only_b} only in B, "
              f"{c.both} in both",
              f"exact McNemar test, two-sided: p = {c.p_value:.3g} ({verdict} at 0.05)"]
    return "\n".join(lines)
