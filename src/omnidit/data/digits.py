"""Real handwritten digits: scikit-learn's bundled 8x8 digits (1797 images, no download).

A small class-conditional / text-conditional dataset with real (not procedural) variation. The
train/test split is a fixed permutation, so every run and every machine sees the same split.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from omnidit.errors import OmniditError

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOCABULARY = frozenset(("the", "digit", *DIGIT_NAMES))  # every word of a caption, "the digit seven"
SPLITS = ("train", "test", "all")
TEST_FRACTION = 0.2
SPLIT_SEED = 0  # fixed on purpose: the split must not move with the training seed

_CACHE: dict[str, np.ndarray] = {}


def _load() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8) float32 in 0..16, labels (N,) int64), loaded once per process."""
    if not _CACHE:
        from sklearn.datasets import load_digits  # slow import; only when digits are used

        bunch = load_digits()
        _CACHE["images"] = bunch.images.astype(np.float32)
        _CACHE["labels"] = bunch.target.astype(np.int64)
    return _CACHE["images"], _CACHE["labels"]


def split_indices(split: str) -> np.ndarray:
    """Indices into the full 1797-image set for ``split`` ("train", "test" or "all")."""
    if split not in SPLITS:
        raise OmniditError(f"unknown digits split {split!r}", hint=f"choose one of: {', '.join(SPLITS)}")
    n = len(_load()[1])
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = round(n * TEST_FRACTION)
    return {"train": perm[: n - n_test], "test": perm[n - n_test :], "all": np.arange(n)}[split]


class DigitsDataset(Dataset):
    """``ds[i]`` -> {"image": (1, H, W) in [-1, 1], "caption": "the digit seven", "label": 7}.

    ``seed`` is accepted for a uniform dataset interface; the split itself never depends on it.
    """

    channels = 1
    num_classes = 10

    def __init__(self, width: int = 16, height: int = 16, split: str = "train", seed: int = 0) -> None:
        if int(width) < 1 or int(height) < 1:
            raise OmniditError(f"image size must be positive, got {width}x{height}")
        self.width, self.height, self.split, self.seed = int(width), int(height), split, seed
        idx = split_indices(split)
        images, labels = _load()
        x = torch.from_numpy(images[idx]).unsqueeze(1) / 8.0 - 1.0  # (N, 1, 8, 8), 0 -> -1, 16 -> +1
        if (self.height, self.width) != (8, 8):
            down = self.height < 8 or self.width < 8
            x = F.interpolate(x, size=(self.height, self.width), mode="bilinear", align_corners=False,
                              antialias=down)
        self.images = x.clamp(-1.0, 1.0).contiguous()  # (N, 1, H, W), resized once up front
        self.labels = torch.from_numpy(labels[idx].copy())  # (N,)
        self.num_samples = len(idx)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"digits index {index} out of range for {self.num_samples} samples")
        label = int(self.labels[index])
        image = self.images[index].clone()  # a caller mutating it in place must not touch the cache
        return {"image": image, "caption": f"the digit {DIGIT_NAMES[label]}", "label": label}
