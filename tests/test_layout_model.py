"""The layout adapter shipped in the package (`shapes-layout`): it loads offline by name on the shipped shapes
model, is small, leaves the shapes model exactly as it is without boxes, and puts objects in their boxes."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_shipped_folder
from test_cli import run_main

from omnidit.layout import Box, layout_adapter
from omnidit.pipeline import load_pipeline

MAX_SHIPPED_BYTES = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def layout():
    return load_pipeline("shapes-layout", device="cpu")


def test_shipped_adapter_is_small_float16_and_sits_on_the_shipped_model(layout):
    assert_shipped_folder("shapes-layout", "layout_model", MAX_SHIPPED_BYTES)
    assert layout.config.train.init_from == "shapes" and layout_adapter(layout.model).max_boxes == 8
    base = load_pipeline("shapes", device="cpu")
    torch.testing.assert_close(layout.generate(["a red circle"], seed=3, steps=4),
                               base.generate(["a red circle"], seed=3, steps=4), atol=0, rtol=0)


def test_it_puts_objects_in_their_boxes(layout):
    from omnidit.evaluate.layout_suite import placed_objects

    corners = [(0.05, 0.05, 0.45, 0.45), (0.55, 0.05, 0.95, 0.45), (0.05, 0.55, 0.45, 0.95), (0.55, 0.55, 0.95, 0.95)]
    objects = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "diamond")]
    prompts = [f"a {c} {s}" for c, s in objects]
    boxes = [[Box(p, *corner)] for p, corner in zip(prompts, corners)]
    images = layout.generate(prompts, seed=[0, 1, 2, 3], boxes=boxes, steps=20, candidates=1, skip_scale=0.0)
    placed = [placed_objects(b, [o], image)[0][0] for b, o, image in zip(boxes, objects, images)]
    assert sum(placed) >= 3, placed


def test_generate_draws_in_the_box_from_the_command_line(tmp_path, capsys):
    target = tmp_path / "boxed.png"
    code, out, err = run_main(capsys, "generate", "a red circle", "--model", "shapes-layout", "-o", target,
                              "--box", "a red circle", 0.5, 0.5, 0.95, 0.95, "--steps", 4, "--candidates", 1)
    assert code == 0, err
    assert target.is_file()
