"""Distillation: each loss on Gaussian data whose exact flow is known, students that reach the exact samples'
moments, guidance distillation on a tiny model, and omnidit distill end to end (students load like any model,
exact resume after SIGKILL, the CLI's errors)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import run_main
from torch import Tensor, nn

from omnidit.checkpoint import list_checkpoints, load_model, read_safetensors
from omnidit.condition import Condition
from omnidit.distill import (
    FeatureClassifier,
    dmd_generator_loss,
    fake_score_loss,
    gan_classifier_loss,
    gan_generator_loss,
    guidance_distillation_loss,
    guided_velocity,
    progressive_distillation_loss,
    regression_loss,
    student_sample,
    two_step_target,
)
from omnidit.distill_pairs import PairStore
from omnidit.flow import interpolate
from omnidit.model.mmdit import MMDiT, MMDiTConfig
from omnidit.sampling import timestep_schedule
from omnidit.selection import SCORE_TIMES

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = 1.5, 0.4  # the "data": N(MEAN, STD^2) in every coordinate


def gaussian_velocity(x: Tensor, t: Tensor, mean: float | Tensor = MEAN, std: float | Tensor = STD) -> Tensor:
    """The exact rectified-flow velocity E[eps - x0 | x_t] for data N(mean, std^2), x_t = (1 - t) x0 + t eps."""
    t = t.reshape(-1, *([1] * (x.dim() - 1)))
    var = (1 - t) ** 2 * std**2 + t**2
    centred = x - (1 - t) * mean
    return (t - (1 - t) * std**2) / var * centred - mean


def test_the_gaussian_velocity_is_exact():
    # Integrating it finely from noise gives the data's moments (the reference every test below relies on).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 1, 1, generator=g)
    ts = timestep_schedule(400)
    for i in range(400):
        x = x + (ts[i + 1] - ts[i]) * gaussian_velocity(x, ts[i].expand(len(x)))
    assert abs(x.mean() - MEAN) < 0.02 and abs(x.std() - STD) < 0.01


def data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return MEAN + STD * torch.randn(n, 1, 1, generator=g), torch.randn(n, 1, 1, generator=g)


# ---- each loss: zero at the exact student, positive elsewhere ------------------------------------
def test_guided_velocity_is_cfg_with_a_scale_per_sample():
    v_c, v_u, v_s = torch.randn(3, 2, 4, 5).unbind(0)
    scale = torch.tensor([1.0, 3.0])
    v = guided_velocity(v_c, v_u, scale, v_s, skip_scale=0.5)
    for i in range(2):
        want = v_u[i] + scale[i] * (v_c[i] - v_u[i]) + 0.5 * (v_c[i] - v_s[i])
        assert torch.allclose(v[i], want)
    assert torch.allclose(guided_velocity(v_c, v_u, 1.0), v_c, atol=1e-6)


def test_guidance_distillation_loss_is_zero_exactly_at_the_guided_teacher():
    # Two Gaussian "conditions" stand for v_cond and v_uncond; the exact student is their guided combination.
    x0, noise = data(512, 1)
    t = torch.rand(512)
    x_t = interpolate(x0, noise, t)
    scale = 1 + 4 * torch.rand(512)

    def teacher(x, tt):
        return guided_velocity(gaussian_velocity(x, tt), gaussian_velocity(x, tt, 0.0, 1.0), scale)

    assert guidance_distillation_loss(teacher, teacher, x_t, t) == 0
    conditional_only = guidance_distillation_loss(lambda x, tt: gaussian_velocity(x, tt), teacher, x_t, t)
    assert conditional_only > 1e-2


def test_progressive_loss_is_zero_at_the_two_step_student_and_positive_elsewhere():
    x0, noise = data(512, 2)
    grid = timestep_schedule(8, shift=2.0)
    i = torch.randint(0, 4, (512,), generator=torch.Generator().manual_seed(3))
    t, t_mid, t_next = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
    x_t = interpolate(x0, noise, t)
    target = two_step_target(gaussian_velocity, x_t, t, t_mid, t_next)
    # A one-step Euler move with the target velocity lands exactly where the teacher's two moves land.
    x_mid = x_t + (t_mid - t).reshape(-1, 1, 1) * gaussian_velocity(x_t, t)
    x_next = x_mid + (t_next - t_mid).reshape(-1, 1, 1) * gaussian_velocity(x_mid, t_mid)
    assert torch.allclose(x_t + (t_next - t).reshape(-1, 1, 1) * target, x_next, atol=1e-5)
    exact = {}

    def student(x, tt):  # the exact student for these very inputs
        return exact.setdefault("v", two_step_target(gaussian_velocity, x, tt, t_mid, t_next))

    assert progressive_distillation_loss(student, gaussian_velocity, x_t, t, t_mid, t_next) < 1e-10
    assert progressive_distillation_loss(gaussian_velocity, gaussian_velocity, x_t, t, t_mid, t_next) > 1e-5


def test_the_grids_of_progressive_stages_nest():
    # A student of n steps takes the even points of its teacher's 2n-step grid: the stages line up.
    for n in (1, 2, 4, 8):
        for shift in (1.0, 3.0):
            assert torch.allclose(timestep_schedule(2 * n, shift)[::2], timestep_schedule(n, shift), atol=1e-6)


def test_dmd_loss_is_zero_when_the_distributions_agree_and_pulls_toward_the_teacher():
    x0, noise = data(4096, 4)
    t = 0.02 + 0.96 * torch.rand(4096, generator=torch.Generator().manual_seed(5))
    x0.requires_grad_(True)
    loss = dmd_generator_loss(x0, gaussian_velocity, gaussian_velocity, t, noise)
    loss.backward()
    assert loss == 0 and x0.grad.abs().max() == 0
    # A student whose samples sit too high (mean 2.0): the fake denoiser knows its distribution exactly.
    shifted = (x0.detach() + 0.5).requires_grad_(True)
    loss = dmd_generator_loss(shifted, gaussian_velocity,
                              lambda x, tt: gaussian_velocity(x, tt, MEAN + 0.5, STD), t, noise)
    loss.backward()
    assert loss > 0 and shifted.grad.mean() > 0  # descending moves the samples down, toward the teacher's mean


def test_fake_score_loss_is_the_flow_loss_and_smallest_at_the_true_denoiser():
    x0, noise = data(20000, 6)
    t = torch.rand(20000, generator=torch.Generator().manual_seed(7))
    right = fake_score_loss(gaussian_velocity, x0, t, noise)
    wrong = fake_score_loss(lambda x, tt: gaussian_velocity(x, tt, MEAN + 0.3, STD), x0, t, noise)
    assert right < wrong


def teacher_pairs(n: int, seed: int, steps: int = 1000) -> tuple[Tensor, Tensor]:
    """(noise, the exact flow's sample from it): the Gaussian's ODE maps z to MEAN + STD z, up to Euler's error."""
    noise = torch.randn(n, 1, 1, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return noise, student_sample(gaussian_velocity, noise, timestep_schedule(steps))


def test_regression_loss_is_zero_at_a_student_that_reproduces_the_teachers_map():
    noise, target = teacher_pairs(512, 8)
    assert torch.allclose(target, MEAN + STD * noise, atol=5e-3)
    grid = timestep_schedule(1)
    exact = regression_loss(lambda x, t: x - (MEAN + STD * x), noise, target, grid)  # one step onto the map
    assert exact < 1e-5
    assert regression_loss(gaussian_velocity, noise, target, grid) > 0.1  # the flow itself in one step: the mean
    # The same distribution but another coupling (z -> MEAN - STD z) is not the teacher's map: the loss says so.
    assert regression_loss(lambda x, t: x - (MEAN - STD * x), noise, target, grid) > 0.1


# ---- students on the Gaussian reach the exact samples' moments -------------------------------------
class AffineStudent(nn.Module):
    """v(x, t) = a(t) x + b(t) (the exact flow of Gaussian data has this form), a and b from a small MLP on t."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 32), nn.SiLU(), nn.Linear(32, 2))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        a, b = self.net(t.reshape(-1, 1).float()).unbind(-1)
        return a.reshape(-1, 1, 1) * x + b.reshape(-1, 1, 1)


def euler_samples(velocity, steps: int, n: int = 20000, shift: float = 1.0) -> Tensor:
    x = torch.randn(n, 1, 1, generator=torch.Generator().manual_seed(99))
    ts = timestep_schedule(steps, shift)
    with torch.no_grad():
        for i in range(steps):
            x = x + (ts[i + 1] - ts[i]) * velocity(x, ts[i].expand(n))
    return x


def test_progressive_stages_reach_the_gaussian_in_two_steps_and_one():
    torch.manual_seed(0)
    student, teacher = AffineStudent(), gaussian_velocity
    teacher_steps = 32
    for stage in range(5):  # 32 -> 16 -> 8 -> 4 -> 2 -> 1
        n = teacher_steps // 2 ** (stage + 1)
        grid = timestep_schedule(2 * n)
        optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
        for it in range(250):
            x0, noise = data(256, 1000 * stage + it)
            i = torch.randint(0, n, (256,), generator=torch.Generator().manual_seed(it))
            t, t_mid, t_next = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
            loss = progressive_distillation_loss(student, teacher, interpolate(x0, noise, t), t, t_mid, t_next)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        frozen = copy.deepcopy(student).requires_grad_(False)
        teacher = frozen
        if n <= 2:
            x = euler_samples(student, n)
            assert abs(x.mean() - MEAN) < 0.05 and abs(x.std() - STD) < 0.05, (n, x.mean(), x.std())
    # The undistilled exact flow in one Euler step is far off (it lands on the mean, with no spread).
    x = euler_samples(gaussian_velocity, 1)
    assert abs(x.std() - STD) > 0.3


@pytest.mark.parametrize("steps", [1, 2])
def test_regression_students_reach_the_gaussian_in_one_and_two_steps(steps):
    torch.manual_seed(0)
    student = AffineStudent()
    noise, target = teacher_pairs(2048, 9)  # a fixed set of pairs, as omnidit distill draws them once
    grid = timestep_schedule(steps)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    for it in range(300):
        rows = torch.randint(0, 2048, (256,), generator=torch.Generator().manual_seed(it))
        loss = regression_loss(student, noise[rows], target[rows], grid)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x = euler_samples(student, steps)  # fresh noise, not the pairs'
    assert abs(x.mean() - MEAN) < 0.03 and abs(x.std() - STD) < 0.03, (x.mean(), x.std())


def test_dmd_one_step_generator_reaches_the_gaussian():
    # Generator x = z - v(z, 1) with v = a z + b; the fake denoiser is exact for the generator's own Gaussian
    # N(-b, (1 - a)^2), so only the DMD gradient is under test.
    a, b = torch.zeros((), requires_grad=True), torch.zeros((), requires_grad=True)
    optimizer = torch.optim.Adam([a, b], lr=0.02)
    for it in range(600):
        z, noise = torch.randn(2, 512, 1, 1, generator=torch.Generator().manual_seed(it)).unbind(0)
        x0 = z - (a * z + b)
        t = 0.02 + 0.96 * torch.rand(512, generator=torch.Generator().manual_seed(10_000 + it))
        mean, std = (-b).detach(), (1 - a).abs().detach()
        loss = dmd_generator_loss(x0, gaussian_velocity, lambda x, tt, m=mean, s=std: gaussian_velocity(x, tt, m, s),
                                  t, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        x = euler_samples(lambda x, t: a * x + b, 1)
    assert abs(x.mean() - MEAN) < 0.03 and abs(x.std() - STD) < 0.03, (x.mean(), x.std())


def test_gan_classifier_loss_is_least_at_the_log_density_ratio_and_2_log_2_where_data_agree():
    # real N(0, 1), the student's N(1, 1): the best classifier is log p_real / p_fake = 0.5 - x.
    g = torch.Generator().manual_seed(11)
    real, fake = torch.randn(200_000, generator=g), 1 + torch.randn(200_000, generator=g)

    def loss(w: float, c: float) -> float:
        return float(gan_classifier_loss(w * real + c, w * fake + c))

    best = loss(-1.0, 0.5)
    for w, c in ((-0.7, 0.5), (-1.3, 0.5), (-1.0, 0.2), (-1.0, 0.8), (0.0, 0.0)):
        assert loss(w, c) > best + 1e-3, (w, c)
    assert loss(0.0, 0.0) == pytest.approx(2 * torch.log(torch.tensor(2.0)).item(), abs=1e-6)
    same = torch.randn(200_000, generator=g)  # one distribution on both sides: no classifier beats D = 0
    assert float(gan_classifier_loss(0.3 * same, 0.3 * torch.randn(200_000, generator=g))) > 2 * 0.6931 - 1e-3


def test_gan_generator_loss_has_the_direct_gradient_and_none_on_the_classifier():
    x0 = torch.randn(8, 4, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    noise = torch.randn(8, 4, 3, generator=torch.Generator().manual_seed(2))
    t = torch.rand(8, generator=torch.Generator().manual_seed(3))
    classifier = nn.Linear(3, 1)

    def logits(x: Tensor, tt: Tensor) -> Tensor:
        return classifier(x).squeeze(-1).mean(-1) * (1 + tt)

    loss = gan_generator_loss(x0, logits, t, noise)
    loss.backward()
    assert classifier.weight.grad is None and classifier.bias.grad is None
    direct_x0 = x0.detach().clone().requires_grad_(True)
    direct = torch.nn.functional.softplus(-logits(interpolate(direct_x0, noise, t), t)).mean()
    direct.backward()
    assert float(loss.detach()) == pytest.approx(float(direct.detach()), rel=1e-6)
    torch.testing.assert_close(x0.grad, direct_x0.grad)
    with torch.no_grad():  # a step down the loss makes the samples look more real to the classifier
        before, after = logits(interpolate(x0, noise, t), t), logits(interpolate(x0 - 0.1 * x0.grad / x0.grad.norm(),
                                                                                 noise, t), t)
    assert float(after.mean()) > float(before.mean())


def test_a_gan_generator_and_classifier_reach_the_data_distribution():
    # Generator x0 = b + s z against data N(MEAN, STD^2); the classifier sees noised samples at random t through
    # the features (x_t, x_t^2, t x_t, t x_t^2, 1). Alternating updates, as distill.gan_weight trains them; the
    # generator's parameters circle the answer, as a GAN's do, so their average over the second half is read (the
    # student's EMA plays that part in omnidit distill).
    b, s = torch.zeros((), requires_grad=True), torch.ones((), requires_grad=True)
    w = torch.zeros(5, requires_grad=True)
    gen_opt, cls_opt = torch.optim.Adam([b, s], lr=0.01, betas=(0.5, 0.9)), torch.optim.Adam([w], lr=0.05,
                                                                                            betas=(0.5, 0.9))

    def logits(x: Tensor, t: Tensor) -> Tensor:
        tt = t.reshape(-1, 1, 1)
        feats = torch.stack([x, x**2, tt * x, tt * x**2, torch.ones_like(x)], -1)
        return (feats @ w).mean(dim=(1, 2))

    history = []
    for it in range(1500):
        g = torch.Generator().manual_seed(it)
        z, noise, data_noise = torch.randn(3, 256, 1, 1, generator=g).unbind(0)
        data = MEAN + STD * torch.randn(256, 1, 1, generator=g)
        t = 0.6 * torch.rand(256, generator=g)
        x0 = b + s * z
        cls_loss = gan_classifier_loss(logits(interpolate(data, data_noise, t), t),
                                       logits(interpolate(x0.detach(), noise, t), t))
        cls_opt.zero_grad()
        cls_loss.backward()
        cls_opt.step()
        gen_opt.zero_grad()
        gan_generator_loss(x0, logits, t, noise).backward()
        gen_opt.step()
        history.append((float(b.detach()), abs(float(s.detach()))))
    mean, std = torch.tensor(history[750:]).mean(0).tolist()
    assert abs(mean - MEAN) < 0.03 and abs(std - STD) < 0.03, (mean, std)


def test_the_feature_classifier_starts_undecided_and_reads_the_models_last_hidden_states():
    model = tiny_model(guidance=False)
    classifier = FeatureClassifier(model.config.hidden_size)
    classifier.attach(model)
    assert any(k.startswith("gan_classifier.") for k in model.state_dict())
    x = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))  # 4x4 one-channel images, patch 2
    cond = Condition(labels=torch.tensor([0, 1, 2]))
    ids = torch.zeros(1, 4, 3)
    ids[0, :, 1], ids[0, :, 2] = torch.tensor([0.0, 0, 1, 1]), torch.tensor([0.0, 1, 0, 1])
    model(x, ids, torch.full((3,), 0.5), cond)
    assert classifier.logits.shape == (3,) and classifier.logits.abs().max() == 0  # zero last layer: logit 0
    torch.nn.init.normal_(classifier.net[-1].weight, generator=torch.Generator().manual_seed(1))
    model(x, ids, torch.full((3,), 0.5), cond)
    first = classifier.logits.clone()
    model(x[[1, 0, 2]], ids, torch.full((3,), 0.5), cond)  # per sample: its own tokens and condition
    assert not torch.allclose(first, classifier.logits)
    assert torch.allclose(first[2], classifier.logits[2], atol=1e-6)


# ---- guidance distillation on a tiny model ---------------------------------------------------------
def tiny_model(guidance: bool) -> MMDiT:
    cfg = MMDiTConfig(in_channels=1, patch_size=2, hidden_size=32, num_heads=2, depth=1, depth_single=1,
                      context_dim=0, pooled_dim=0, num_classes=3, axes_dim=[4, 6, 6], guidance_embed=guidance)
    return MMDiT(cfg)


def test_guidance_distilled_student_matches_the_guided_teacher_at_trained_scales():
    torch.manual_seed(0)
    teacher = tiny_model(False)
    for p in teacher.parameters():  # adaLN-Zero starts at zero output: give the teacher a non-trivial field
        nn.init.normal_(p, std=0.2)
    teacher.requires_grad_(False)
    student = tiny_model(True)
    state = teacher.state_dict()
    state.update({k: v for k, v in student.state_dict().items() if k.startswith("guidance_in.")})
    student.load_state_dict(state)
    ids = torch.zeros(1, 4, 3)
    ids[0, :, 1], ids[0, :, 2] = torch.tensor([0.0, 0, 1, 1]), torch.tensor([0.0, 1, 0, 1])
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(16, 4, 4, generator=g), torch.rand(16, generator=g)
    labels = torch.randint(0, 3, (16,), generator=g)
    cond, null = Condition(labels=labels), Condition(labels=torch.full((16,), 3))

    def teacher_at(scale):
        def v(xx, tt):
            v_c = teacher(xx, ids, tt, cond)
            v_u = teacher(xx, ids, tt, null)
            return guided_velocity(v_c, v_u, scale)
        return v

    def student_at(scale):
        return lambda xx, tt: student(xx, ids, tt, Condition(labels=labels, guidance=scale))

    def error(scale):
        with torch.no_grad():
            want, got = teacher_at(scale)(x, t), student_at(scale)(x, t)
        return ((got - want).norm() / want.norm()).item()

    three = torch.full((16,), 3.0)
    before = error(three)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    for it in range(300):
        scale = 1 + 4 * torch.rand(16, generator=torch.Generator().manual_seed(it))
        loss = guidance_distillation_loss(student_at(scale), teacher_at(scale), x, t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert before > 0.3
    for s in (1.5, 3.0, 4.5):
        assert error(torch.full((16,), s)) < 0.1 * before, s


# ---- omnidit distill end to end ---------------------------------------------------------------------
TEACHER_OVERRIDES = ["model.hidden_size=64", "model.num_heads=2", "model.depth=1", "model.depth_single=1",
                     "train.steps=10", "train.batch_size=8", "train.lr=1e-3", "train.warmup_steps=2",
                     "train.checkpoint_every=10", "train.log_every=5", "train.device=cpu", "sample.steps=4",
                     "sample.skip_scale=1.0", "sample.skip_blocks=[0]", "train.tensorboard=false"]
STUDENT = ["train.batch_size=4", "train.log_every=1", "train.device=cpu", "train.tensorboard=false",
           "train.warmup_steps=1", "train.lr=1e-3"]


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory) -> Path:
    """A seconds-long class-conditional digits run with skip-layer guidance in its sampling settings."""
    from omnidit.config import load_config
    from omnidit.train import train

    run = tmp_path_factory.mktemp("teacher") / "run"
    train(load_config(REPO / "configs" / "digits.json", [*TEACHER_OVERRIDES, f"train.out_dir={run}"]), progress=False)
    return run


def distill_cmd(teacher: Path, out: Path, method: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "omnidit", "distill", str(teacher), str(out), "--method", method, *STUDENT,
            *overrides, "--no-progress"]


def logged_rows(run: Path) -> list[dict]:
    """The run's metrics.jsonl, one dict per line."""
    return [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]


def run_distill(teacher: Path, out: Path, method: str, *overrides: str) -> Path:
    from omnidit.distill_train import distill, student_config

    return distill(student_config(teacher, out, method, [*STUDENT, *overrides]), progress=False)


@pytest.mark.parametrize("method", ["guidance", "progressive", "dmd", "regression"])
def test_each_method_writes_an_ordinary_student_that_samples_without_guidance_passes(digits_teacher, tmp_path,
                                                                                      method):
    from omnidit.pipeline import guided, load_pipeline

    extra = {"guidance": [], "progressive": ["distill.teacher_steps=8", "distill.student_steps=2"],
             "dmd": ["distill.student_steps=2", "distill.generator_every=2"],
             "regression": ["distill.student_steps=2", "distill.pairs=40"]}[method]
    final = run_distill(digits_teacher, tmp_path / "s", method, "train.steps=4", "train.checkpoint_every=2", *extra)
    model, config = load_model(final)
    assert config.model.guidance_embed and config.distill.method == method
    s = config.sample
    assert s.skip_scale == 0 and s.candidates == 1 and s.steps == (4 if method == "guidance" else 2)
    pipe = load_pipeline(final, device="cpu")
    assert not guided(pipe.sampling_settings(), guidance_input=True)
    images = pipe.generate(["3", "7"], seed=0)
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
    # The scale is the model's input: another cfg draws another image, at the same cost.
    assert not torch.equal(images, pipe.generate(["3", "7"], seed=0, cfg=1.0))
    losses = [r for r in (final.parent / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]
    assert len(losses) == 4


@pytest.mark.parametrize("teacher_skip_scale", [None, 0.0, 2.0])
def test_the_teachers_skip_layer_guidance_is_its_own_unless_the_run_sets_it(digits_teacher, tmp_path,
                                                                            teacher_skip_scale):
    # The digits teacher samples with skip-layer guidance 1.0 without block 0; distill.teacher_skip_scale replaces
    # the scale (0: plain CFG), keeping the teacher's blocks, so the guided velocity is known in closed form.
    from omnidit.distill_train import Distiller, student_config

    extra = [] if teacher_skip_scale is None else [f"distill.teacher_skip_scale={teacher_skip_scale}"]
    d = Distiller(student_config(digits_teacher, tmp_path / "s", "guidance", [*STUDENT, *extra]), progress=False)
    expected = 1.0 if teacher_skip_scale is None else teacher_skip_scale
    assert d.teacher_sample.skip_scale == expected and d.teacher_sample.skip_blocks == [0]
    x0, cond, _ = d.image_batch([0, 1])
    torch.manual_seed(0)
    x, t, w = torch.randn_like(x0), torch.tensor([0.7, 0.9]), torch.tensor([3.0, 5.0])
    with torch.no_grad():
        got = d.teacher_velocity(d.teacher, cond, w)(x, t)
        plain = dataclasses.replace(cond, guidance=None)
        v_c = d.teacher(x, d.ids, t, plain)
        v_u = d.teacher(x, d.ids, t, d.null_cond.repeat(2))
        v_s = d.teacher(x, d.ids, t, plain, skip_single=[0])
    want = v_u + w.reshape(-1, 1, 1) * (v_c - v_u) + expected * (v_c - v_s)  # both times inside skip_interval
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_a_config_files_infinite_teacher_skip_scale_is_refused():
    # JSON's Infinity reaches the config from a file, where the command line's parser cannot see it.
    from omnidit.config import DistillConfig
    from omnidit.errors import OmniditError

    with pytest.raises(OmniditError, match="must be a finite number"):
        DistillConfig(method="guidance", teacher="shapes", teacher_skip_scale=float("inf"))


def test_regression_pairs_are_kept_and_refused_for_other_settings(digits_teacher, tmp_path):
    from omnidit.errors import OmniditError

    out = tmp_path / "r"
    run_distill(digits_teacher, out, "regression", "train.steps=1", "distill.pairs=300")
    chunks = sorted((out / "pairs").glob("chunk-*.safetensors"))
    assert [c.name for c in chunks] == ["chunk-00000.safetensors", "chunk-00001.safetensors"]  # 2 x 256 rows
    pairs = {k: torch.cat([read_safetensors(c)[k] for c in chunks]) for k in ("noise", "sample", "index", "scale")}
    assert pairs["noise"].shape[0] == 512 and not torch.equal(pairs["noise"][:256], pairs["noise"][256:])
    assert torch.isfinite(pairs["sample"]).all() and pairs["sample"].std() > 0.1
    store = PairStore(chunks, 256, 300)  # what training reads: rows by number, from the files
    got = store.rows([299, 3, 256])
    assert len(store) == 300 and got["noise"].shape == (3, *pairs["noise"].shape[1:])
    for key in pairs:
        assert torch.equal(got[key], pairs[key][[299, 3, 256]]), key
    stamp = chunks[0].stat().st_mtime_ns
    run_distill(digits_teacher, out, "regression", "train.steps=2", "distill.pairs=300")  # resumes: drawn once
    assert chunks[0].stat().st_mtime_ns == stamp
    with pytest.raises(OmniditError, match="drawn by another teacher or with other settings"):
        run_distill(digits_teacher, out, "regression", "train.steps=3", "distill.pairs=300", "distill.guidance=[3,3]")


def test_dmds_regression_term_adds_its_weight_times_a_positive_loss_on_generator_steps(digits_teacher, tmp_path):
    # L = L_DMD + w * L_reg (DMD's eq. 9): with the same draws, the first (generator) step's loss moves linearly in
    # w, by a positive regression loss; the fake-only step after it is untouched. The pairs are drawn once.
    def losses(name: str, weight: float) -> list[float]:
        extra = ["train.steps=2", "distill.student_steps=2", "distill.generator_every=2", "distill.pairs=40",
                 f"distill.regression_weight={weight}"]
        run_distill(digits_teacher, tmp_path / name, "dmd", *extra)
        rows = logged_rows(tmp_path / name)
        return [r["loss"] for r in rows if "loss" in r]

    plain, one, three = losses("plain", 0), losses("one", 100), losses("three", 300)  # the tiny teacher's term is small
    assert not (tmp_path / "plain" / "pairs").exists() and (tmp_path / "one" / "pairs").is_dir()
    regression = one[0] - plain[0]
    assert regression > 1e-3 and three[0] - plain[0] == pytest.approx(3 * regression, rel=1e-3)
    assert one[1] == plain[1] == three[1] == 0  # a fake-only step: the generator's loss is not computed


def test_dmd2s_gan_term_adds_log_2_at_an_undecided_classifier_that_trains_inside_the_fake(digits_teacher, tmp_path):
    # The classifier's last layer starts at zero: logit 0 for every sample, so the first (generator) step's loss
    # gains exactly gan_weight * softplus(0) = gan_weight * log 2; the fake-only step after it is untouched.
    def run(name: str, weight: float) -> tuple[list[float], Path]:
        extra = ["train.steps=2", "distill.student_steps=2", "distill.generator_every=2",
                 f"distill.gan_weight={weight}"]
        final = run_distill(digits_teacher, tmp_path / name, "dmd", *extra)
        rows = logged_rows(tmp_path / name)
        return [r["loss"] for r in rows if "loss" in r], final

    (plain, _), (gan, final) = run("plain", 0), run("gan", 0.5)
    assert gan[0] - plain[0] == pytest.approx(0.5 * math.log(2), rel=1e-4)
    assert gan[1] == plain[1] == 0
    fake = {k: v for k, v in final_state(tmp_path / "gan").items() if k.startswith("state/fake/gan_classifier.")}
    assert fake and any(v.abs().max() > 0 for k, v in fake.items() if k.endswith("net.3.weight"))  # it has trained
    assert not any("gan_classifier" in k for k in read_safetensors(final / "model.safetensors"))  # the student's own


def test_dmd2s_classifier_learns_to_rate_the_batchs_data_above_the_students_samples(digits_teacher, tmp_path,
                                                                                   monkeypatch):
    # The trainer feeds the classifier the data's rows and the samples' in one pass of the fake: were the two
    # halves swapped, it would learn to rate the samples higher and the generator would be pushed off the data.
    from omnidit import distill_train

    gaps = []

    def recorded(real_logits: Tensor, sample_logits: Tensor) -> Tensor:
        gaps.append(float(real_logits.mean() - sample_logits.mean()))
        return gan_classifier_loss(real_logits, sample_logits)

    monkeypatch.setattr(distill_train, "gan_classifier_loss", recorded)
    run_distill(digits_teacher, tmp_path / "gan", "dmd", "train.steps=12", "train.lr=1e-3", "train.warmup_steps=0",
                "distill.student_steps=2", "distill.generator_every=2", "distill.gan_weight=0.1",
                "distill.gan_classifier_weight=1", "distill.gan_lr_ratio=10")
    assert len(gaps) == 12 and gaps[0] == 0  # the zero last layer: undecided at first
    assert min(gaps[-4:]) > 0.3, gaps
    rows = logged_rows(tmp_path / "gan")
    logged = [r for r in rows if "loss" in r]  # every log_every steps: the window's means
    assert all({"fake_loss", "fake_grad_norm", "classifier_gap"} <= set(r) for r in logged)
    assert logged[-1]["classifier_gap"] > 0.3


def test_a_submodule_apart_gets_the_last_two_parameter_groups():
    from omnidit.optim import parameter_groups

    model = tiny_model(guidance=False)
    classifier = FeatureClassifier(model.config.hidden_size)
    classifier.attach(model)
    groups = parameter_groups(model, 0.1, apart=classifier)
    ids = [[id(p) for p in g["params"]] for g in groups]
    assert len(groups) == 4 and sum(map(len, ids)) == len(list(model.parameters()))
    assert set(ids[2] + ids[3]) == {id(p) for p in classifier.parameters()}
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.1, 0.0]
    assert len(parameter_groups(model, 0.1)) == 2


def test_a_dmd_run_keeps_its_gan_term_on_or_off_when_it_resumes(digits_teacher, tmp_path):
    from omnidit.errors import OmniditError

    extra = ["distill.student_steps=2", "distill.generator_every=2", "train.checkpoint_every=2"]
    run_distill(digits_teacher, tmp_path / "plain", "dmd", "train.steps=2", *extra)
    with pytest.raises(OmniditError, match="started without DMD2's GAN term"):
        run_distill(digits_teacher, tmp_path / "plain", "dmd", "train.steps=4", "distill.gan_weight=0.5", *extra)


def test_a_fast_preset_samples_with_the_models_guidance_distilled_twin(digits_teacher, tmp_path, monkeypatch):
    from omnidit import checkpoint, quantize
    from omnidit.errors import OmniditError
    from omnidit.lora import add_lora
    from omnidit.pipeline import load_pipeline

    twin = run_distill(digits_teacher, tmp_path / "twin", "guidance", "train.steps=2")
    teacher = checkpoint.resolve_model_dir(digits_teacher)
    for name, variable, folder in (("tiny", "TINY_DIR", teacher), ("tiny-guided", "TINY_GUIDED_DIR", twin)):
        monkeypatch.setitem(checkpoint.SHIPPED_MODELS, name, (variable, "-"))
        monkeypatch.setattr(checkpoint, variable, folder, raising=False)
    monkeypatch.setattr(quantize, "FAST_TWINS", {"tiny": "tiny-guided"})
    pipe = load_pipeline("tiny", device="cpu")
    pipe.config.sample.candidates, pipe.config.sample.steps = 2, 3  # the model's settings carry over to the twin
    fast = quantize.speed_variant(pipe, "fast")
    assert fast.model_dir == twin and fast.config.model.guidance_embed and quantize.has_int8_layers(fast.model)
    assert (fast.config.sample.candidates, fast.config.sample.steps, fast.config.sample.cache) == (2, 3, "first_block")
    assert (fast.config.sample.cache_threshold, fast.config.sample.cache_forecast) == (0.2, "taylor")
    assert pipe.model_dir == teacher and not pipe.config.model.guidance_embed  # the served pipeline is untouched
    # The model itself, in int8 too, ranks the twin's candidates: one call per scoring time, none of the twin's.
    assert not fast.scorer.config.guidance_embed and quantize.has_int8_layers(fast.scorer)
    assert pipe.scorer is None and not quantize.has_int8_layers(pipe.model)
    direct = load_pipeline(twin, device="cpu")
    quantize.quantize_in_memory(direct.model, "w8a8")
    ranked = dataclasses.replace(direct, scorer=quantize.quantize_in_memory(load_pipeline(teacher).model, "w8a8"))
    settings = {"steps": 3, "candidates": 2, "cache": "first_block", "cache_threshold": 0.2, "cache_forecast": "taylor"}
    calls = {"scorer": 0, "twin": 0}
    fast.scorer.register_forward_hook(lambda *_: calls.__setitem__("scorer", calls["scorer"] + 1))
    fast.model.register_forward_hook(lambda *_: calls.__setitem__("twin", calls["twin"] + 1))
    assert torch.equal(fast.generate(["3", "7"], seed=0), ranked.generate(["3", "7"], seed=0, **settings))
    assert calls == {"scorer": len(SCORE_TIMES), "twin": 3}
    cond, _ = fast.conditions(["3"], guidance=4.0)
    assert fast.scoring_condition(cond) is cond  # the model has no guidance input: it scores under the condition
    # A twin ranking its own candidates scores at the least guided scale it was trained on.
    assert direct.scoring_condition(cond).guidance.tolist() == [direct.config.distill.guidance[0]] == [1.0]
    with pytest.raises(OmniditError, match="cannot follow a negative prompt"):  # the twin has no unconditional row
        fast.generate(["3"], negative_prompt="7")
    faster = quantize.speed_variant(fast, "faster")  # the twin is already int8: only the settings change
    assert faster.model is fast.model and faster.config.sample.candidates == 1
    assert faster.config.sample.cache == "first_block"
    add_lora(pipe.model, 2)  # an adapter the twin does not carry: the preset quantizes the model itself
    assert quantize.fast_twin(pipe) is None and quantize.speed_variant(pipe, "fast").model_dir == teacher


@pytest.mark.parametrize("deeper", [[], ["model.depth=2", "model.depth_single=3"]])
def test_a_new_guidance_input_starts_as_the_teachers_conditional_model(digits_teacher, tmp_path, deeper):
    """The student (deeper than its teacher or not: the added blocks start as identities) begins as the
    teacher's conditional model."""
    from omnidit.checkpoint import initial_weights
    from omnidit.distill_train import student_config

    config = student_config(digits_teacher, tmp_path / "s", "guidance", [*STUDENT, *deeper])
    assert config.train.init_grow == bool(deeper)
    assert (config.model.depth, config.model.depth_single) == ((2, 3) if deeper else (1, 1))
    _, state = initial_weights(digits_teacher, config)
    student = MMDiT(config.model)
    student.load_state_dict(state)
    teacher, _ = load_model(digits_teacher)
    x, ids = torch.randn(2, 64, 4), torch.zeros(1, 64, 3)
    cond = Condition(labels=torch.tensor([1, 2]))
    with torch.no_grad():
        assert torch.allclose(student(x, ids, torch.tensor([0.3, 0.8]), Condition(labels=cond.labels,
                                                                                  guidance=torch.tensor([2.0, 5.0]))),
                              teacher(x, ids, torch.tensor([0.3, 0.8]), cond), atol=1e-6)


def test_a_deeper_student_distils_and_refines_against_the_original_teacher(digits_teacher, tmp_path):
    """A student with more blocks than its teacher (progressive, two stages: the second's teacher is the deep
    student's EMA), then DMD from it against the original teacher: the DMD student keeps the depth of the folder
    it starts from, and its fake denoiser starts as the teacher's weights grown to that depth."""
    from omnidit.checkpoint import training_provenance

    pd = run_distill(digits_teacher, tmp_path / "pd", "progressive", "train.steps=4", "train.checkpoint_every=2",
                     "distill.teacher_steps=8", "distill.student_steps=2", "model.depth_single=3")
    dmd = run_distill(digits_teacher, tmp_path / "dmd", "dmd", "train.steps=2", "train.checkpoint_every=2",
                      f"train.init_from={pd}", "distill.student_steps=2", "distill.generator_every=1")
    for run in (pd, dmd):
        model, config = load_model(run)
        assert len(model.single_blocks) == 3 and config.model.depth_single == 3
    assert load_model(digits_teacher)[1].model.depth_single == 1
    assert training_provenance(dmd)["init_from"]["folder"] == str(pd)
    from omnidit.pipeline import load_pipeline

    images = load_pipeline(dmd, device="cpu").generate(["3"], seed=0)
    assert images.shape == (1, 1, 16, 16) and torch.isfinite(images).all()


def final_state(run: Path) -> dict[str, Tensor]:
    last = list_checkpoints(run)[-1]
    return {**read_safetensors(last / "model.safetensors"),
            **{f"ema/{k}": v for k, v in read_safetensors(last / "ema.safetensors").items()},
            **{f"state/{k}": v for k, v in read_safetensors(last / "training_state" / "state.safetensors").items()
               if not k.startswith("rng/")}}


@pytest.mark.parametrize("gan", [[], ["distill.gan_weight=0.5"]])
def test_dmd_resumes_exactly_with_its_fake_denoiser(digits_teacher, tmp_path, gan):
    extra = ["distill.student_steps=2", "distill.generator_every=2", "train.checkpoint_every=3", *gan]
    run_distill(digits_teacher, tmp_path / "straight", "dmd", "train.steps=6", *extra)
    run_distill(digits_teacher, tmp_path / "halves", "dmd", "train.steps=3", *extra)
    run_distill(digits_teacher, tmp_path / "halves", "dmd", "train.steps=6", *extra)
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "halves")
    assert any(k.startswith("state/fake/") for k in a) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dmd_resumes_from_a_checkpoint_whose_fake_optimizer_is_keyed_by_index(digits_teacher, tmp_path):
    # Checkpoints written before the fake optimizer was saved by parameter name (for FSDP) still resume exactly.
    import json

    from safetensors.torch import save_file

    extra = ["distill.student_steps=2", "distill.generator_every=2", "train.checkpoint_every=2"]
    run_distill(digits_teacher, tmp_path / "straight", "dmd", "train.steps=3", *extra)
    run_distill(digits_teacher, tmp_path / "old", "dmd", "train.steps=2", *extra)
    state_dir = tmp_path / "old" / "checkpoint-0000002" / "training_state"
    tensors = read_safetensors(state_dir / "state.safetensors")
    meta = json.loads((state_dir / "state.json").read_text())
    fake = meta["fake_optimizer"]
    number = {name: i for i, name in enumerate(n for group in fake["param_groups"] for n in group["params"])}
    for group in fake["param_groups"]:  # torch numbers the parameters on across its groups
        group["params"] = [number[n] for n in group["params"]]
    fake["scalars"] = {f"{number[k.split('/')[0]]}/{k.split('/', 1)[1]}": v for k, v in fake["scalars"].items()}
    renamed = {}
    for key, value in tensors.items():
        if key.startswith("fake_optim/"):
            _, name, field = key.split("/", 2)
            key = f"fake_optim/{number[name]}/{field}"
        renamed[key] = value
    save_file(renamed, str(state_dir / "state.safetensors"))
    (state_dir / "state.json").write_text(json.dumps(meta))
    run_distill(digits_teacher, tmp_path / "old", "dmd", "train.steps=3", *extra)
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "old")
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("state/fake_optim/"))


# In the slow target (pytest -m slow; 24 s) to keep the default suite within CI's 10 minutes: a distillation is the
# trainer's run, whose kill-during-a-save test (tests/test_distributed.py) stays in it.
@pytest.mark.slow
def test_progressive_distillation_resumes_bit_exactly_after_sigkill(digits_teacher, tmp_path):
    from tests.test_distributed import env, kill_during_save

    steps = ["train.steps=8", "train.checkpoint_every=2", "train.keep_last=5", "distill.teacher_steps=8",
             "distill.student_steps=2"]  # two stages of four steps: the kill lands in the second
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(distill_cmd(digits_teacher, straight, "progressive", *steps), check=True, env=env(),
                   capture_output=True, timeout=300)
    kill_during_save(distill_cmd(digits_teacher, killed, "progressive", *steps), killed, 6)
    assert list_checkpoints(killed)[-1].name == "checkpoint-0000004"
    subprocess.run(distill_cmd(digits_teacher, killed, "progressive", *steps), check=True, env=env(),
                   capture_output=True, timeout=300)
    a, b = final_state(straight), final_state(killed)
    assert any(k.startswith("state/stage_teacher/") for k in a) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args, message", [
    (["NOT_A_MODEL", "--method", "guidance"], "NOT_A_MODEL: model folder not found"),
    (["EMPTY_FOLDER", "--method", "guidance"], "is not an omnidit model folder (no config.json"),
    (["TEACHER", "--method", "consistency"], "invalid choice: 'consistency'"),
    (["TEACHER", "--method", "guidance", "model.mlp_ratio=2.0"], "contradicts the teacher's (model.mlp_ratio: 4.0 in"),
    (["shapes", "--method", "guidance", "model.depth=1"], "blocks can only be added: the source has 2 double-"),
    (["TEACHER", "--method", "guidance", "model.guidance_embed=false"], "it must stay true"),
    (["TEACHER", "--method", "progressive", "distill.teacher_steps=12"], "must be student_steps (4) times a power"),
    (["TEACHER", "--method", "progressive", "sample.steps=8"], "contradicts distill.student_steps=4"),
    (["TEACHER", "--method", "dmd", "distill.dmd_t_range=[0.5]"], "distill.dmd_t_range must be [LO, HI]"),
    (["TEACHER", "--method", "dmd", "train.grad_accum=2"], "distillation takes one batch per step"),
    (["TEACHER", "--method", "progressive", "distill.regression_weight=1"], "is DMD's regression term, not a"),
    (["TEACHER", "--method", "regression", "distill.gan_weight=1"], "is DMD2's GAN term, not a setting of"),
    (["TEACHER", "--method", "dmd", "distill.gan_weight=-1"], "'distill.gan_weight' must be >= 0"),
    (["TEACHER", "--method", "dmd", "distill.gan_weight=1", "distill.gan_classifier_weight=0"],
     "needs a classifier that learns"),
    (["shapes-turbo", "--method", "progressive", "distill.teacher_skip_scale=1"],
     "distill.teacher_skip_scale=1 needs a teacher with skip-layer guidance, and this one takes"),
    (["TEACHER", "--method", "guidance", "distill.teacher_skip_scale=inf"], "expects float, got 'inf'"),
])
def test_cli_errors_are_one_line_exit_2_and_write_nothing(digits_teacher, tmp_path, capsys, args, message):
    # In-process (test_cli.py's fresh-process test covers the command line's own start-up and exit code).
    out = tmp_path / "student"
    (tmp_path / "EMPTY_FOLDER").mkdir()  # a folder that exists but holds no model
    args = [str(digits_teacher) if a == "TEACHER" else str(tmp_path / a) if a in ("NOT_A_MODEL", "EMPTY_FOLDER")
            else a for a in args]
    code, _, err = run_main(capsys, "distill", args[0], out, *args[1:])
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert not out.exists()


# The DDP runs are in the slow target (pytest -m slow) to keep the default suite within CI's 10 minutes; of the FSDP
# runs, which shard every model of the run and resume from a checkpoint, progressive's stays in it (its sharded stage
# teacher), DMD's and regression's are slow too.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize("method, parallel", [pytest.param("progressive", "ddp", marks=_SLOW),
                                              pytest.param("dmd", "ddp", marks=_SLOW),
                                              pytest.param("dmd-gan", "ddp", marks=_SLOW),
                                              pytest.param("regression", "ddp", marks=_SLOW),
                                              ("progressive", "fsdp"), pytest.param("dmd", "fsdp", marks=_SLOW),
                                              pytest.param("dmd-gan", "fsdp", marks=_SLOW),
                                              pytest.param("regression", "fsdp", marks=_SLOW)])
def test_two_processes_follow_the_single_process_distillation(digits_teacher, tmp_path, method, parallel):
    # progressive: a stage teacher from step 2 (a frozen copy of the EMA, sharded under FSDP); dmd: the fake
    # denoiser and its optimizer (dmd-gan: with DMD2's classifier inside it, the data's rows split between the
    # processes like the samples'); both saved as full state dicts and equal to one process's; regression: the pairs
    # drawn by both processes (each its rows of a chunk) equal one process's. Under FSDP progressive and dmd run
    # the last step again from the checkpoint of step 3, so that the sharded stage teacher and fake load from it.
    import shutil

    from tests.test_distributed import env, failure

    steps = ["train.steps=4", "train.checkpoint_every=3", "distill.teacher_steps=8", "distill.student_steps=2",
             "distill.generator_every=2", "distill.pairs=40", f"train.parallel={parallel}"]
    if method == "dmd-gan":
        method, steps = "dmd", [*steps, "distill.gan_weight=0.5"]
    single, double = tmp_path / "one", tmp_path / "two"
    subprocess.run(distill_cmd(digits_teacher, single, method, *steps), check=True, env=env(), capture_output=True,
                   timeout=300)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "omnidit"]
    for again in (False, True) if parallel == "fsdp" and method != "regression" else (False,):
        if again:
            assert [p.name for p in list_checkpoints(double)] == ["checkpoint-0000003", "checkpoint-0000004"]
            shutil.rmtree(double / "checkpoint-0000004")
        done = subprocess.run([*launcher, *distill_cmd(digits_teacher, double, method, *steps)[3:]], env=env(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, failure(done)
    a, b = final_state(single), final_state(double)
    assert a.keys() == b.keys()
    for k in a:  # same global batch and draws; only the order of float sums differs
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_a_video_model_distils_with_the_same_command(tmp_path):
    # The same code path for clips: the teacher's frames and fps come with its config; the student draws clips.
    from helpers import build, tiny_config

    from omnidit.checkpoint import save_checkpoint
    from omnidit.config import Config
    from omnidit.pipeline import load_pipeline

    cfg = tiny_config(context_dim=384, pooled_dim=384, rope_time_scale=8.0)
    config = Config()
    config.model = cfg
    config.data.name, config.data.width, config.data.height, config.data.frames, config.data.fps = \
        "shapes_video", 16, 16, 4, 8.0
    state = build(cfg).state_dict()
    teacher = save_checkpoint(tmp_path / "teacher", config, state, state)
    final = run_distill(teacher, tmp_path / "student", "progressive", "train.steps=2", "train.checkpoint_every=2",
                        "distill.teacher_steps=4", "distill.student_steps=2")
    pipe = load_pipeline(final, device="cpu")
    assert pipe.config.data.frames == 4 and pipe.config.sample.steps == 2
    clips = pipe.generate_video(["a red circle moving to the right"], seed=0)
    assert clips.shape == (1, 3, 4, 16, 16) and torch.isfinite(clips).all()


def test_a_recipe_runs_its_stages_in_order_and_resumes(digits_teacher, tmp_path, capsys):
    import json

    from omnidit.cli import main

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"stages": [
        {"name": "g", "method": "guidance", "teacher": "teacher", "overrides": ["train.steps=2"]},
        {"name": "p", "method": "progressive", "teacher": "g", "init_from": "g",
         "overrides": ["train.steps=2", "distill.teacher_steps=4", "distill.student_steps=2"]}]}))
    out = tmp_path / "out"
    args = ["distill", str(digits_teacher), str(out), "--recipe", str(recipe), *STUDENT, "train.checkpoint_every=2",
            "--no-progress"]
    assert main(args) == 0
    _, config = load_model(out / "p")
    assert config.distill.method == "progressive" and config.distill.teacher == str(out / "g")
    assert config.train.init_from == str(out / "g") and config.sample.steps == 2
    before = read_safetensors(list_checkpoints(out / "p")[-1] / "model.safetensors")
    assert main(args) == 0  # finished stages are runs at their last step: nothing more trains
    after = read_safetensors(list_checkpoints(out / "p")[-1] / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stages": [{"name": "p", "method": "progressive", "teacher": "g"}]}))
    assert main(["distill", str(digits_teacher), str(tmp_path / "o2"), "--recipe", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "'g' is neither 'teacher' nor an earlier stage" in err and len(err.strip().splitlines()) == 1
    bad.write_text(json.dumps({"stages": [{"name": "p", "method": "consistency", "teacher": "teacher"}]}))
    assert main(["distill", str(digits_teacher), str(tmp_path / "o2"), "--recipe", str(bad)]) == 2
    assert "unknown distillation method 'consistency'" in capsys.readouterr().err
    assert main(["distill", str(digits_teacher), str(tmp_path / "o3")]) == 2
    assert "needs --method or --recipe" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
