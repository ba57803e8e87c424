"""Exact object detector for the procedural shapes domain (``omnidit.data.shapes``).

Pipeline, all numpy, per image:

1. **Pixel colours.** Each pixel is explained as a tint of one palette colour towards the white
   background, p ~ a*colour + (1 - a)*white. The colour whose tint line passes closest wins; the pixel
   is foreground when a >= 0.5. Modelling the tint (not just the nearest palette entry) keeps the
   blurred rim of a generated red shape red: the half-way blend of red and white is nearer to pink
   than to red or white, so nearest-colour labelling would ring every red object with a pink one.
   Pixels far from every tint line (dark, grey) or about equally near two lines are left unlabelled.
2. **Components.** 4-connected components per colour (a vectorised union-find). Fragments smaller
   than MIN_AREA that touch a bigger component of another colour (colour speckle inside a shape) are
   absorbed into it; isolated fragments are dropped as noise.
3. **Shape.** For each candidate shape, the renderer's own mask is fitted to the component by area
   (gives the side) and centroid (gives the centre) and rasterised; the shape with the highest IoU
   wins. Fitting by moments rather than by bounding box ignores ragged edges and stray pixels.
4. **Size.** The fitted side relative to min(H, W), thresholded in the gap between SIZE_RANGE's
   small (0.25-0.28) and large (0.44-0.50).

No 3x3 majority filter: at 32 px it erodes square corners and triangle apexes, and the area fit plus
the minimum area already make single stray pixels harmless.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import binary_fill_holes

from omnidit.data.shapes import BACKGROUND, COLOURS, SIZE_RANGE
from omnidit.data.shapes import _shape_mask as shape_mask  # the renderer's own geometry, one definition
from omnidit.errors import OmniditError

MIN_SIDE = 16  # below this a small object is ~4 px and circle, diamond and square rasterise alike
# Side / min(H, W) between the two size classes: small is 0.25-0.28 and large 0.44-0.50.
SIZE_THRESHOLD = (SIZE_RANGE["small"][1] + SIZE_RANGE["large"][0]) / 2
# A quarter of the smallest object's area (a small triangle or diamond covers half its square).
MIN_AREA = 0.25 * 0.5 * SIZE_RANGE["small"][0] ** 2  # fraction of min(H, W)^2
MAX_RESIDUAL = 100.0  # RGB distance to the nearest tint line beyond which a pixel is no palette colour
# Below this IoU with its best-fitting ideal shape a component is reported as UNKNOWN_SHAPE, so a
# malformed blob never passes as a square. Clean renders fit at >= 0.92 (32 px), renders with
# Gaussian noise of std 8/255 at >= 0.95 and std 16/255 at >= 0.76 for 99% of objects.
MIN_FIT = 0.75
UNKNOWN_SHAPE = "unknown"
AMBIGUITY = 0.75  # the best tint line must be this much closer than the second best
# Tie-break order for equal IoU: at <= 24 px a small square or diamond can rasterise to the very same
# pixels as a circle, but the polygons do so at every sub-pixel offset and the circle only at some.
_FIT_ORDER = ("square", "diamond", "triangle", "circle")
# area / half-side^2; a cross's two bars of width 2r/3 cover 2 (2r/3)(2r) - (2r/3)^2 = 20 r^2 / 9
AREA_FACTOR = {"circle": np.pi, "square": 4.0, "diamond": 2.0, "triangle": 2.0, "cross": 20 / 9}

_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _NAMES], dtype=np.float32)  # (K, 3)
_TOWARD_WHITE = np.array(BACKGROUND, dtype=np.float32) - _PALETTE  # (K, 3) tint directions


@dataclass(frozen=True)
class Detection:
    """One detected object; ``box`` = (x0, y0, x1, y1) normalised to [0, 1], y grows down.

    ``area`` is in pixels, ``fit`` the IoU between the component and its fitted ideal shape (1.0 is a
    perfect render), ``image_size`` = (width, height) of the source image so that geometric judgements
    (left of / above) can be made in pixels whatever the aspect ratio.
    """

    shape: str
    colour: str
    size: str
    box: tuple[float, float, float, float]
    area: int
    fit: float = 1.0
    image_size: tuple[int, int] = (1, 1)

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y), normalised."""
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2, (y0 + y1) / 2)

    @property
    def centre_px(self) -> tuple[float, float]:
        """(x, y) in pixels of the source image."""
        x, y = self.centre
        return (x * self.image_size[0], y * self.image_size[1])

    def describe(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


def to_rgb_array(image: np.ndarray | torch.Tensor | Image.Image) -> np.ndarray:
    """uint8 (H, W, 3) array, PIL image, or float tensor (3, H, W) / (1, 3, H, W) in [-1, 1]
    -> uint8 array (H, W, 3)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] != 3:
            raise OmniditError(f"expected an image tensor of shape (3, H, W), got {tuple(image.shape)}",
                               hint="pass one RGB image in [-1, 1], channels first")
        if not t.is_floating_point():
            raise OmniditError(f"expected a float image tensor in [-1, 1], got dtype {t.dtype}",
                               hint="convert uint8 images with omnidit.data.shapes.to_tensor, or pass a numpy array")
        # Same rounding as omnidit.images.to_pil, so a tensor and its saved PNG detect identically.
        t = ((t.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return t.permute(1, 2, 0).numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise OmniditError(f"expected an RGB image array of shape (H, W, 3), got {array.shape}",
                           hint="convert greyscale images to RGB first")
    if array.dtype != np.uint8:
        raise OmniditError(f"expected a uint8 image array, got dtype {array.dtype}",
                           hint="scale to 0-255 and cast with .astype(np.uint8)")
    return array[..., :3]


def _pixel_colours(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> int labels (H, W): 0 background or unlabelled, k + 1 for palette colour k."""
    p = rgb.reshape(-1, 1, 3).astype(np.float32) - _PALETTE  # (N, K, 3) offset from each colour
    d2 = (_TOWARD_WHITE**2).sum(-1)  # (K,)
    s = np.clip((p * _TOWARD_WHITE).sum(-1) / d2, 0.0, 1.0)  # (N, K): 0 = pure colour, 1 = white
    residual = np.linalg.norm(p - s[..., None] * _TOWARD_WHITE, axis=-1)  # (N, K) distance to tint line
    best = residual.argmin(1)  # (N,)
    two = np.partition(residual, 1, axis=1)  # (N, K): [:, 0] best, [:, 1] second best
    rows = np.arange(len(best))
    foreground = ((s[rows, best] <= 0.5) & (two[:, 0] <= MAX_RESIDUAL) & (two[:, 0] <= AMBIGUITY * two[:, 1]))
    return np.where(foreground, best + 1, 0).reshape(rgb.shape[:2])


def _union_find(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Roots (the smallest member index) of the sets of 0..n-1 joined by edges a[i] -- b[i]."""
    parent = np.arange(n)
    while True:
        ra, rb = parent[a], parent[b]  # trees are flat here, so these are roots
        differ = ra != rb
        if not differ.any():
            return parent
        # Hook every larger root onto the smallest root it touches; parent[i] <= i keeps it acyclic.
        np.minimum.at(parent, np.maximum(ra, rb)[differ], np.minimum(ra, rb)[differ])
        while True:  # pointer jumping until every node points straight at its root
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up


def _components(labels: np.ndarray, min_area: float) -> tuple[np.ndarray, np.ndarray]:
    """labels (H, W) -> (component root per pixel (H*W,), -1 for background; area per root (H*W,))."""
    h, w = labels.shape
    flat = labels.ravel()
    idx = np.arange(h * w).reshape(h, w)
    a = np.concatenate([idx[:, :-1].ravel(), idx[:-1, :].ravel()])  # right and down neighbours
    b = np.concatenate([idx[:, 1:].ravel(), idx[1:, :].ravel()])
    fa, fb = flat[a], flat[b]
    same = (fa == fb) & (fa > 0)
    root = _union_find(h * w, a[same], b[same])
    area = np.bincount(root[flat > 0], minlength=h * w)
    # Absorb fragments into a bigger touching component of another colour (colour speckle in a shape).
    cross = (fa != fb) & (fa > 0) & (fb > 0)
    ra, rb = root[a[cross]], root[b[cross]]
    small_a, small_b = area[ra] < min_area, area[rb] < min_area
    target = np.arange(h * w)
    target[ra[small_a & ~small_b]] = rb[small_a & ~small_b]
    target[rb[small_b & ~small_a]] = ra[small_b & ~small_a]
    root = np.where(flat > 0, target[root], -1)
    area = np.bincount(root[root >= 0], minlength=h * w)
    return root, area


def _fit_shape(ys: np.ndarray, xs: np.ndarray, h: int, w: int, new_shapes: tuple[str, ...] = ()
               ) -> tuple[str, float, float]:
    """Pixels of one component -> (best shape, its fitted half-side r in px, IoU of the fit); ``new_shapes`` (of
    NEW_SHAPES) are fitted too."""
    area = len(ys)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5  # centroid in pixel-centre coordinates
    best = ("circle", 0.0, -1.0)
    for shape in (*_FIT_ORDER, *new_shapes):
        r = float(np.sqrt(area / AREA_FACTOR[shape]))
        sy = cy - r / 3 if shape == "triangle" else cy  # a triangle's centroid sits r/3 below its centre
        # Window holding both the component and the fitted shape.
        i0 = max(min(int(ys.min()), int(np.floor(sy - r))), 0)
        i1 = min(max(int(ys.max()) + 1, int(np.ceil(sy + r)) + 1), h)
        j0 = max(min(int(xs.min()), int(np.floor(cx - r))), 0)
        j1 = min(max(int(xs.max()) + 1, int(np.ceil(cx + r)) + 1), w)
        blob = np.zeros((i1 - i0, j1 - j0), dtype=bool)
        blob[ys - i0, xs - j0] = True
        blob = binary_fill_holes(blob)  # speckles inside a shape are noise, not its outline
        dy = (np.arange(i0, i1) + 0.5 - sy)[:, None]
        dx = (np.arange(j0, j1) + 0.5 - cx)[None, :]
        ideal = shape_mask(shape, dx, dy, r)
        iou = float((ideal & blob).sum() / max((ideal | blob).sum(), 1))
        if iou > best[2]:
            best = (shape, r, iou)
    return best


def detect_objects(image: np.ndarray | torch.Tensor | Image.Image, new_shapes: tuple[str, ...] = ()
                   ) -> list[Detection]:
    """Detect the shapes in one image: uint8 (H, W, 3), PIL, or float tensor (3, H, W) in [-1, 1]. ``new_shapes``:
    shapes of omnidit.data.shapes.NEW_SHAPES to recognise too (never by default, so that the suites' scores of
    models that do not know them stay as they were).

    Returns detections in raster order of their top-left pixel. Works at any resolution with
    min(H, W) >= MIN_SIDE and any aspect ratio (sizes are relative to min(H, W), as in the renderer).
    """
    rgb = to_rgb_array(image)
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise OmniditError(f"the shapes detector needs images of at least {MIN_SIDE}x{MIN_SIDE}, got {w}x{h}",
                           hint="generate at 32x32 or larger")
    unit = min(h, w)
    min_area = max(MIN_AREA * unit * unit, 2.0)
    labels = _pixel_colours(rgb)
    root, area = _components(labels, min_area)
    detections = []
    for r in np.flatnonzero(area >= min_area):
        ys, xs = np.divmod(np.flatnonzero(root == r), w)
        shape, half, fit = _fit_shape(ys, xs, h, w, tuple(new_shapes))
        if fit < MIN_FIT:
            shape = UNKNOWN_SHAPE  # a blob that resembles no shape well enough is no shape at all
        box = (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
        detections.append(Detection(
            shape=shape,
            colour=_NAMES[labels.flat[r] - 1],
            size="large" if 2 * half / unit >= SIZE_THRESHOLD else "small",
            box=tuple(float(v) for v in box),
            area=int(area[r]),
            fit=fit,
            image_size=(w, h),
        ))
    return detections
