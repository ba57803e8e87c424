"""omnidit.evaluate.shapes_suite: prompt sets, judging with ground-truth and wrong renders, scoring,
and the manifest that lets images from any system be scored."""

from __future__ import annotations

import json

import pytest

from omnidit.data.shapes import DEFAULT_HELD_OUT, RELATIONS, Scene, ShapeObject, parse_held_out, render_scene
from omnidit.errors import OmniditError
from omnidit.evaluate.detector import Detection, detect_objects
from omnidit.evaluate.shapes_suite import (
    CATEGORIES,
    PromptSpec,
    build_prompts,
    check,
    image_name,
    read_manifest,
    reference_scene,
    relation_holds,
    relation_verdict,
    score,
    write_manifest,
    write_prompt_list,
)

HELD = parse_held_out(DEFAULT_HELD_OUT)


def judge(spec: PromptSpec, objects: list[ShapeObject], width: int = 32, height: int = 32) -> tuple[bool, str]:
    image = render_scene(Scene(tuple(objects), spec.prompt, "pair"), width, height)
    return check(spec, detect_objects(image))


def obj(shape: str, colour: str, x: float, y: float, side: float = 0.26, size: str = "small") -> ShapeObject:
    return ShapeObject(shape, colour, size, (x, y, x + side, y + side))


def spec_of(category: str, prompt: str, *objects, relation=None) -> PromptSpec:
    return PromptSpec(category, prompt, tuple(objects), relation)


# ---- prompts ------------------------------------------------------------------------------------


def test_prompts_are_deterministic_and_every_category_is_filled():
    specs = build_prompts(seed=0)
    assert specs == build_prompts(seed=0)
    assert specs != build_prompts(seed=1)
    counts = {c: sum(s.category == c for s in specs) for c in CATEGORIES}
    assert all(n > 0 for n in counts.values()), counts
    assert all(20 <= n <= 40 for c, n in counts.items() if c != "novel_compositions"), counts
    for c in CATEGORIES:  # no duplicate prompts within a category
        prompts = [s.prompt for s in specs if s.category == c]
        assert len(prompts) == len(set(prompts))


def named_pairs(spec: PromptSpec) -> set[tuple[str, str]]:
    """(colour, shape) pairs a prompt mentions, read back from its words."""
    words = spec.prompt.replace("to the left of", "and").replace("to the right of", "and")
    words = words.replace("above", "and").replace("below", "and").split()
    pairs = set()
    for i, w in enumerate(words[1:], 1):
        shape = w[:-1] if w.endswith("s") and w[:-1] in ("circle", "square", "triangle", "diamond") else w
        if shape in ("circle", "square", "triangle", "diamond"):
            pairs.add((words[i - 1], shape))
    return pairs


def test_held_out_pairs_only_in_novel_compositions():
    for spec in build_prompts(seed=3):
        pairs = named_pairs(spec)
        assert pairs, spec.prompt
        if spec.category == "novel_compositions":
            assert pairs <= HELD, spec.prompt
        else:
            assert not pairs & HELD, spec.prompt
    assert not any(s.category == "novel_compositions" for s in build_prompts(held_out=()))
    # Config-style comma string and (colour, shape) tuples mean the same as the default list.
    same = build_prompts(held_out=",".join(DEFAULT_HELD_OUT))
    assert same == build_prompts(held_out=sorted(HELD)) == build_prompts()


def test_prompts_follow_the_caption_templates():
    specs = build_prompts(seed=0)
    for spec in specs:
        assert spec.prompt.split()[0] in ("a", "an", "one", "two", "three", "four"), spec.prompt
        if spec.category == "position":
            assert spec.relation in RELATIONS
            phrase = {"left of": "to the left of", "right of": "to the right of"}.get(spec.relation, spec.relation)
            assert f" {phrase} " in spec.prompt
    counting = [s for s in specs if s.category == "counting"]
    assert {s.objects[0][2] for s in counting[:8]} == {1, 2, 3, 4}  # interleaved: balanced prefixes
    assert {s.relation for s in specs if s.category == "position"} == set(RELATIONS)
    for s in specs:
        if s.category == "colour_attribution":
            (c1, s1, _), (c2, s2, _) = s.objects
            assert c1 != c2 and s1 != s2


def test_per_category_gives_a_prefix():
    full, short = build_prompts(seed=5), build_prompts(seed=5, per_category=3)
    for c in CATEGORIES:
        assert [s for s in short if s.category == c] == [s for s in full if s.category == c][:3]
    with pytest.raises(OmniditError):
        build_prompts(per_category=0)


# ---- judging ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 32), (64, 48)])
def test_reference_renders_pass_every_prompt(size):
    specs = build_prompts(seed=0, per_category=12)
    results = []
    for i, spec in enumerate(specs):
        scene = reference_scene(spec, *size, seed=i)
        passed, reason = check(spec, detect_objects(render_scene(scene, *size)))
        assert passed, f"{spec.prompt!r}: {reason}"
        results.append((spec, passed))
    assert score(results)["overall"] == 1.0


def test_wrong_colour_fails_where_colour_is_judged():
    for category in ("colours", "novel_compositions"):
        spec = spec_of(category, "a purple diamond", ("purple", "diamond", 1))
        assert judge(spec, [obj("diamond", "purple", 0.3, 0.3)])[0]
        passed, reason = judge(spec, [obj("diamond", "orange", 0.3, 0.3)])
        assert not passed and "expected 1 purple diamond, found 0" in reason
    single = spec_of("single_object", "a purple diamond", (None, "diamond", 1))
    assert judge(single, [obj("diamond", "orange", 0.3, 0.3)])[0]  # colour not judged here
    assert not judge(single, [obj("circle", "purple", 0.3, 0.3)])[0]


def test_wrong_count_fails():
    spec = spec_of("counting", "three green triangles", (None, "triangle", 3))
    three = [obj("triangle", "green", x, y) for x, y in ((0.05, 0.05), (0.6, 0.05), (0.05, 0.6))]
    assert judge(spec, three)[0]
    passed, reason = judge(spec, three[:2])
    assert not passed and reason.startswith("expected 3 triangles, found 2")
    assert not judge(spec, three + [obj("triangle", "green", 0.6, 0.6)])[0]
    assert not judge(spec, three[:2] + [obj("circle", "green", 0.6, 0.6)])[0]


def test_missing_and_extra_objects_fail():
    spec = spec_of("two_objects", "a red circle and a blue square", (None, "circle", 1), (None, "square", 1))
    pair = [obj("circle", "red", 0.05, 0.05), obj("square", "blue", 0.6, 0.6)]
    assert judge(spec, pair)[0]
    passed, reason = judge(spec, pair[:1])
    assert not passed and "expected 1 square, found 0" in reason
    passed, reason = judge(spec, pair + [obj("triangle", "green", 0.6, 0.05)])
    assert not passed and "expected 2 objects, found 3" in reason and "green triangle" in reason


def test_swapped_colour_binding_fails():
    spec = spec_of("colour_attribution", "a red circle and a blue square", ("red", "circle", 1), ("blue", "square", 1))
    assert judge(spec, [obj("circle", "red", 0.05, 0.05), obj("square", "blue", 0.6, 0.6)])[0]
    passed, reason = judge(spec, [obj("square", "red", 0.05, 0.05), obj("circle", "blue", 0.6, 0.6)])
    assert not passed and "red circle" in reason


@pytest.mark.parametrize("relation", RELATIONS)
def test_position_relation_and_its_violation(relation):
    spec = spec_of("position", "p", ("red", "circle", 1), ("blue", "square", 1), relation=relation)
    low, high = (0.1, 0.4), (0.6, 0.45)  # (main-axis start, off-axis start)
    a, b = (low, high) if relation in ("left of", "above") else (high, low)
    horizontal = relation in ("left of", "right of")
    place = (lambda p: p) if horizontal else (lambda p: (p[1], p[0]))
    right = [obj("circle", "red", *place(a)), obj("square", "blue", *place(b))]
    swapped = [obj("circle", "red", *place(b)), obj("square", "blue", *place(a))]
    for width, height in ((32, 32), (64, 32)):
        assert judge(spec, right, width, height)[0]
        passed, reason = judge(spec, swapped, width, height)
        assert not passed and "is not" in reason
    # The relation verdict judges placement only where exactly the named objects were drawn.
    def verdict(objects):
        return relation_verdict(spec, detect_objects(render_scene(Scene(tuple(objects), "p", "pair"), 32, 32)))

    assert verdict(right) == "right" and verdict(swapped) == "reversed"
    across = (lambda p: (p[1], p[0])) if horizontal else (lambda p: p)  # the same offsets on the other axis
    assert verdict([obj("circle", "red", *across(a)), obj("square", "blue", *across(b))]) == "off_axis"
    assert verdict(right[:1]) is None  # an object is missing
    assert verdict([right[0], obj("square", "green", *place(b))]) is None  # wrong colour
    assert verdict(right + [obj("triangle", "green", 0.75, 0.75, 0.2)]) is None  # an extra object
    no_relation = spec_of("colour_attribution", "p", ("red", "circle", 1), ("blue", "square", 1))
    assert relation_verdict(no_relation, detect_objects(render_scene(Scene(tuple(right), "p", "pair"), 32, 32))) is None


def test_relation_uses_the_dominant_axis_in_pixels():
    def det(x: float, y: float, size=(32, 32)) -> Detection:
        return Detection("circle", "red", "small", (x - 0.1, y - 0.1, x + 0.1, y + 0.1), 10, image_size=size)

    assert relation_holds("left of", det(0.2, 0.5), det(0.8, 0.6))
    assert not relation_holds("left of", det(0.2, 0.1), det(0.4, 0.9))  # mostly above, not left of
    assert relation_holds("above", det(0.2, 0.1), det(0.4, 0.9))
    # Normalised offsets (0.3, 0.4) on a 64x32 canvas are (19.2, 12.8) px: left of, not above.
    assert relation_holds("left of", det(0.2, 0.1, (64, 32)), det(0.5, 0.5, (64, 32)))
    assert not relation_holds("above", det(0.2, 0.1, (64, 32)), det(0.5, 0.5, (64, 32)))


def test_score_is_the_mean_of_category_pass_rates():
    a = spec_of("colours", "a red circle", ("red", "circle", 1))
    b = spec_of("counting", "two red circles", (None, "circle", 2))
    result = score([(a, True), (a, False), (a, False), (a, True), (b, True)])
    assert result == {"overall": 0.75, "categories": {"counting": 1.0, "colours": 0.5}, "n_images": 5}
    with pytest.raises(OmniditError):
        score([])


def test_spec_validation():
    with pytest.raises(OmniditError):
        spec_of("colours", "x", ("mauve", "circle", 1))
    with pytest.raises(OmniditError):
        spec_of("position", "x", ("red", "circle", 1), relation="left of")
    with pytest.raises(OmniditError, match="two single objects"):  # a relation between groups is not judged
        spec_of("position", "x", ("red", "circle", 2), ("blue", "square", 1), relation="left of")
    with pytest.raises(OmniditError):
        spec_of("sizes", "x", ("red", "circle", 1))


# ---- manifest -----------------------------------------------------------------------------------


def test_manifest_round_trip_and_prompt_list(tmp_path):
    specs = build_prompts(seed=0, per_category=2)
    path = write_manifest(specs, 3, tmp_path)
    assert path == tmp_path / "manifest.json"
    entries = read_manifest(tmp_path)
    assert len(entries) == 3 * len(specs)
    assert entries[4] == (image_name(1, 1), specs[1]) and image_name(12, 3) == "00012_3.png"
    assert [s for _, s in entries[::3]] == specs
    lines = write_prompt_list(specs, tmp_path / "prompts.txt").read_text().splitlines()
    assert lines == [s.prompt for s in specs]


def test_bad_or_missing_manifest_raises(tmp_path):
    with pytest.raises(OmniditError, match="no shapes-suite manifest") as info:
        read_manifest(tmp_path)
    assert info.value.hint
    bad = tmp_path / "m.json"
    for content in ("{not json", json.dumps({"format": "other"}), json.dumps([1, 2]),
                    json.dumps({"format": "omnidit-shapes-suite", "version": 99, "images": []}),
                    json.dumps({"format": "omnidit-shapes-suite", "version": 1, "images": [{"file": "a.png"}]}),
                    json.dumps({"format": "omnidit-shapes-suite", "version": 1, "images": [
                        {"file": "a.png", "category": "colours", "prompt": "p", "objects": [["mauve", "circle", 1]],
                         "relation": None}]})):
        bad.write_text(content)
        with pytest.raises(OmniditError):
            read_manifest(bad)

