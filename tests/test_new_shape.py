"""A shape the shipped models never saw (data.new_shapes, the cross): the data draw it only when asked, in every
colour; the detector recognises it only when asked (the other suites' scores stay as they were) and exactly on
renders; the new-shape suite's judge passes renders and fails other shapes; mistakes are one-line errors."""

from __future__ import annotations

import numpy as np
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


# The first ten captions of ShapesDataset(32, 32, seed=2, new_shapes=["cross"], kinds=WEIGHT_KINDS) before
# data.new_shape_weight existed (13a98b7): weight 1 must keep these draws.
WEIGHT_KINDS = {"single": 0.5, "count": 0.2, "pair": 0.3}
CAPTIONS_BEFORE_WEIGHTS = [
    "one orange circle", "a yellow cross and a green circle", "a small purple square and a small pink diamond",
    "a yellow triangle", "three purple diamonds", "a small orange triangle and a large pink cross",
    "a pink circle and a green triangle", "one green cross", "a cyan cross", "four cyan squares"]


def test_new_shape_weight_draws_the_new_shape_that_much_more_often_and_one_keeps_the_draws():
    base = ShapesDataset(32, 32, seed=2, new_shapes=["cross"], kinds=WEIGHT_KINDS)
    assert [base.scene(i).caption for i in range(10)] == CAPTIONS_BEFORE_WEIGHTS
    assert base.pair_p is None

    def cross_share(ds):  # the share of crosses among single objects
        scenes = [ds.scene(i) for i in range(1500)]
        objects = [s.objects[0] for s in scenes if s.kind == "single"]
        return sum(o.shape == "cross" for o in objects) / len(objects), scenes

    heavy = ShapesDataset(32, 32, seed=2, new_shapes=["cross"], kinds=WEIGHT_KINDS, new_shape_weight=3.5)
    n_known = len(heavy.allowed) - len(COLOURS)
    assert cross_share(base)[0] == pytest.approx(8 / (n_known + 8), abs=0.04)
    share, scenes = cross_share(heavy)
    assert share == pytest.approx(8 * 3.5 / (n_known + 8 * 3.5), abs=0.04)
    pairs = [s.objects for s in scenes if s.kind == "pair"]
    assert pairs and all(a.colour != b.colour or a.shape != b.shape for a, b in pairs)  # still two different objects


@pytest.mark.parametrize("weight, new_shapes, message", [
    (float("inf"), ["cross"], "must be a number"), (0, ["cross"], "must be a number"), (True, ["cross"], "number"),
    ("3", ["cross"], "must be a number"), (2.0, [], "there are none"), (float("nan"), ["cross"], "must be a number"),
    (np.True_, ["cross"], "must be a number")])
def test_new_shape_weight_mistakes_are_clear_errors_in_the_data_too(weight, new_shapes, message):
    with pytest.raises(OmniditError, match=message):
        ShapesDataset(32, 32, new_shapes=new_shapes, new_shape_weight=weight)


def test_new_shape_weight_takes_numpy_numbers():
    ds = ShapesDataset(32, 32, seed=2, new_shapes=["cross"], kinds=WEIGHT_KINDS, new_shape_weight=np.float32(3))
    same = ShapesDataset(32, 32, seed=2, new_shapes=["cross"], kinds=WEIGHT_KINDS, new_shape_weight=3)
    assert [ds.scene(i).caption for i in range(10)] == [same.scene(i).caption for i in range(10)]
    assert [ds.scene(i).caption for i in range(10)] != CAPTIONS_BEFORE_WEIGHTS


def test_new_shape_weight_is_in_the_cache_key_only_when_it_weights(tmp_path):
    from conftest import tiny_config_dict

    from omnidit.data import build_dataset
    from omnidit.precompute import fields_for_config

    keys = []
    for weight in (1.0, 3.0):
        config = config_from_dict(tiny_config_dict(tmp_path, data={"new_shapes": ["cross"], "new_shape_weight": weight,
                                                                   "cache_samples": 4}))
        dataset = build_dataset("shapes", 32, 32, new_shapes=["cross"], new_shape_weight=weight)
        keys.append(fields_for_config(config, dataset))
    assert "new_shape_weight" not in str(keys[0]) and "new_shape_weight" in str(keys[1])


def test_pair_weights_multiply_the_named_pairs_share_and_ones_keep_the_draws():
    ones = ShapesDataset(32, 32, seed=2, new_shapes=["cross"], kinds=WEIGHT_KINDS, pair_weights={"pink cross": 1})
    assert ones.pair_p is None and [ones.scene(i).caption for i in range(10)] == CAPTIONS_BEFORE_WEIGHTS
    weighted = ShapesDataset(32, 32, seed=2, new_shapes=["cross"], kinds={"single": 1}, new_shape_weight=3,
                             pair_weights={"Pink cross": 4, "red circle": 2})
    p = dict(zip(weighted.allowed, weighted.pair_p))
    assert p[("pink", "cross")] == pytest.approx(4 * p[("red", "cross")])
    assert p[("pink", "cross")] == pytest.approx(12 * p[("cyan", "square")])
    assert p[("red", "circle")] == pytest.approx(2 * p[("cyan", "square")])
    objects = [weighted.scene(i).objects[0] for i in range(3000)]
    share = sum((o.colour, o.shape) == ("pink", "cross") for o in objects) / len(objects)
    assert share == pytest.approx(p[("pink", "cross")], abs=0.03)


# The config's rows with 3 and "3" are refused by the config's type check before the data's own.
@pytest.mark.parametrize("weights, new_shapes, message", [
    ({"pink cross": 3}, [], r'never draws.*data.new_shapes=\["cross"\]'),  # the cross is not drawn
    ({"red triangle": 3}, [], "never draws.*drop 'red triangle' from data.held_out"),
    ({"pink star": 3}, ["cross"], "not a 'colour shape' pair"),
    ({"pink": 3}, ["cross"], "not a 'colour shape' pair"),
    ({"pink cross": 2, "Pink  cross": 3}, ["cross"], "names 'pink cross' twice"),
    ({"pink cross": 0}, ["cross"], "must be a number"),
    ({"pink cross": "3"}, ["cross"], "must be a number"),
    (3, ["cross"], "must map 'colour shape' pairs to factors")])
def test_pair_weights_mistakes_are_clear_errors(tmp_path, weights, new_shapes, message):
    from conftest import tiny_config_dict

    with pytest.raises(OmniditError, match=message):
        ShapesDataset(32, 32, new_shapes=new_shapes, pair_weights=weights)
    with pytest.raises(OmniditError, match="config key 'data.pair_weights'"):
        config_from_dict(tiny_config_dict(tmp_path, data={"new_shapes": new_shapes, "pair_weights": weights}))


def test_pair_weights_apply_to_shapes_only_and_are_in_the_cache_key_only_when_set(tmp_path):
    from conftest import tiny_config_dict

    from omnidit.data import build_dataset
    from omnidit.precompute import fields_for_config

    with pytest.raises(OmniditError, match="applies to the shapes data set"):
        config_from_dict(tiny_config_dict(tmp_path, data={"name": "digits", "pair_weights": {"pink circle": 2}}))
    keys = []
    for weights, weighted in (({}, False), ({"pink circle": 2.0}, True), ({"Pink  Circle": 2, "red circle": 1}, True),
                              ({"red circle": 1}, False)):
        config = config_from_dict(tiny_config_dict(tmp_path, data={"pair_weights": weights, "cache_samples": 4}))
        dataset = build_dataset("shapes", 32, 32, pair_weights=weights)
        assert (dataset.pair_p is not None) == weighted  # build_dataset passes the weights on
        keys.append(fields_for_config(config, dataset))
    assert "pair_weights" not in str(keys[0]) and "pink circle" in str(keys[1])
    assert keys[2] == keys[1] and keys[3] == keys[0]  # one key per data drawn, whatever the spelling


def test_pair_weights_follow_the_configs_held_out_pairs_and_reach_the_trainers_data(tmp_path):
    from conftest import tiny_config_dict

    from omnidit.config import apply_overrides
    from omnidit.train import Trainer

    assert config_from_dict(tiny_config_dict(tmp_path, data={"held_out": [], "pair_weights": {"red triangle": 2}}))
    with pytest.raises(OmniditError, match="never draws"):
        config_from_dict(tiny_config_dict(tmp_path, data={"held_out": ["pink circle"],
                                                          "pair_weights": {"pink circle": 2}}))
    config = config_from_dict(apply_overrides(tiny_config_dict(tmp_path), ['data.pair_weights={"pink circle": 3}']))
    assert config.data.pair_weights == {"pink circle": 3.0}
    trainer = Trainer(config, progress=False)
    p = dict(zip(trainer.dataset.allowed, trainer.dataset.pair_p))
    assert p[("pink", "circle")] == pytest.approx(3 * p[("red", "circle")])


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


def test_the_judge_passes_rendered_crosses_of_every_colour_small_and_large():
    ds = ShapesDataset(32, 32, seed=5, new_shapes=["cross"], kinds={"single": 1}, new_shape_weight=20)
    crosses = [s for s in (ds.scene(i) for i in range(600)) if s.objects[0].shape == "cross"]
    per_colour = {c: [s for s in crosses if s.objects[0].colour == c] for c in COLOURS}
    assert min(len(v) for v in per_colour.values()) >= 30
    assert all({s.objects[0].size for s in v} == {"small", "large"} for v in per_colour.values())
    for colour, scenes in per_colour.items():
        assert all(judge_new_shape("cross", colour, render_scene(s, 32, 32))[0] for s in scenes), colour


@pytest.mark.parametrize("data, message", [
    ({"new_shapes": ["star"]}, "data.new_shapes"),
    ({"new_shapes": ["cross", "cross"]}, "at most once"),
    ({"name": "digits", "new_shapes": ["cross"]}, "applies to the shapes data set"),
    ({"new_shape_weight": 3.0}, "there are none"),
    ({"new_shapes": ["cross"], "new_shape_weight": 0.0}, "must be a number"),
])
def test_new_shape_config_mistakes_are_clear_errors(tmp_path, data, message):
    from conftest import tiny_config_dict

    with pytest.raises(OmniditError, match=message):
        config_from_dict(tiny_config_dict(tmp_path, data=data))
