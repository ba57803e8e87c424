"""The digits judge: accurate on held-out real digits at any size, exact per-class bookkeeping."""

from __future__ import annotations

import pytest
import torch

from omnidit.data.digits import DIGIT_NAMES, DigitsDataset
from omnidit.errors import OmniditError
from omnidit.evaluate import digits_judge
from omnidit.evaluate.digits_judge import DigitsJudge, judge_digits


@pytest.fixture(scope="module")
def judge() -> DigitsJudge:
    return DigitsJudge(seed=0)


@pytest.fixture(scope="module")
def test_split() -> DigitsDataset:
    return DigitsDataset(8, 8, split="test")


def test_test_accuracy_at_native_size(judge):
    assert judge.test_accuracy() >= 0.95


@pytest.mark.parametrize("size", [(16, 16), (32, 32), (12, 20)])
def test_accuracy_survives_upsampling_round_trip(judge, size):
    # Generated digits reach the judge at the training resolution; going back to 8x8 must not hurt.
    test = DigitsDataset(width=size[1], height=size[0], split="test")
    accuracy = (judge.predict(test.images) == test.labels).double().mean().item()
    assert accuracy >= 0.95


def test_predict_shape_and_dtype(judge, test_split):
    pred = judge.predict(test_split.images[:7])
    assert pred.shape == (7,) and pred.dtype == torch.int64
    assert int(pred.min()) >= 0 and int(pred.max()) <= 9


def test_judge_digits_correct_labels_score_high(judge):
    test = DigitsDataset(16, 16, split="test")
    result = judge_digits(judge, test.images, test.labels)
    assert result["n_images"] == len(test)
    assert list(result["categories"]) == list(DIGIT_NAMES)  # every class present, in digit order
    assert result["overall"] >= 0.95
    assert min(result["categories"].values()) >= 0.85


def test_judge_digits_shuffled_labels_score_near_chance(judge, test_split):
    gen = torch.Generator().manual_seed(0)
    shuffled = test_split.labels[torch.randperm(len(test_split), generator=gen)]
    result = judge_digits(judge, test_split.images, shuffled)
    assert result["overall"] < 0.25  # chance is 0.1


def test_judge_digits_overall_is_mean_over_present_classes(judge, test_split):
    # Three zeros and two ones that the judge gets right; mislabel one zero as a one.
    pred = judge.predict(test_split.images)
    ok = pred == test_split.labels
    zeros = torch.nonzero(ok & (test_split.labels == 0)).flatten()[:3]
    ones = torch.nonzero(ok & (test_split.labels == 1)).flatten()[:2]
    images = test_split.images[torch.cat([zeros, ones])]
    labels = torch.tensor([0, 0, 1, 1, 1])  # the third image is a real zero, labelled one
    result = judge_digits(judge, images, labels)
    assert result["categories"] == {"zero": 1.0, "one": pytest.approx(2 / 3)}
    assert result["overall"] == pytest.approx((1.0 + 2 / 3) / 2)  # not 4/5: classes weigh equally
    assert result["n_images"] == 5


def test_deterministic_and_cached(judge, test_split, monkeypatch):
    assert DigitsJudge(seed=0)._clf is judge._clf  # memoised per process
    first = judge.predict(test_split.images)
    monkeypatch.setattr(digits_judge, "_JUDGES", {})  # force a fresh fit
    refit = DigitsJudge(seed=0)
    assert refit._clf is not judge._clf
    assert torch.equal(refit.predict(test_split.images), first)
    assert torch.equal(judge.predict(test_split.images), first)


@pytest.mark.parametrize("shape", [(8, 8), (2, 8, 8), (2, 3, 8, 8), (2, 1, 1, 8, 8), (0, 1, 8, 8)])
def test_bad_shapes_raise(judge, shape):
    with pytest.raises(OmniditError):
        judge.predict(torch.zeros(shape))


def test_bad_inputs_raise(judge, test_split):
    images = test_split.images[:4]
    with pytest.raises(OmniditError):
        judge_digits(judge, images, torch.tensor([0, 1, 2]))  # one label short
    with pytest.raises(OmniditError):
        judge_digits(judge, images, torch.tensor([0, 1, 2, 10]))  # not a digit
    with pytest.raises(OmniditError):
        judge.predict(torch.full((1, 1, 8, 8), float("nan")))
