"""Datasets: shapes (procedural), digits (sklearn), imagefolder; plus build_dataset and collation."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from omnidit.data import (
    COLOURS,
    DEFAULT_HELD_OUT,
    DIGIT_NAMES,
    RELATIONS,
    SCENE_KINDS,
    SHAPES,
    DigitsDataset,
    ImageFolderDataset,
    Scene,
    ShapeObject,
    ShapesDataset,
    batch_from_indices,
    build_dataset,
    counterfactual_batch,
    render_scene,
)
from omnidit.data.digits import split_indices
from omnidit.data.shapes import (
    OPPOSITE_RELATION,
    counterfactual_scene,
    fewer_scene,
    reversed_scene,
    swapped_colours_scene,
    to_tensor,
)
from omnidit.errors import OmniditError

N_SCENES = 3000


@pytest.fixture(scope="module")
def scenes():
    ds = ShapesDataset(32, 32, seed=0)
    return [ds.scene(i) for i in range(N_SCENES)]


# ------------------------------------------------------------------------------------------ shapes


def test_shapes_deterministic_by_seed_and_index():
    a, b, c = ShapesDataset(seed=3), ShapesDataset(seed=3), ShapesDataset(seed=4)
    for i in (0, 7, 123456789):
        assert torch.equal(a[i]["image"], b[i]["image"])
        assert a[i]["caption"] == b[i]["caption"]
    differs = [not torch.equal(a[i]["image"], c[i]["image"]) for i in range(10)]
    assert sum(differs) >= 8
    assert [a.scene(i).caption for i in range(10)] != [c.scene(i).caption for i in range(10)]


@pytest.mark.parametrize("width,height", [(32, 32), (48, 24), (24, 40)])
def test_shapes_image_shape_and_range(width, height):
    ds = ShapesDataset(width, height)
    assert (ds.channels, ds.width, ds.height, ds.num_classes, ds.num_samples) == (3, width, height, 0, None)
    for i in range(20):
        item = ds[i]
        img = item["image"]
        assert img.shape == (3, height, width) and img.dtype == torch.float32
        assert img.min() >= -1.0 and img.max() <= 1.0
        assert torch.equal(img[:, 0, 0], torch.ones(3))  # the border margin keeps corners white
        assert item["label"] == -1 and isinstance(item["caption"], str)


def test_held_out_pairs_never_drawn(scenes):
    held = {tuple(s.split()) for s in DEFAULT_HELD_OUT}
    drawn = {(o.colour, o.shape) for sc in scenes for o in sc.objects}
    assert not drawn & held
    assert len(drawn) == len(COLOURS) * len(SHAPES) - len(held)  # every other pair does occur
    ds = ShapesDataset(held_out=["orange circle", "cyan square"])
    drawn = {(o.colour, o.shape) for i in range(1000) for o in ds.scene(i).objects}
    assert not drawn & {("orange", "circle"), ("cyan", "square")}
    assert ("red", "triangle") in drawn  # an explicit held_out replaces the default


def test_coverage_of_kinds_shapes_colours_counts_relations(scenes):
    kinds = Counter(sc.kind for sc in scenes)
    assert set(kinds) == set(SCENE_KINDS)
    for kind, weight in SCENE_KINDS.items():  # frequencies follow the weights (binomial tolerance)
        assert abs(kinds[kind] / N_SCENES - weight) < 0.04
    assert {o.shape for sc in scenes for o in sc.objects} == set(SHAPES)
    assert {o.colour for sc in scenes for o in sc.objects} == set(COLOURS)
    assert {len(sc.objects) for sc in scenes} == {1, 2, 3, 4}
    assert {sc.relation for sc in scenes if sc.kind == "relation"} == set(RELATIONS)
    assert {o.size for sc in scenes for o in sc.objects} == {"small", "large"}


def test_scene_structure(scenes):
    for sc in scenes:
        objs = sc.objects
        if sc.kind == "single":
            assert len(objs) == 1
        elif sc.kind == "count":
            assert 2 <= len(objs) <= 4
            assert len({(o.colour, o.shape, o.size) for o in objs}) == 1
        else:
            assert len(objs) == 2 and (objs[0].colour, objs[0].shape) != (objs[1].colour, objs[1].shape)
        assert (sc.relation is not None) == (sc.kind == "relation")


def test_layout_inside_canvas_and_non_overlapping(scenes):
    for sc in scenes:
        for o in sc.objects:
            x0, y0, x1, y1 = o.box
            assert 0.0 < x0 < x1 < 1.0 and 0.0 < y0 < y1 < 1.0
        for i, a in enumerate(sc.objects):
            for b in sc.objects[i + 1 :]:
                apart_x = a.box[2] < b.box[0] or b.box[2] < a.box[0]
                apart_y = a.box[3] < b.box[1] or b.box[3] < a.box[1]
                assert apart_x or apart_y, sc


def test_sizes_are_distinct_classes(scenes):
    sides = {"small": [], "large": []}
    for sc in scenes:
        for o in sc.objects:
            sides[o.size].append((o.box[2] - o.box[0]) * 32)
            assert abs((o.box[2] - o.box[0]) - (o.box[3] - o.box[1])) < 1e-9  # square box at 32x32
    assert 7.9 <= min(sides["small"]) and max(sides["small"]) <= 9.1
    assert 13.9 <= min(sides["large"]) and max(sides["large"]) <= 16.1


def test_reversed_scene_reverses_the_relation_and_nothing_else(scenes):
    from omnidit.evaluate.shapes_suite import relation_holds

    relations = [s for s in scenes if s.kind == "relation"]
    assert len(relations) > 100
    for sc in relations:
        r = reversed_scene(sc)
        assert r.relation == OPPOSITE_RELATION[sc.relation] and r.kind == "relation"
        assert relation_holds(r.relation, *r.objects) and not relation_holds(sc.relation, *r.objects)
        axis = 0 if sc.relation in ("left of", "right of") else 1
        for a, b in zip(sc.objects, r.objects):
            assert (a.shape, a.colour, a.size) == (b.shape, b.colour, b.size)
            assert a.box[1 - axis] == b.box[1 - axis] and a.box[3 - axis] == b.box[3 - axis]  # off axis: kept
        extent = [(min(o.box[axis] for o in s.objects), max(o.box[axis + 2] for o in s.objects)) for s in (sc, r)]
        assert np.allclose(extent[0], extent[1], atol=1e-12)  # the pair trades places within its extent
        # The caption changes only in the relation's words.
        words = {"left of": "left", "right of": "right", "above": "above", "below": "below"}
        assert r.caption == sc.caption.replace(f" {words[sc.relation]} ", f" {words[r.relation]} ")
        twice = reversed_scene(r)
        assert twice.caption == sc.caption and all(
            np.allclose(a.box, b.box, atol=1e-12) for a, b in zip(sc.objects, twice.objects))
    assert all(reversed_scene(s) is None for s in scenes[:200] if s.kind != "relation")


def test_reversed_scenes_are_placed_like_real_scenes_of_the_opposite_relation():
    # Mean centre of the first-named object in real "right of" / "below" scenes against the reversed
    # "left of" / "above" scenes: equal within noise (0.0035 standard error). A reflection of the whole
    # canvas misses by about 0.05 (the layout's pairs sit slightly past the centre).
    ds = ShapesDataset(32, 32, seed=11, kinds={"relation": 1})
    scenes = [ds.scene(i) for i in range(20000)]
    for relation, source, axis in (("right of", "left of", 0), ("below", "above", 1)):
        for k in (0, 1):
            real = np.mean([s.objects[k].centre[axis] for s in scenes if s.relation == relation])
            made = np.mean([reversed_scene(s).objects[k].centre[axis] for s in scenes if s.relation == source])
            assert abs(real - made) < 0.01, (relation, k, real, made)


def test_counterfactual_items_render_the_reversed_scene_and_the_detector_agrees():
    from omnidit.evaluate.detector import detect_objects
    from omnidit.evaluate.shapes_suite import relation_holds

    ds = ShapesDataset(32, 32, seed=3, kinds={"relation": 1, "single": 1})
    rows, images, captions = counterfactual_batch(ds, range(40))
    assert 10 < len(rows) < 40 and images.shape == (len(rows), 3, 32, 32) and len(captions) == len(rows)
    for row, image, caption in zip(rows, images, captions):
        scene = reversed_scene(ds.scene(row))
        assert caption == scene.caption
        assert torch.equal(image, to_tensor(render_scene(scene, 32, 32)))
        found = detect_objects(image)
        assert len(found) == 2
        a = next(d for d in found if (d.colour, d.shape) == (scene.objects[0].colour, scene.objects[0].shape))
        b = next(d for d in found if d is not a)
        assert relation_holds(scene.relation, a, b)
    assert counterfactual_batch(ds, [i for i in range(40) if i not in rows][:5]) == ([], None, [])


def _words_without_articles(caption: str) -> list[str]:
    words = caption.split()
    for article, word in zip(words, words[1:]):  # "a"/"an" agrees with the word after it
        if article in ("a", "an"):
            assert article == ("an" if word[0] in "aeiou" else "a"), caption
    return [w for w in words if w not in ("a", "an")]


def test_swapped_colours_scene_swaps_the_colours_and_nothing_else(scenes):
    allowed = ShapesDataset(32, 32).allowed
    swapped = 0
    for sc in scenes:
        partner = swapped_colours_scene(sc, allowed)
        if sc.kind not in ("pair", "relation"):
            assert partner is None
            continue
        a, b = sc.objects
        if a.colour == b.colour or a.shape == b.shape:  # the swap would not change the caption's meaning
            assert partner is None
            continue
        if partner is None:  # only where a swapped pair is held out
            assert (b.colour, a.shape) not in allowed or (a.colour, b.shape) not in allowed
            continue
        swapped += 1
        assert (partner.kind, partner.relation) == (sc.kind, sc.relation)
        for old, new, other in zip(sc.objects, partner.objects, sc.objects[::-1]):
            assert (new.shape, new.size, new.box, new.colour) == (old.shape, old.size, old.box, other.colour)
            assert (new.colour, new.shape) in allowed
        # The caption: the same words with the two colour words exchanged (articles re-agreed).
        trade = {a.colour: b.colour, b.colour: a.colour}
        expected = [trade.get(w, w) for w in _words_without_articles(sc.caption)]
        assert _words_without_articles(partner.caption) == expected
    assert swapped > 300
    # A swap that would render a held-out pair ("blue circle" by default) is refused.
    circle = ShapeObject("circle", "red", "small", (0.1, 0.1, 0.35, 0.35))
    square = ShapeObject("square", "blue", "small", (0.6, 0.6, 0.85, 0.85))
    assert swapped_colours_scene(Scene((circle, square), "a red circle and a blue square", "pair"), allowed) is None
    circle, square = replace(circle, colour="orange"), replace(square, colour="pink")
    scene = Scene((circle, square), "an orange circle and a pink square", "pair")
    assert swapped_colours_scene(scene, allowed).caption == "a pink circle and an orange square"


def test_fewer_scene_drops_one_object_and_counts_one_fewer(scenes):
    counts = [s for s in scenes if s.kind == "count"]
    assert len(counts) > 300
    for sc in counts:
        partner = fewer_scene(sc)
        assert partner.objects == sc.objects[:-1]
        n = len(partner.objects)
        assert partner.kind == ("single" if n == 1 else "count")
        words = sc.caption.split()
        expected = [{1: "one", 2: "two", 3: "three"}[n], *words[1:]]
        if n == 1:
            expected[-1] = sc.objects[0].shape  # singular
        assert partner.caption == " ".join(expected)
    assert all(fewer_scene(s) is None for s in scenes if s.kind != "count")


def test_counterfactual_scene_picks_the_named_fact(scenes):
    allowed = ShapesDataset(32, 32).allowed
    for sc in scenes[:500]:
        every = counterfactual_scene(sc, ["count", "colours", "relation"], allowed)
        if sc.kind == "relation":  # reversed in preference to a colour swap
            assert every == reversed_scene(sc)
            assert counterfactual_scene(sc, ["colours"], allowed) == swapped_colours_scene(sc, allowed)
        elif sc.kind == "pair":
            assert every == swapped_colours_scene(sc, allowed)
        elif sc.kind == "count":
            assert every == fewer_scene(sc)
            assert counterfactual_scene(sc, ["relation", "colours"], allowed) is None
        else:
            assert every is None
        assert counterfactual_scene(sc, ["relation"], allowed) == reversed_scene(sc)
    for bad in ([], ["colour"], "relation"):
        with pytest.raises(OmniditError, match="counterfactual"):
            ShapesDataset(32, 32, counterfactuals=bad)


def test_colour_and_count_partners_render_and_the_detector_agrees():
    from omnidit.evaluate.detector import detect_objects

    ds = ShapesDataset(32, 32, seed=4, kinds={"pair": 1, "count": 1, "single": 1},
                       counterfactuals=["colours", "count"])
    rows, images, captions = counterfactual_batch(ds, range(60))
    kinds = [ds.scene(r).kind for r in rows]
    assert kinds.count("pair") > 5 and kinds.count("count") > 5 and "single" not in kinds
    for row, image, caption in zip(rows, images, captions):
        scene = counterfactual_scene(ds.scene(row), ds.counterfactuals, ds.allowed)
        assert caption == scene.caption
        found = sorted((d.colour, d.shape) for d in detect_objects(image))
        assert found == sorted((o.colour, o.shape) for o in scene.objects), (caption, found)


def test_relations_hold_geometrically(scenes):
    for sc in (s for s in scenes if s.kind == "relation"):
        (ax, ay), (bx, by) = sc.objects[0].centre, sc.objects[1].centre
        a, b = sc.objects[0].box, sc.objects[1].box
        main, off = {"left of": (bx - ax, by - ay), "right of": (ax - bx, ay - by),
                     "above": (by - ay, bx - ax), "below": (ay - by, ax - bx)}[sc.relation]
        assert main * 32 > 8  # centres clearly apart along the relation's axis
        assert abs(off) <= 0.5 * main + 1e-9  # and the relation is the dominant direction
        if sc.relation == "left of":
            assert a[2] < b[0]
        elif sc.relation == "right of":
            assert b[2] < a[0]
        elif sc.relation == "above":
            assert a[3] < b[1]
        else:
            assert b[3] < a[1]


def test_captions_name_what_is_drawn(scenes):
    words = {2: "two", 3: "three", 4: "four"}
    phrase = {"left of": " to the left of ", "right of": " to the right of ", "above": " above ",
              "below": " below "}
    for sc in scenes:
        cap = sc.caption
        for o in sc.objects:
            assert o.colour in cap and o.shape in cap
        if sc.kind == "count":
            assert cap.startswith(words[len(sc.objects)] + " ") and cap.endswith(sc.objects[0].shape + "s")
        if sc.kind == "relation":  # the subject comes first in the caption
            first, second = cap.split(phrase[sc.relation])
            assert sc.objects[0].colour in first and sc.objects[0].shape in first
            assert sc.objects[1].colour in second and sc.objects[1].shape in second
        if sc.kind == "pair":
            assert " and " in cap
        assert " a orange" not in cap and not cap.startswith("a orange")
    caps = [sc.caption for sc in scenes]
    assert any(c.startswith("an orange") for c in caps)
    with_size = sum(("small" in c or "large" in c) for c in caps) / len(caps)
    assert 0.2 < with_size < 0.4  # size is mentioned optionally, about 30% of the time


@pytest.mark.parametrize("width,height", [(32, 32), (48, 24)])
def test_rendered_centre_pixels_have_object_colour(width, height):
    ds = ShapesDataset(width, height, seed=1)
    for i in range(300):
        sc = ds.scene(i)
        for w, h in ((width, height), (64, 64)):  # native size and a re-render at another size
            img = render_scene(sc, w, h)
            assert img.shape == (h, w, 3) and img.dtype == np.uint8
            for o in sc.objects:
                cx, cy = o.centre
                assert tuple(img[int(cy * h), int(cx * w)]) == COLOURS[o.colour], (sc, w, h)
            used = {tuple(p) for p in np.unique(img.reshape(-1, 3), axis=0).tolist()}
            assert used <= {(255, 255, 255)} | {COLOURS[o.colour] for o in sc.objects}


def test_shape_masks_look_like_their_names():
    # One large object of each shape: the fill ratios of its box match the geometry.
    expected = {"square": 1.0, "circle": np.pi / 4, "diamond": 0.5, "triangle": 0.5}
    for shape, ratio in expected.items():
        sc = Scene((ShapeObject(shape, "blue", "large", (0.25, 0.25, 0.75, 0.75)),), "", "single")
        img = render_scene(sc, 128, 128)
        filled = (img != 255).any(-1)[32:96, 32:96].mean()
        assert abs(filled - ratio) < 0.04, shape
        if shape == "triangle":  # apex up: the top row is narrower than the bottom row
            rows = (img != 255).any(-1)[32:96].sum(1)
            assert rows[2] < rows[-3]


def test_colours_are_well_separated():
    rgb = np.array(list(COLOURS.values()), dtype=float)
    d = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb)) * 1e9
    assert d.min() > 80
    assert np.linalg.norm(rgb - 255, axis=-1).min() > 80  # far from the white background
    assert np.linalg.norm(rgb, axis=-1).min() > 80  # and from black


# ------------------------------------------------------------------------------------------ digits


def test_digits_splits():
    train, test, full = split_indices("train"), split_indices("test"), split_indices("all")
    assert len(train) + len(test) == len(full) == 1797
    assert len(test) == 359
    assert not set(train.tolist()) & set(test.tolist())
    assert np.array_equal(split_indices("train"), train)  # fixed permutation
    assert DigitsDataset(split="train", seed=5).num_samples == len(train)  # independent of seed
    with pytest.raises(OmniditError):
        DigitsDataset(split="val")


def test_digits_items():
    ds = DigitsDataset(16, 16, split="test")
    assert (ds.channels, ds.num_classes, ds.width, ds.height, len(ds)) == (1, 10, 16, 16, 359)
    labels = set()
    for i in range(0, len(ds), 7):
        item = ds[i]
        assert item["image"].shape == (1, 16, 16)
        assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert item["caption"] == f"the digit {DIGIT_NAMES[item['label']]}"
        labels.add(item["label"])
    assert labels == set(range(10))
    assert ds[0]["image"].min() == -1.0  # background is -1


def test_digits_native_and_resized():
    from sklearn.datasets import load_digits

    raw = load_digits()
    ds8 = DigitsDataset(8, 8, split="all")
    assert torch.allclose(ds8[5]["image"][0], torch.from_numpy(raw.images[5]).float() / 8 - 1)
    assert ds8[5]["label"] == raw.target[5]
    ds = DigitsDataset(width=20, height=28, split="all")
    img = ds[5]["image"]
    assert img.shape == (1, 28, 20)
    small = DigitsDataset(4, 4, split="all")[5]["image"][0]  # antialiased: a smoothed block mean
    blocks = ds8[5]["image"][0].reshape(4, 2, 4, 2).mean((1, 3))
    assert abs(small.mean() - blocks.mean()) < 0.1
    assert torch.corrcoef(torch.stack([small.flatten(), blocks.flatten()]))[0, 1] > 0.9


# ------------------------------------------------------------------------------------- imagefolder


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (20, 40), (0, 0, 255)).save(tmp_path / "sub" / "b.JPG")
    (tmp_path / "sub" / "b.txt").write_text("a blue thing\n")
    Image.new("L", (30, 30), 0).save(tmp_path / "c.bmp")
    Image.new("RGBA", (30, 30), (0, 255, 0, 255)).save(tmp_path / "d.webp")
    (tmp_path / "d.txt").write_text("txt wins")
    Image.new("RGB", (16, 16), (0, 0, 0)).save(tmp_path / "e.png")  # no caption anywhere
    (tmp_path / "zz_bad.png").write_bytes(np.random.default_rng(0).bytes(300))
    (tmp_path / "notes.md").write_text("not an image")
    rows = [{"file_name": "a.png", "text": "a red thing"}, {"file_name": "c.bmp", "text": "black"},
            {"file_name": "d.webp", "text": "metadata loses"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path


def test_imagefolder_reads_captions_and_skips_corrupt(folder):
    with pytest.warns(UserWarning) as record:
        ds = ImageFolderDataset(folder, width=24, height=16)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "skipped 1 of 6 images" in msg and "zz_bad.png" in msg
    assert (len(ds), ds.num_samples, ds.channels, ds.num_classes) == (5, 5, 3, 0)
    names = [p.relative_to(folder).as_posix() for p in ds.files]
    assert names == ["a.png", "c.bmp", "d.webp", "e.png", "sub/b.JPG"]
    captions = [ds[i]["caption"] for i in range(len(ds))]
    assert captions == ["a red thing", "black", "txt wins", "", "a blue thing"]
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 16, 24) and item["label"] == -1
        assert item["image"].min() >= -1 and item["image"].max() <= 1
    red = ds[0]["image"]
    assert torch.allclose(red, torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 16, 24), atol=0.02)
    assert torch.allclose(ds[2]["image"][1], torch.ones(16, 24), atol=0.02)  # green, alpha dropped


def test_imagefolder_grayscale_and_centre_crop(tmp_path):
    img = np.zeros((20, 60), dtype=np.uint8)
    img[:, 14:46] = 255  # white middle: the centre crop (columns 20-40) of a wide image sees only it
    Image.fromarray(img).save(tmp_path / "x.png")
    ds = ImageFolderDataset(tmp_path, width=10, height=10, channels=1)
    out = ds[0]["image"]
    assert out.shape == (1, 10, 10)
    assert out.min() > 0.9


def test_imagefolder_decode_failure_falls_back(folder, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = ImageFolderDataset(folder, width=8, height=8)
    real = ds.load

    def flaky(i):
        if i in (1, 2):
            raise OSError("truncated")
        return real(i)

    monkeypatch.setattr(ds, "load", flaky)
    with pytest.warns(UserWarning) as record:
        item = ds[1]
        again = ds[2]
    assert len(record) == 1
    assert item["caption"] == again["caption"] == ""  # both fall back to index 3 (e.png)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(OmniditError):
        ImageFolderDataset(tmp_path / "missing", 8, 8)
    with pytest.raises(OmniditError):
        ImageFolderDataset(tmp_path, 8, 8)  # empty
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(OmniditError), pytest.warns(UserWarning):
        ImageFolderDataset(tmp_path, 8, 8)  # nothing readable
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(OmniditError), pytest.warns(UserWarning):
        ImageFolderDataset(tmp_path, 8, 8)


# ---------------------------------------------------------------------------- build + collation


def test_build_dataset():
    ds = build_dataset("shapes", 48, 24, seed=2, held_out=["red circle"])
    assert isinstance(ds, ShapesDataset) and (ds.width, ds.height, ds.seed) == (48, 24, 2)
    assert ds.held_out == {("red", "circle")}
    assert build_dataset("shapes", 32, 32).held_out == frozenset()
    assert build_dataset("shapes", 32, 32, held_out="Red Circle, blue square").held_out == {
        ("red", "circle"), ("blue", "square")}
    digits = build_dataset("digits", 16, 16, split="test")
    assert isinstance(digits, DigitsDataset) and digits.num_samples == 359
    for bad in (dict(name="mnist"), dict(name="shapes", held_out=["mauve triangle"]),
                dict(name="shapes", held_out=["red hexagon"]), dict(name="shapes", held_out=["red"]),
                dict(name="digits", split="val"), dict(name="imagefolder")):
        kwargs = {"width": 32, "height": 32, **bad}
        with pytest.raises(OmniditError) as e:
            build_dataset(**kwargs)
        assert e.value.hint
    only_relations = build_dataset("shapes", 32, 32, scene_kinds={"relation": 1.0})
    assert {only_relations.scene(i).kind for i in range(50)} == {"relation"}
    mixed = Counter(build_dataset("shapes", 32, 32, scene_kinds={"single": 1, "pair": 3}).scene(i).kind
                    for i in range(400))
    assert set(mixed) == {"single", "pair"} and 0.65 < mixed["pair"] / 400 < 0.85  # 0.75 expected
    assert build_dataset("shapes", 32, 32, scene_kinds={}).kinds == SCENE_KINDS  # {} = the default mix
    for kinds, message in (({"triple": 1}, "unknown scene kind 'triple'"), ({"pair": -1, "single": 2}, "non-negative"),
                           ({"pair": 0}, "positive sum")):
        with pytest.raises(OmniditError, match=message) as e:
            ShapesDataset(32, 32, kinds=kinds)
        assert "relation" in e.value.hint
    with pytest.raises(OmniditError, match="unknown dataset") as e:
        build_dataset("mnist", 32, 32)
    assert "shapes" in e.value.hint and "imagefolder" in e.value.hint


def test_batch_from_indices():
    images, captions, labels = batch_from_indices(ShapesDataset(40, 24), [0, 5, 9])
    assert images.shape == (3, 3, 24, 40) and len(captions) == 3 and labels.tolist() == [-1] * 3
    images, captions, labels = batch_from_indices(DigitsDataset(split="test"), range(4))
    assert images.shape == (4, 1, 16, 16) and labels.dtype == torch.long
    assert captions == [f"the digit {DIGIT_NAMES[k]}" for k in labels.tolist()]
