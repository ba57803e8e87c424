"""omnidit.evaluate.detector: exactness on ground-truth renders at several sizes, robustness, inputs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from omnidit.data.shapes import COLOURS, Scene, ShapeObject, ShapesDataset, render_scene, to_tensor
from omnidit.errors import OmniditError
from omnidit.evaluate.detector import Detection, detect_objects


def box_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def count_errors(scene: Scene, detections: list[Detection]) -> tuple[int, list[str]]:
    """Greedy box-IoU matching; an error is a missing or wrong object, or an extra detection."""
    errors, used = [], set()
    for obj in scene.objects:
        candidates = [(box_iou(obj.box, d.box), j) for j, d in enumerate(detections) if j not in used]
        iou, j = max(candidates, default=(0.0, -1))
        if iou < 0.3:
            errors.append(f"missing {obj.size} {obj.colour} {obj.shape}")
            continue
        used.add(j)
        found = detections[j]
        if (found.shape, found.colour, found.size) != (obj.shape, obj.colour, obj.size):
            errors.append(f"{obj.size} {obj.colour} {obj.shape} detected as {found.describe()}")
    errors += [f"extra {d.describe()}" for j, d in enumerate(detections) if j not in used]
    return len(errors), errors


def accuracy(width: int, height: int, n: int, seed: int = 1, corrupt=None) -> tuple[float, int, list[str]]:
    """Object accuracy = 1 - errors / objects over ``n`` renders (all colour-shape pairs)."""
    ds = ShapesDataset(width, height, seed=seed, held_out=())
    n_objects, n_errors, examples = 0, 0, []
    for i in range(n):
        scene = ds.scene(i)
        image = render_scene(scene, width, height)
        if corrupt is not None:
            image = corrupt(image, i)
        k, errs = count_errors(scene, detect_objects(image))
        n_objects += len(scene.objects)
        n_errors += k
        examples += [f"#{i} {scene.caption!r}: {e}" for e in errs]
    return 1 - n_errors / n_objects, n_objects, examples


def test_exact_on_2000_renders_at_32px():
    acc, n_objects, examples = accuracy(32, 32, 2000)
    assert acc >= 0.99, f"32x32 accuracy {acc:.4f} over {n_objects} objects; e.g. {examples[:5]}"


@pytest.mark.parametrize("width,height", [(64, 64), (48, 32), (32, 64)])
def test_exact_at_other_sizes_and_aspect_ratios(width, height):
    acc, n_objects, examples = accuracy(width, height, 500, seed=2)
    assert acc >= 0.99, f"{width}x{height} accuracy {acc:.4f} over {n_objects} objects; e.g. {examples[:5]}"


def noisy(image: np.ndarray, i: int) -> np.ndarray:
    """Gaussian noise (std 8/255) plus five stray pixels of random colours."""
    rng = np.random.default_rng(i)
    out = image.astype(np.float64) + rng.normal(0, 8, image.shape)
    h, w = image.shape[:2]
    for _ in range(5):
        out[rng.integers(h), rng.integers(w)] = rng.integers(0, 256, 3)
    return np.clip(out, 0, 255).astype(np.uint8)


def test_robust_to_noise_and_stray_pixels():
    acc, n_objects, examples = accuracy(32, 32, 300, seed=3, corrupt=noisy)
    assert acc >= 0.99, f"noisy 32x32 accuracy {acc:.4f} over {n_objects} objects; e.g. {examples[:5]}"


def test_one_noisy_scene_detected_exactly():
    scene = Scene((ShapeObject("circle", "red", "large", (0.05, 0.05, 0.52, 0.52)),
                   ShapeObject("triangle", "blue", "small", (0.65, 0.6, 0.92, 0.87))), "x", "pair")
    detections = detect_objects(noisy(render_scene(scene, 32, 32), 0))
    assert [(d.shape, d.colour, d.size) for d in detections] == [("circle", "red", "large"),
                                                                  ("triangle", "blue", "small")]
    assert detections[0].centre[0] < detections[1].centre[0]
    assert detections[0].image_size == (32, 32) and 0.9 < detections[0].fit <= 1.0


def test_soft_edges_keep_their_colour():
    """A blurred rim of a red shape is a red-white blend (nearest palette colour: pink); it must not
    become a pink ring around the red object."""
    from PIL import ImageFilter
    scene = Scene((ShapeObject("square", "red", "large", (0.2, 0.2, 0.68, 0.68)),), "x", "single")
    image = Image.fromarray(render_scene(scene, 64, 64)).filter(ImageFilter.GaussianBlur(1.0))
    assert [(d.shape, d.colour, d.size) for d in detect_objects(image)] == [("square", "red", "large")]


def test_tensor_pil_and_array_inputs_agree():
    ds = ShapesDataset(48, 32, seed=4, held_out=())
    for i in range(20):
        image = render_scene(ds.scene(i), 48, 32)
        expected = detect_objects(image)
        assert detect_objects(to_tensor(image)) == expected
        assert detect_objects(to_tensor(image)[None]) == expected
        assert detect_objects(Image.fromarray(image)) == expected


def test_every_colour_and_shape_at_both_sizes():
    for colour in COLOURS:
        for shape in ("circle", "square", "triangle", "diamond"):
            for size, side in (("small", 0.26), ("large", 0.47)):
                scene = Scene((ShapeObject(shape, colour, size, (0.3, 0.3, 0.3 + side, 0.3 + side)),), "x", "single")
                found = [(d.shape, d.colour, d.size) for d in detect_objects(render_scene(scene, 32, 32))]
                assert found == [(shape, colour, size)]


def test_blank_and_non_palette_images_have_no_objects():
    assert detect_objects(np.full((32, 32, 3), 255, np.uint8)) == []
    assert detect_objects(np.full((32, 32, 3), 128, np.uint8)) == []  # grey: no palette colour
    assert detect_objects(np.zeros((32, 32, 3), np.uint8)) == []


def test_bad_inputs_raise_omnidit_error():
    with pytest.raises(OmniditError, match="at least"):
        detect_objects(np.full((8, 8, 3), 255, np.uint8))
    with pytest.raises(OmniditError, match="RGB"):
        detect_objects(np.zeros((32, 32), np.uint8))
    with pytest.raises(OmniditError, match="uint8"):
        detect_objects(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(OmniditError, match="shape"):
        detect_objects(to_tensor(np.zeros((32, 32, 3), np.uint8))[:2])


def test_malformed_blobs_are_no_shape():
    from omnidit.data.shapes import COLOURS
    from omnidit.evaluate.detector import UNKNOWN_SHAPE

    img = np.full((32, 32, 3), 255, dtype=np.uint8)
    img[4:16, 8:11] = COLOURS["red"]  # a plus sign
    img[8:11, 3:16] = COLOURS["red"]
    img[20:30, 18:21] = COLOURS["blue"]  # an L
    img[27:30, 18:30] = COLOURS["blue"]
    found = {d.colour: d for d in detect_objects(img)}
    assert set(found) == {"red", "blue"}
    assert all(d.shape == UNKNOWN_SHAPE and d.fit < 0.75 for d in found.values()), found
