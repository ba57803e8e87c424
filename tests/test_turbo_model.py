"""The few-step student shipped in the package (`shapes-turbo`): it loads offline by name, is small, samples with
one pass per step and no guidance pass in the steps its config names, and draws simple scenes right."""

from __future__ import annotations

import pytest
from helpers import assert_shipped_student, draw_single_objects
from test_cli import run_main

from omnidit.pipeline import load_pipeline

MAX_SHIPPED_BYTES = 12 * 1024 * 1024


@pytest.fixture(scope="module")
def turbo():
    return load_pipeline("shapes-turbo", device="cpu")


def test_shipped_student_is_small_float16_and_samples_in_a_few_single_passes(turbo):
    assert_shipped_student(turbo, "shapes-turbo", "turbo_model", MAX_SHIPPED_BYTES)


def test_it_draws_single_objects_right_in_its_few_steps(turbo):
    calls, right = draw_single_objects(turbo)
    assert len(calls) == turbo.config.sample.steps and set(calls) == {4}  # one pass per step, no CFG row
    assert right >= 3, right

def test_info_and_generate_by_name(tmp_path, capsys):
    code, out, err = run_main(capsys, "info", "shapes-turbo")
    assert code == 0, err
    assert "distillation" in out and "guidance_embed=True" in out
    target = tmp_path / "t.png"
    code, out, err = run_main(capsys, "generate", "two red circles", "--model", "shapes-turbo", "-o", target,
                              "--no-progress")
    assert code == 0, err
    assert target.is_file()
