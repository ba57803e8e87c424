"""Fréchet distance: the closed form, determinism, and that the fixed features rank real corruptions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from omnidit.data.shapes import ShapesDataset
from omnidit.errors import OmniditError
from omnidit.evaluate import frechet
from omnidit.evaluate.frechet import (
    NUM_FEATURES,
    fit_gaussian,
    frechet_distance,
    frechet_distance_images,
    image_features,
    reference_statistics,
)

N = 500


def _renders(seed: int, n: int = N, width: int = 32, height: int = 32) -> torch.Tensor:
    ds = ShapesDataset(width, height, seed=seed, held_out=())
    return torch.stack([ds[i]["image"] for i in range(n)])  # (n, 3, H, W)


@pytest.fixture(scope="module")
def shapes_pair() -> tuple[torch.Tensor, torch.Tensor]:
    return _renders(0), _renders(1)


@pytest.fixture(scope="module")
def shapes_stats(shapes_pair) -> list[tuple[np.ndarray, np.ndarray]]:
    return [fit_gaussian(image_features(x)) for x in shapes_pair]


def _random_spd(rng: np.random.Generator, f: int) -> np.ndarray:
    a = rng.normal(size=(f, f))
    return a @ a.T / f + 0.1 * np.eye(f)


def test_closed_form_diagonal():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2, the Wasserstein-2 distance between two normals.
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]])) == \
        pytest.approx(9.0 + 1.0)


def test_closed_form_full_covariance():
    # Against the textbook route: the principal square root of S1 S2 by scipy.linalg.sqrtm.
    rng = np.random.default_rng(1)
    s1, s2 = _random_spd(rng, 8), _random_spd(rng, 8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    cross = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_singular_covariances():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(10, 20)))  # fewer samples than features: rank-deficient
    y = torch.from_numpy(rng.normal(size=(10, 20)))
    (mu1, s1), (mu2, s2) = fit_gaussian(x), fit_gaussian(y)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_features_shape_dtype_and_sizes(shapes_pair):
    a = shapes_pair[0][:16]
    feats = image_features(a)
    assert NUM_FEATURES == 256
    assert feats.shape == (16, NUM_FEATURES) and feats.dtype == torch.float64
    for images in (_renders(0, 16, 16, 16), _renders(0, 16, 48, 32), a[:, :1], torch.zeros(3, 1, 5, 7)):
        out = image_features(images)
        assert out.shape == (len(images), NUM_FEATURES) and torch.isfinite(out).all()
    # A 1-channel image is read as the grey RGB image it stands for.
    grey = a.mean(dim=1, keepdim=True)
    assert torch.allclose(image_features(grey), image_features(grey.expand(-1, 3, -1, -1)))
    # Batching does not change the numbers.
    assert torch.allclose(image_features(a, batch_size=5), feats, rtol=0, atol=1e-12)


def test_same_set_is_zero_and_symmetric(shapes_stats):
    fa, fb = shapes_stats
    assert frechet_distance(*fa, *fa) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(*fa, *fb) == pytest.approx(frechet_distance(*fb, *fa), rel=1e-6)


def test_ranks_corruptions(shapes_pair, shapes_stats):
    b = shapes_pair[1]
    ref = shapes_stats[0]

    def fd(images: torch.Tensor) -> float:
        return frechet_distance(*ref, *fit_gaussian(image_features(images)))

    gen = torch.Generator().manual_seed(0)
    blur = F.avg_pool2d(F.pad(b, (1, 1, 1, 1), mode="replicate"), 3, stride=1)  # 3x3 box blur
    baseline = frechet_distance(*ref, *shapes_stats[1])  # an independent set of real renders
    corrupted = {
        "channels permuted": fd(b[:, [1, 2, 0]]),
        "gaussian noise": fd(torch.randn(b.shape, generator=gen).clamp(-1, 1)),
        "blurred": fd(blur),
    }
    for name, value in corrupted.items():
        assert value > 5 * baseline, f"{name}: {value:.3g} vs baseline {baseline:.3g}"
    assert corrupted["gaussian noise"] > max(corrupted["blurred"], corrupted["channels permuted"])


def test_deterministic(shapes_pair, monkeypatch):
    a, b = shapes_pair[0][:100], shapes_pair[1][:100]
    first = frechet_distance_images(a, b)
    assert frechet_distance_images(a, b) == first
    monkeypatch.setattr(frechet, "_WEIGHTS", [])  # rebuild the network from its seed
    assert frechet_distance_images(a, b) == first


def test_reference_statistics():
    mu, sigma = reference_statistics("shapes", 64, 32, 32, seed=0)
    assert mu.shape == (NUM_FEATURES,) and sigma.shape == (NUM_FEATURES, NUM_FEATURES)
    expected = fit_gaussian(image_features(_renders(0, 64)))
    assert np.array_equal(mu, expected[0]) and np.array_equal(sigma, expected[1])
    mu[:] = 0  # callers get copies; the cache is untouched
    assert np.array_equal(reference_statistics("shapes", 64, 32, 32, seed=0)[0], expected[0])
    assert not np.array_equal(reference_statistics("shapes", 64, 32, 32, seed=1)[0], expected[0])
    assert len(frechet._reference_images("digits", 10_000, 16, 16, seed=0)) == 1797  # capped at "all"
    mu, sigma = reference_statistics("digits", 100, 16, 16)
    assert mu.shape == (NUM_FEATURES,) and np.isfinite(sigma).all()


def test_bad_inputs_raise():
    for shape in [(4, 32, 32), (4, 2, 32, 32), (0, 3, 32, 32)]:
        with pytest.raises(OmniditError):
            image_features(torch.zeros(shape))
    with pytest.raises(OmniditError):
        image_features(torch.full((2, 3, 8, 8), float("nan")))
    with pytest.raises(OmniditError):
        fit_gaussian(torch.zeros(1, NUM_FEATURES))
    with pytest.raises(OmniditError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(OmniditError):
        reference_statistics("cifar", 10, 32, 32)
