"""Distillation objectives: each method's loss, written once, with the equation of its paper.

The time convention is omnidit's everywhere: t = 1 is noise, t = 0 data, x_t = (1 - t) x0 + t eps, the
velocity is v = eps - x0, an Euler step from t to s is x_s = x_t + (s - t) v, and the model's clean estimate is
x0_hat = x_t - t v. A ``Velocity`` below is a callable (x: (B, N, D), t: (B,)) -> v like x, with its condition
(and guidance scale) already bound. omnidit.distill_train runs these losses on real models; the tests run them on
Gaussian data whose exact flow is known.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omnidit.flow import interpolate, training_loss

Velocity = Callable[[Tensor, Tensor], Tensor]


def _rows(t: Tensor, like: Tensor) -> Tensor:
    """A per-sample (B,) quantity shaped to broadcast over x (B, ...)."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def guided_velocity(v_cond: Tensor, v_uncond: Tensor, scale: Tensor | float, v_skip: Tensor | None = None,
                    skip_scale: float = 0.0) -> Tensor:
    """Classifier-free guidance with one scale per sample (B,), plus skip-layer guidance when ``v_skip`` is given:
    v = v_uncond + w (v_cond - v_uncond) + s (v_cond - v_skip), the velocity that the teacher samples with
    (omnidit.sampling.classifier_free_guidance, there with one scale for the batch)."""
    w = _rows(torch.as_tensor(scale, device=v_cond.device), v_cond) if isinstance(scale, Tensor) else scale
    v = v_uncond + w * (v_cond - v_uncond)
    return v if v_skip is None or not skip_scale else v + skip_scale * (v_cond - v_skip)


def guidance_distillation_loss(student: Velocity, teacher: Velocity, x_t: Tensor, t: Tensor) -> Tensor:
    """Guidance distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models", §3.1 stage one):
    min E_{w, t, x_t} || x_hat_student(x_t, w) - x_hat^w_teacher(x_t) ||^2, the student taking the guidance scale
    w as an input and the teacher guided at w (two passes, or three with skip-layer guidance). In velocity form:
    x_hat = x_t - t v, so matching velocities is the same minimiser (weighted by 1/t^2), and one student pass then
    replaces the guided pair. ``student`` and ``teacher`` are bound to the same condition and per-sample scale."""
    with torch.no_grad():
        target = teacher(x_t, t)
    return F.mse_loss(student(x_t, t).float(), target.float())


def two_step_target(teacher: Velocity, x_t: Tensor, t: Tensor, t_mid: Tensor, t_next: Tensor) -> Tensor:
    """The velocity that one Euler step from t to t_next must take to land where two teacher Euler steps
    (t -> t_mid -> t_next) land: (x_next - x_t) / (t_next - t). All times (B,)."""
    x_mid = x_t + _rows(t_mid - t, x_t) * teacher(x_t, t)
    x_next = x_mid + _rows(t_next - t_mid, x_t) * teacher(x_mid, t_mid)
    return (x_next - x_t) / _rows(t_next - t, x_t)


def progressive_distillation_loss(student: Velocity, teacher: Velocity, x_t: Tensor, t: Tensor, t_mid: Tensor,
                                  t_next: Tensor) -> Tensor:
    """Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion
    Models", Algorithm 2): one student step does what two teacher steps do, and each stage halves the steps.
    The paper's target x~ (its eq. 8, the clean image that makes one DDIM step land on the teacher's two-step
    result) becomes, for rectified flow and Euler steps, the velocity ``two_step_target``:
    L = || v_student(x_t, t) - (x''_{t_next} - x_t) / (t_next - t) ||^2 on the student's grid (t, t_next) with the
    teacher's grid point t_mid between them."""
    with torch.no_grad():
        target = two_step_target(teacher, x_t, t, t_mid, t_next)
    return F.mse_loss(student(x_t, t).float(), target.float())


def student_sample(student: Velocity, noise: Tensor, grid: Tensor) -> Tensor:
    """The student's Euler steps on ``grid`` (steps + 1,) from 1 to 0, from ``noise`` (B, N, D): (B, N, D), with
    the graph of every step."""
    x = noise
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t) * student(x, t.expand(x.shape[0]))
    return x


def regression_loss(student: Velocity, noise: Tensor, target: Tensor, grid: Tensor) -> Tensor:
    """Knowledge distillation of the teacher's sampler (Luhman & Luhman 2021, "Knowledge Distillation in Iterative
    Generative Models for Improved Sampling Speed", eq. 5: min E_z || f_student(z) - DDIM_teacher(z) ||^2; the
    distillation stage of InstaFlow, Liu et al. 2024, eq. 6, and DMD's regression term, Yin et al. 2024, eq. 9,
    with LPIPS where this uses the squared error), for an N-step student: its N Euler steps on ``grid`` from the
    noise z (B, N, D), differentiated through every step, against the teacher's sample from the same z
    (``target`` (B, N, D), a stored pair); ``grid`` (N + 1,) from 1 to 0. Zero exactly when the student's sampler
    reproduces the teacher's map from noise to samples."""
    return F.mse_loss(student_sample(student, noise, grid).float(), target.float())


def dmd_generator_loss(x0: Tensor, real: Velocity, fake: Velocity, t: Tensor, noise: Tensor) -> Tensor:
    """Distribution matching distillation's generator loss (Yin et al. 2024, "One-step Diffusion with Distribution
    Matching Distillation", eq. 7 with the normalised weight of eq. 8; DMD2, Yin et al. 2024b, keeps it).

    x0: (B, N, D) the student's samples, with their graph. Noise them to t, and let the teacher ("real") and the
    model of the student's own distribution ("fake") denoise them: the KL gradient (s_fake - s_real) dx/dtheta is,
    in clean-estimate form, proportional to x0_fake - x0_real, weighted per sample by 1 / mean|x0 - x0_real|.
    The loss 0.5 || x0 - sg(x0 - grad) ||^2 has exactly that gradient with respect to x0. It is zero when the two
    denoisers agree, i.e. when the student's distribution is the teacher's."""
    with torch.no_grad():
        x_t = interpolate(x0, noise, t)
        tt = _rows(t, x0)
        x0_real = x_t - tt * real(x_t, t)
        x0_fake = x_t - tt * fake(x_t, t)
        scale = (x0 - x0_real).abs().float().mean(dim=tuple(range(1, x0.dim())), keepdim=True).clamp_min(1e-6)
        grad = torch.nan_to_num((x0_fake - x0_real).float() / scale)
    return 0.5 * F.mse_loss(x0.float(), (x0.float() - grad).detach())


def fake_score_loss(fake: Velocity, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """The fake denoiser's objective in DMD (Yin et al. 2024, eq. 6; DMD2 §4.1): the ordinary flow-matching loss on
    the student's samples (detached), so that it tracks the distribution the student produces now."""
    return training_loss(lambda x, tt, _cond: fake(x, tt), x0.detach(), None, t, noise)


def gan_classifier_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """The classifier's loss in DMD2's GAN term (Yin et al. 2024b, "Improved Distribution Matching Distillation for
    Fast Image Synthesis", §4.3; the non-saturating GAN of Goodfellow et al. 2014): E[softplus(-D(real))] +
    E[softplus(D(fake))] over logits (B,) of noised real data and of the student's noised samples. Its minimum over
    D is at D = log p_real / p_fake; where the two distributions agree it is 2 log 2, at D = 0."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def gan_generator_loss(x0: Tensor, logits: Callable[[Tensor, Tensor], Tensor], t: Tensor, noise: Tensor) -> Tensor:
    """The student's side of DMD2's GAN term (§4.3): E[softplus(-D(x_t))], x_t = (1 - t) x0 + t noise.

    x0: (B, N, D) the student's samples, with their graph; ``logits(x_t, t)`` -> (B,) the classifier's. The value
    is that mean; its gradient reaches x0 only (exactly d/dx0 of the mean), never the classifier's weights, which
    train on ``gan_classifier_loss`` alone: the gradient with respect to x_t is taken first with
    torch.autograd.grad, and the loss is its surrogate <x0, (1 - t) grad>, as dmd_generator_loss's is."""
    x_t = interpolate(x0.detach(), noise, t).requires_grad_(True)
    with torch.enable_grad():
        value = F.softplus(-logits(x_t, t).float()).mean()
        (grad,) = torch.autograd.grad(value, x_t)
    surrogate = (x0.float() * (_rows(1 - t, x0) * grad).float().detach()).sum()
    return value.detach() + surrogate - surrogate.detach()


class FeatureClassifier(nn.Module):
    """DMD2's classification branch (§4.3): a per-token MLP on a denoiser's last hidden states (the input of its
    output layer, (B, N, D)), averaged over the tokens into one logit per sample (B,). ``attach`` makes it a part
    of the fake denoiser: it runs inside the fake's forward (so FSDP gathers its weights there), sees what the fake
    sees (the caption, the time), and is saved, optimised and wrapped with the fake. The last layer starts at zero:
    logit 0, the classifier that cannot tell."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim, elementwise_affine=False), nn.Linear(dim, dim), nn.SiLU(),
                                 nn.Linear(dim, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.logits: Tensor | None = None  # (B,) of the model's latest forward with gradients enabled
        self.hook = None

    def attach(self, model: nn.Module) -> None:
        """Register on ``model`` (an MMDiT) as ``model.gan_classifier``, reading its final layer's input."""
        if self.hook is not None:
            raise RuntimeError("this classifier is attached already")
        model.gan_classifier = self
        self.hook = model.final_layer.register_forward_hook(self._read)

    def take(self) -> Tensor:
        """The logits (B,) of the latest forward, read once (a second read without a forward between is a bug)."""
        logits, self.logits = self.logits, None
        if logits is None:
            raise RuntimeError("no logits: the model has not run with gradients enabled since they were last read")
        return logits

    def _read(self, _module: nn.Module, inputs: tuple, _output: Tensor) -> None:
        # The no-grad passes (DMD's scores) need no logits; the others do, even those differentiated to x only.
        self.logits = self.net(inputs[0]).squeeze(-1).float().mean(dim=-1) if torch.is_grad_enabled() else None
