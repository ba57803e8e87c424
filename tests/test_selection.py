"""Best-of-N sampling with the model's own denoising error (omnidit.selection, Pipeline.generate(candidates=N))."""

from __future__ import annotations

import pytest
import torch

import omnidit.pipeline
import omnidit.selection
from omnidit.condition import Condition
from omnidit.errors import OmniditError
from omnidit.pipeline import load_pipeline
from omnidit.sampling import initial_noise
from omnidit.selection import SCORE_TIMES, best_candidates, candidate_seeds, denoising_scores


def test_denoising_score_matches_the_closed_form_for_a_point_mass():
    # Data that is a single point a has the exact velocity v(x, t) = (x - a) / t. For a candidate b,
    # x_t = (1 - t) b + t eps, so v - (eps - b) = (b - a) / t whatever eps: the score is
    # mean_k mean(|b - a|^2) / t_k^2, zero for b = a and growing with the distance.
    a = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(0))
    exact = lambda x, t, c: (x - a) / t.view(-1, 1, 1)  # noqa: E731
    b = torch.cat([a, a + 0.1, a - 0.3 * torch.ones_like(a)])
    scores = denoising_scores(exact, b, Condition())
    squared = (b - a).pow(2).flatten(1).mean(1)
    expected = squared * sum(1 / t**2 for t in SCORE_TIMES) / len(SCORE_TIMES)
    assert torch.allclose(scores, expected, rtol=1e-4, atol=1e-7)
    assert scores[0] < 1e-10 < scores[1] < scores[2]


def test_denoising_score_of_a_sample_does_not_depend_on_its_batch():
    model = lambda x, t, c: torch.tanh(x * (1 + t.view(-1, 1, 1)))  # noqa: E731
    x0 = torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(1))
    together = denoising_scores(model, x0, Condition())
    alone = torch.cat([denoising_scores(model, x0[i:i + 1], Condition()) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-6)


def test_best_candidates_keeps_the_lowest_score_per_item():
    candidates = torch.arange(6.0).view(6, 1)  # 3 candidates x 2 items, candidate-major
    scores = torch.tensor([0.5, 0.1, 0.2, 0.9, 0.1, 0.3])
    assert best_candidates(candidates, scores, 3).flatten().tolist() == [4.0, 1.0]
    seeds = candidate_seeds(7, 3)
    assert seeds[0] == 7 and len(set(seeds)) == 3
    # distinct for the generator, which reads only a seed's low 32 bits
    noises = [initial_noise((4,), s) for s in candidate_seeds(2**32 + 7, 3)]
    assert torch.equal(noises[0], initial_noise((4,), 7))
    assert not torch.equal(noises[0], noises[1]) and not torch.equal(noises[1], noises[2])


def test_generate_with_candidates_returns_the_best_scored_of_the_plain_samples(tiny_run, monkeypatch):
    pipe = load_pipeline(tiny_run, device="cpu")
    prompts, seeds = ["a red circle", "two blue squares", "a green triangle"], [3, 11, 5]
    kwargs = dict(width=16, height=16, steps=3)
    recorded = []

    def recording(*args, **kw):
        recorded.append(omnidit.selection.denoising_scores(*args, **kw))
        return recorded[-1]

    monkeypatch.setattr(omnidit.pipeline, "denoising_scores", recording)
    best = pipe.generate(prompts, seed=seeds, candidates=2, **kwargs)
    plain = torch.stack([pipe.generate(prompts, seed=[candidate_seeds(s, 2)[j] for s in seeds], candidates=1,
                                       **kwargs) for j in range(2)])  # (2, B, C, H, W)
    assert len(recorded) == 1  # one candidate never scores
    scores = recorded[0].view(2, 3)
    assert (scores[0] != scores[1]).all()  # two different images per prompt
    choice = scores.argmin(0)
    assert torch.allclose(best, plain[choice, torch.arange(3)], atol=1e-5)
    # the first candidate is the image's own seed: one candidate is plain sampling
    assert torch.equal(pipe.generate(prompts, seed=seeds, **kwargs), pipe.generate(prompts, seed=seeds, candidates=1,
                                                                                      **kwargs))
    # per-image seeds still make every image independent of the rest of the batch
    alone = pipe.generate(prompts[1:2], seed=seeds[1:2], candidates=2, **kwargs)
    assert torch.allclose(alone[0], best[1], atol=1e-5)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_candidate_counts_are_refused_with_a_hint(tiny_run, bad):
    pipe = load_pipeline(tiny_run, device="cpu")
    with pytest.raises(OmniditError, match="candidates must be a whole number") as err:
        pipe.generate(["a red circle"], candidates=bad, width=16, height=16, steps=2)
    assert "--candidates" in err.value.hint
