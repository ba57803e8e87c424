"""omnidit compare: two eval reports paired image by image, with the exact McNemar p-value."""

import json

import pytest

from omnidit.cli import main
from omnidit.errors import OmniditError
from omnidit.evaluate.compare import mcnemar_p, paired_comparison


def report(failures: list[tuple[str, str, int]], seed: int = 0, n_images: int = 40, overall: float = 0.9) -> dict:
    return {"suite": "shapes", "overall": overall, "categories": {"counting": overall, "colours": overall},
            "n_images": n_images, "frechet_distance": None,
            "settings": {"seed": seed, "limit": 2, "n_per_prompt": 4},
            "failures": [{"category": c, "prompt": p, "reason": "expected 1, found 0", "seed": s}
                         for c, p, s in failures]}


def test_mcnemar_matches_the_binomial_tail_in_closed_form():
    assert mcnemar_p(0, 5) == pytest.approx(2 / 32)  # both extreme splits of 5: 2 * (1/2)^5
    assert mcnemar_p(5, 0) == mcnemar_p(0, 5)
    assert mcnemar_p(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert mcnemar_p(3, 3) == 1.0 and mcnemar_p(0, 0) == 1.0  # an even split, or nothing to split
    # at a fixed number of discordant images, a more uneven split is less likely under the null
    ps = [mcnemar_p(k, 20 - k) for k in range(11)]
    assert all(a < b for a, b in zip(ps, ps[1:]))


def test_paired_comparison_counts_the_images_that_fail_in_one_run_only():
    a = report([("counting", "two circles", 1), ("counting", "two circles", 2), ("colours", "a red square", 5)])
    b = report([("counting", "two circles", 2), ("colours", "a red square", 6)], overall=0.95)
    c = paired_comparison(a, b)
    # the same prompt at another noise seed is another image
    assert (c.only_a, c.only_b, c.both, c.failed) == (2, 1, 1, (3, 2))
    assert c.p_value == pytest.approx(1.0) and c.overall == (0.9, 0.95)


def test_reports_of_other_images_do_not_pair():
    with pytest.raises(OmniditError, match="seed 0 and 1"):
        paired_comparison(report([]), report([], seed=1))
    ours, other = report([]), report([])
    ours["settings"]["held_out"], other["settings"]["held_out"] = ["blue circle"], ["red circle"]
    with pytest.raises(OmniditError, match="held_out"):  # another model's held-out pairs: other prompts
        paired_comparison(ours, other)
    assert paired_comparison(report([]), other).images == 40  # a report from before held_out was recorded pairs
    other = report([])
    other["suite"] = "digits"
    with pytest.raises(OmniditError, match="different suites"):
        paired_comparison(report([]), other)


def test_reports_of_other_prompts_at_the_same_settings_do_not_pair():
    """The audio suite's prompts depend on the captions a run drew: the same settings, other images. The reports'
    images_digest tells them apart; reports without one are refused when their failures cannot pair."""
    from omnidit.evaluate.runner import EvalReport, Judged

    def made(prompts: list[str]) -> dict:
        judged = [Judged(category="one_beep", prompt=p, image=None, passed=False, reason="0 beeps heard", seed=k)
                  for k, p in enumerate(prompts)]
        return EvalReport("audio", 0.0, {"one_beep": 0.0}, len(judged), settings={"seed": 0}, judged=judged).to_json()

    same = made(["a low beep", "a high beep"])
    assert paired_comparison(same, made(["a low beep", "a high beep"])).both == 2
    with pytest.raises(OmniditError, match="prompts or noise seeds differ"):
        paired_comparison(same, made(["a high beep", "a low beep"]))  # another order: other seeds
    older = {k: v for k, v in same.items() if k != "images_digest"}  # a report from before the digest
    assert paired_comparison(older, same).both == paired_comparison(same, older).both == 2
    old_a = report([("counting", f"prompt {k}", k) for k in range(3)])
    old_b = report([("counting", f"prompt {k}", k + 1) for k in range(3)])  # seed 1 failed as prompt 1 and 0
    with pytest.raises(OmniditError, match="failed under other prompts"):
        paired_comparison(old_a, old_b)
    many = report([("counting", f"prompt {k}", k) for k in range(30)])
    others = report([("colours", f"prompt {k}", k) for k in range(30)])  # 60 failed images among 40
    with pytest.raises(OmniditError, match="more images than each judged"):
        paired_comparison(many, others)


def test_cli_prints_the_split_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    fails = [("counting", f"prompt {k}", k) for k in range(6)]
    (tmp_path / "a.json").write_text(json.dumps(report([])))
    (tmp_path / "b.json").write_text(json.dumps(report(fails, overall=0.8)))
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "0 fail only in A, 6 only in B, 0 in both" in out and "p = 0.0312 (a difference beyond chance" in out
    (tmp_path / "c.json").write_text(json.dumps(report([], seed=3)))
    (tmp_path / "bad.json").write_text("{not json")
    for other, message in (("c.json", "did not judge the same images: seed 0 and 3"), ("bad.json", "as JSON"),
                           ("missing.json", "no such report")):
        assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / other)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
