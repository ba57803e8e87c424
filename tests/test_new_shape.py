"""A shape the shipped models never saw (data.new_shapes, the cross): the data draw it only when asked, in every
colour; the detector recognises it only when asked (the other suites' scores stay as they were) and exactly on
renders; the new-shape suite's judge passes renders and fails other shapes; mistakes are one-line errors."""

from __future__ import annotations

import pytest

from omnidit.config import config_from_dict
from omnidit.data.shapes import COLOURS, Scene, ShapeObject, ShapesDataset, render_scene
from omnidit.errors import OmniditError
from omnidit.evaluate.detector import detect_objects
from omnidit.evaluate.new_shape_suite import judge_new_shape, new_shape_prompts


def test_the_data_draw_crosses_in_every_colour_only_when_asked():
    crosses = ShapesDataset(32, 32, seed=1, new_shapes=["cross"], kinds={"single": 1})
    objects = [crosses.scene(i).objects[0] for i in range(600)]
    assert {o.colour for o in objects if o.shape == "cross"} == set(COLOURS)
    assert 0.1 < sum(o.shape == "cross" for o in objects) / len(objects) < 0.35  # 8 of 36 colour-shape pairs
    plain = ShapesDataset(32, 32, seed=1, kinds={"single": 1})
    assert all(plain.scene(i).objects[0].shape != "cross" for i in range(300))


def test_new_shape_weight_draws_the_new_shape_that_much_more_often_and_one_keeps_the_draws():
    kinds = {"single": 0.5, "count": 0.2, "pair": 0.3}
    base = ShapesDataset(32, 32, seed=2, new_shapes=["cross"], kinds=kinds)
    same = ShapesDataset(32, 32, seed=2, new_shapes=["cross"], kinds=kinds, new_shape_weight=1.0)
    assert all(base.scene(i) == same.scene(i) for i in range(50))  # weight 1: the uniform draws, unchanged

    def cross_share(ds):  # the share of crosses among single objects
        objects = [o for i in range(1500) for o in ds.scene(i).objects if ds.scene(i).kind == "single"]
        return sum(o.shape == "cross" for o in objects) / len(objects)

    heavy = ShapesDataset(32, 32, seed=2, new_shapes=["cross"], kinds=kinds, new_shape_weight=3.5)
    n_known = len(heavy.allowed) - len(COLOURS)
    assert cross_share(base) == pytest.approx(8 / (n_known + 8), abs=0.04)
    assert cross_share(heavy) == pytest.approx(8 * 3.5 / (n_known + 8 * 3.5), abs=0.04)
    pairs = [heavy.scene(i).objects for i in range(300) if heavy.scene(i).kind == "pair"]
    assert pairs and all(a.colour != b.colour or a.shape != b.shape for a, b in pairs)  # still two different objects


def test_the_detector_finds_crosses_exactly_only_when_asked_and_the_other_shapes_as_before():
    ds = ShapesDataset(32, 32, seed=3, new_shapes=["cross"], kinds={"single": 0.5, "pair": 0.5})
    for i in range(150):
        scene = ds.scene(i)
        pixels = render_scene(scene, 32, 32)
        with_cross = detect_objects(pixels, new_shapes=("cross",))
        assert sorted((d.colour, d.shape) for d in with_cross) == sorted((o.colour, o.shape) for o in scene.objects)
        if not any(o.shape == "cross" for o in scene.objects):
            assert [(d.shape, d.box) for d in detect_objects(pixels)] == [(d.shape, d.box) for d in with_cross]
        assert all(d.shape != "cross" for d in detect_objects(pixels))


def test_the_new_shape_judge_passes_renders_and_fails_other_shapes():
    prompts = new_shape_prompts("cross")
    assert [c for c, _ in prompts] == list(COLOURS) and prompts[1][1] == "an orange cross"
    for colour, _ in prompts:
        for shape, passes in (("cross", True), ("square", False)):
            obj = ShapeObject(shape, colour, "large", (0.25, 0.25, 0.75, 0.75))
            assert judge_new_shape("cross", colour, render_scene(Scene((obj,), "", "single"), 32, 32))[0] is passes


@pytest.mark.parametrize("data, message", [
    ({"new_shapes": ["star"]}, "data.new_shapes"),
    ({"new_shapes": ["cross", "cross"]}, "at most once"),
    ({"name": "digits", "new_shapes": ["cross"]}, "applies to the shapes data set"),
    ({"new_shape_weight": 3.0}, "there are none"),
    ({"new_shapes": ["cross"], "new_shape_weight": 0.0}, "new_shape_weight"),
])
def test_new_shape_config_mistakes_are_clear_errors(tmp_path, data, message):
    from conftest import tiny_config_dict

    with pytest.raises(OmniditError, match=message):
        config_from_dict(tiny_config_dict(tmp_path, data=data))
