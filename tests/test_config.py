"""omnidit.config: files, presets, dotted overrides, type checks, unknown keys, round trips."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import CONFIGS, tiny_config_dict

from omnidit.config import (
    Config,
    all_keys,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_override,
)
from omnidit.errors import OmniditError
from omnidit.model.mmdit import PRESETS, MMDiTConfig


def write(tmp_path, content, name="c.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def error_of(fn, *args) -> str:
    with pytest.raises(OmniditError) as info:
        fn(*args)
    return str(info.value)


# ---- presets, overrides, coercion ---------------------------------------------------------------


def test_file_with_preset_and_overrides_builds_the_right_values(tmp_path):
    path = write(tmp_path, {"model": {"preset": "S", "depth": 3, "in_channels": 1},
                            "train": {"lr": 5e-4, "steps": 7}})
    config = load_config(path)
    s = PRESETS["S"]
    m = config.model
    # preset values survive where not overridden, overrides win where given
    assert (m.hidden_size, m.num_heads, m.depth_single, m.axes_dim) == (s.hidden_size, s.num_heads,
                                                                        s.depth_single, s.axes_dim)
    assert (m.depth, m.in_channels) == (3, 1)
    assert config.train.lr == 5e-4 and config.train.steps == 7
    # untouched sections keep their defaults
    assert config.sample == type(config.sample)() and config.data == type(config.data)()
    # command-line overrides beat the file, including the preset itself
    config = load_config(path, ["model.preset=tiny", "train.lr=1e-4"])
    assert config.model.hidden_size == PRESETS["tiny"].hidden_size and config.model.depth == 3
    assert config.train.lr == 1e-4 and isinstance(config.train.lr, float)


def test_dotted_overrides_are_json_parsed():
    assert parse_override("train.lr=1e-4") == ("train.lr", 1e-4)
    assert parse_override("train.resume=false") == ("train.resume", False)
    assert parse_override("model.axes_dim=[8, 12, 12]") == ("model.axes_dim", [8, 12, 12])
    assert parse_override("text.encoder=none") == ("text.encoder", "none")  # not JSON: kept as a string
    assert parse_override("data.path=/a=b") == ("data.path", "/a=b")  # split on the first '=' only
    d = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=2e-3", "sample.cfg=1.5"])
    assert d == {"train": {"lr": 2e-3}, "sample": {"cfg": 1.5}}


def test_apply_overrides_does_not_mutate_its_input():
    d = {"train": {"lr": 1.0}}
    apply_overrides(d, ["train.lr=2"])
    assert d == {"train": {"lr": 1.0}}


def test_comma_list_override():
    config = config_from_dict(apply_overrides({}, ["data.held_out=red circle,blue square"]))
    assert config.data.held_out == ["red circle", "blue square"]
    config = config_from_dict(apply_overrides({}, ["data.held_out= red circle , blue square ,"]))
    assert config.data.held_out == ["red circle", "blue square"]
    config = config_from_dict(apply_overrides({}, ['data.held_out=["green square"]']))
    assert config.data.held_out == ["green square"]


def test_comma_list_override_of_ints():
    config = config_from_dict(apply_overrides({}, ["model.hidden_size=64", "model.num_heads=2",
                                                   "model.axes_dim=8,12,12"]))
    assert config.model.axes_dim == (8, 12, 12)


@pytest.mark.parametrize("override, attr, expected, kind", [
    ("train.resume=false", ("train", "resume"), False, bool),
    ("train.resume=true", ("train", "resume"), True, bool),
    ("train.steps=1e3", ("train", "steps"), 1000, int),  # integral floats become ints
    ("train.steps=12", ("train", "steps"), 12, int),
    ("train.lr=1", ("train", "lr"), 1.0, float),  # ints widen to floats
    ("sample.cfg=2", ("sample", "cfg"), 2.0, float),
    ("model.axes_dim=[4,6,6]", ("model", "axes_dim"), (4, 6, 6), tuple),
    ("sample.cfg_interval=[0,0.7]", ("sample", "cfg_interval"), [0.0, 0.7], list),
    ("data.name=digits", ("data", "name"), "digits", str),
])
def test_type_coercion(override, attr, expected, kind):
    extra = ["model.hidden_size=64", "model.num_heads=4"] if "axes_dim" in override else []
    config = config_from_dict(apply_overrides({}, extra + [override]))
    value = getattr(getattr(config, attr[0]), attr[1])
    assert value == expected and type(value) is kind


@pytest.mark.parametrize("override, key", [
    ("train.steps=2.5", "train.steps"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=true", "train.steps"),  # bools are not ints
    ("train.resume=1", "train.resume"),  # ints are not bools
    ("train.resume=yes", "train.resume"),
    ("train.lr=fast", "train.lr"),
    ("train.lr=false", "train.lr"),
    ("data.path=123", "data.path"),
    ("model.axes_dim=5", "model.axes_dim"),
    ('model.axes_dim=["a"]', "model.axes_dim"),
    ("sample.cfg_interval=0.5", "sample.cfg_interval"),
])
def test_wrong_type_names_the_key(override, key):
    message = error_of(lambda: config_from_dict(apply_overrides({}, [override])))
    assert f"'{key}'" in message and "expects" in message


def test_bad_guidance_interval_names_the_key():
    message = error_of(lambda: config_from_dict(apply_overrides({}, ["sample.cfg_interval=[0.8,0.2]"])))
    assert "'sample.cfg_interval'" in message and "LO < HI" in message


def test_skip_layer_guidance_needs_blocks_and_a_non_negative_scale():
    message = error_of(lambda: config_from_dict(apply_overrides({}, ["sample.skip_scale=1.0"])))
    assert "sample.skip_blocks" in message
    negative = ["sample.skip_scale=-1", "sample.skip_blocks=[0]"]
    message = error_of(lambda: config_from_dict(apply_overrides({}, negative)))
    assert "'sample.skip_scale' must be >= 0" in message
    ok = ["model.depth_single=3", "sample.skip_scale=1", "sample.skip_blocks=[2]"]
    assert config_from_dict(apply_overrides({}, ok)).sample.skip_blocks == [2]
    message = error_of(lambda: config_from_dict(apply_overrides({}, ["model.depth_single=2", *ok[1:]])))
    assert "'sample.skip_blocks'" in message and "0 to 1" in message
    assert "model.depth_single=2 (e.g. sample.skip_blocks=[1]" in message  # the hint names what fits the model


def test_wrong_type_in_file_names_the_key(tmp_path):
    message = error_of(load_config, write(tmp_path, {"train": {"batch_size": "32"}}))
    assert "'train.batch_size'" in message and "int" in message


# ---- unknown keys and invalid configs -----------------------------------------------------------


@pytest.mark.parametrize("override, unknown, nearest", [
    ("train.lrr=1e-4", "train.lrr", "train.lr"),
    ("trian.lr=1e-4", "trian.lr", "train.lr"),  # unknown section
    ("train.stpes=3", "train.stpes", "train.steps"),
    ("model.presett=tiny", "model.presett", "model.preset"),
    ("sample.sampeler=heun", "sample.sampeler", "sample.sampler"),
])
def test_unknown_override_key_names_nearest(tmp_path, override, unknown, nearest):
    path = write(tmp_path, {})
    message = error_of(load_config, path, [override])
    assert f"unknown config key '{unknown}'" in message
    assert f"did you mean '{nearest}'" in message


def test_unknown_key_in_file_names_nearest(tmp_path):
    message = error_of(load_config, write(tmp_path, {"train": {"batch_sise": 4}}))
    assert "'train.batch_sise'" in message and "did you mean 'train.batch_size'" in message
    message = error_of(load_config, write(tmp_path, {"model": {"preset": "tiny", "hiden_size": 64}}))
    assert "'model.hiden_size'" in message and "did you mean 'model.hidden_size'" in message


def test_unknown_section_in_file(tmp_path):
    message = error_of(load_config, write(tmp_path, {"trainer": {"lr": 1e-4}}))
    assert "unknown config key 'trainer'" in message


def test_override_without_section_or_value():
    message = error_of(apply_overrides, {}, ["lr=1e-4"])
    assert "'lr'" in message and "omnidit train --help" in message  # no close match: point at the key list
    message = error_of(apply_overrides, {}, ["train.lr"])
    assert "section.key=value" in message


def test_unknown_preset():
    message = error_of(config_from_dict, {"model": {"preset": "huge"}})
    assert "unknown model preset 'huge'" in message
    for name in PRESETS:
        assert name in message  # the hint lists the valid presets


@pytest.mark.parametrize("content", ['{"train": {"lr": 1e-4,}}', "{not json", "", "\xff\xfe garbage"])
def test_malformed_json_file(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_bytes(content.encode("latin-1"))
    message = error_of(load_config, path)
    assert str(path) in message and "not valid JSON" in message


def test_missing_file_and_non_object(tmp_path):
    assert "not found" in error_of(load_config, tmp_path / "nope.json")
    assert "JSON object" in error_of(load_config, write(tmp_path, "[1, 2]"))
    assert "'train' must be an object" in error_of(load_config, write(tmp_path, {"train": 3}))


def test_invalid_model_configs_are_clear():
    message = error_of(config_from_dict, {"model": {"preset": "tiny", "hidden_size": 65, "num_heads": 2}})
    assert "invalid model config" in message and "not divisible by num_heads" in message
    message = error_of(config_from_dict, {"model": {"hidden_size": 64, "num_heads": 2, "axes_dim": [8, 8, 8]}})
    assert "invalid model config" in message and "axes_dim" in message and "32" in message
    message = error_of(config_from_dict, {"model": {"axes_dim": [7, 12, 13]}})
    assert "even" in message
    message = error_of(config_from_dict, {"model": {"depth": 0}})
    assert "depth" in message


# ---- round trips and the shipped configs --------------------------------------------------------


def test_to_dict_round_trip(tmp_path):
    config = config_from_dict(tiny_config_dict(tmp_path / "run", data={"held_out": ["red circle"]}))
    d = config.to_dict()
    assert json.loads(json.dumps(d)) == d  # JSON-able
    assert "preset" not in d["model"]  # the preset is resolved into concrete values
    again = config_from_dict(json.loads(json.dumps(d)))
    assert again == config
    assert again.to_dict() == d
    assert config_from_dict(Config().to_dict()) == Config()


def test_all_keys_cover_every_field():
    keys = set(all_keys())
    assert "model.preset" in keys and "train.lr" in keys and "data.held_out" in keys
    for section in ("model", "data", "text", "train", "sample"):
        cls = type(getattr(Config(), section))
        assert {f"{section}.{f.name}" for f in dataclasses.fields(cls)} <= keys
    assert isinstance(Config().model, MMDiTConfig)


@pytest.mark.parametrize("name", ["recipes/shapes/shapes.json", "recipes/shapes/shapes_finetune.json",
                                  *(f"recipes/shapes/shapes_stage{n}.json" for n in range(3, 13)),
                                  "digits.json", "shapes_tones.json", "inpaint_lora.json", "lora_cross.json"])
def test_shipped_configs_load(name):
    config = load_config(CONFIGS / name)
    assert config.train.steps > 0 and config.model.head_dim == sum(config.model.axes_dim)
    assert config_from_dict(config.to_dict()) == config


def test_scene_kinds_from_a_file_or_an_override(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"data": {"scene_kinds": {"single": 1, "relation": 3}}}))
    assert load_config(path).data.scene_kinds == {"single": 1.0, "relation": 3.0}
    assert load_config(path, ['data.scene_kinds={"pair": 2}']).data.scene_kinds == {"pair": 2.0}
    assert load_config(path, ["data.scene_kinds={}"]).data.scene_kinds == {}  # back to the default mix
    for override, message in (('data.scene_kinds={"triple": 1}', "unknown scene kind 'triple'"),
                              ('data.scene_kinds={"single": -1, "pair": 2}', "non-negative"),
                              ('data.scene_kinds={"single": 0}', "positive sum"),
                              ('data.scene_kinds={"single": "many"}', "expects float"),
                              ("data.scene_kinds=[1, 2]", "expects a JSON object")):
        with pytest.raises(OmniditError, match=message):
            load_config(path, [override])
    with pytest.raises(OmniditError, match="applies to the shapes data set") as e:
        load_config(path, ["data.name=digits"])
    assert "drop data.scene_kinds" in e.value.hint


def test_sample_candidates_must_be_a_positive_whole_number(tmp_path):
    path = write(tmp_path, {"sample": {"candidates": 3}})
    assert load_config(path).sample.candidates == 3 and load_config(write(tmp_path, {})).sample.candidates == 1
    assert "'sample.candidates' must be positive" in error_of(load_config, path, ["sample.candidates=0"])
    assert "expects int" in error_of(load_config, path, ["sample.candidates=1.5"])


def test_counterfactual_directions_apply_to_clips_only(tmp_path):
    path = write(tmp_path, {"data": {"name": "shapes_video", "frames": 8}})
    assert load_config(path, ["data.counterfactual_directions=vertical"]).data.counterfactual_directions == "vertical"
    with pytest.raises(OmniditError, match="counterfactual_directions"):
        load_config(path, ["data.counterfactual_directions=diagonal"])
    with pytest.raises(OmniditError, match="applies to the shapes_video data set, not 'shapes'") as e:
        load_config(path, ["data.name=shapes", "data.counterfactual_directions=vertical"])
    assert "drop data.counterfactual_directions" in e.value.hint
