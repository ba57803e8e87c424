"""A digit classifier that judges class-conditional samples ("does this look like a seven?").

The judge is an RBF support-vector machine fitted on the real 8x8 digits of the *train* split only,
so its accuracy on the held-out test split (~99%) is an honest ceiling for what a perfect generator
would score. Samples of any size are resized to 8x8 with area averaging (what the scanner did to the
original 32x32 bitmaps) and mapped to scikit-learn's 0..16 scale before classification.

Generated images usually reach the judge at 16x16 or 32x32 and go back down to 8x8. That round trip
blurs a little, so the training set also holds copies of every train image sent through the same
upsample -> area-downsample round trip at a few sizes; with them the judge scores as well on
round-tripped test images as on the originals.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from omnidit.data.digits import DIGIT_NAMES, DigitsDataset
from omnidit.errors import OmniditError
from omnidit.images import check_image_batch

# Sizes used to augment the training set with resize round trips (square and a non-integer factor).
ROUND_TRIP_SIZES = (12, 16, 32)
# RBF width and margin on 0..16 pixel features (64-D); picked on the train split, stable around here.
SVC_GAMMA = 0.001
SVC_C = 10.0

_JUDGES: dict[int, DigitsJudge] = {}  # one fitted judge per seed per process


def _check_images(images: Tensor) -> None:
    check_image_batch(images, (1,), "digits judge")


def to_features(images: Tensor) -> np.ndarray:
    """(B, 1, H, W) in [-1, 1] -> (B, 64) float64 pixels on scikit-learn's 0..16 scale at 8x8."""
    _check_images(images)
    x = images.detach().to("cpu", torch.float64).clamp(-1.0, 1.0)
    if tuple(x.shape[-2:]) != (8, 8):
        if x.shape[-2] >= 8 and x.shape[-1] >= 8:
            x = F.interpolate(x, size=(8, 8), mode="area")  # mean over each source block
        else:  # smaller than 8 on some side: area would just repeat pixels, bilinear is smoother
            x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    return ((x + 1.0) * 8.0).reshape(len(x), 64).numpy()


def _round_trip(images: Tensor, size: int) -> Tensor:
    """Upsample like ``DigitsDataset`` does; ``to_features`` brings it back to 8x8."""
    up = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return up.clamp(-1.0, 1.0)


class DigitsJudge:
    """RBF-SVM digit classifier fitted on the real train split; deterministic for a given ``seed``.

    ``seed`` only feeds scikit-learn's ``random_state`` (the SVM fit itself is deterministic); it
    keys the per-process cache, so ``DigitsJudge(0)`` twice fits once.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        cached = _JUDGES.get(self.seed)
        if cached is not None:
            self._clf = cached._clf
            return
        from sklearn.svm import SVC  # heavy import; only when a judge is built

        train = DigitsDataset(8, 8, split="train")
        views = [train.images] + [_round_trip(train.images, s) for s in ROUND_TRIP_SIZES]
        x = np.concatenate([to_features(v) for v in views])  # (4 * N, 64)
        y = np.tile(train.labels.numpy(), len(views))  # (4 * N,)
        self._clf = SVC(gamma=SVC_GAMMA, C=SVC_C, random_state=self.seed).fit(x, y)
        _JUDGES[self.seed] = self

    def predict(self, images: Tensor) -> Tensor:
        """(B, 1, H, W) in [-1, 1], any H, W -> (B,) int64 predicted digits."""
        return torch.from_numpy(self._clf.predict(to_features(images)).astype(np.int64))

    def test_accuracy(self) -> float:
        """Accuracy on the real held-out test split at its native 8x8."""
        test = DigitsDataset(8, 8, split="test")
        return float((self.predict(test.images) == test.labels).double().mean())


def judge_digits(judge: DigitsJudge, images: Tensor, labels: Tensor) -> dict:
    """Score samples against the labels they were conditioned on.

    images (B, 1, H, W) in [-1, 1]; labels (B,) ints in 0..9. Returns {"overall": mean of the
    per-class accuracies over the classes present, "categories": {"zero": acc, ...} (classes with no
    samples are left out), "n_images": B}. Averaging per class keeps an unbalanced batch from hiding a
    class the model cannot draw.
    """
    labels = torch.as_tensor(labels).detach().to("cpu").reshape(-1).long()
    if len(labels) != len(images):
        raise OmniditError(f"got {len(images)} images but {len(labels)} labels",
                           hint="pass one label per image")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise OmniditError("digit labels must be in 0..9", hint=f"got values {sorted(set(labels.tolist()))}")
    correct = judge.predict(images) == labels  # (B,)
    categories = {DIGIT_NAMES[c]: float(correct[labels == c].double().mean())
                  for c in range(10) if bool((labels == c).any())}
    return {"overall": float(np.mean(list(categories.values()))), "categories": categories,
            "n_images": int(len(labels))}
