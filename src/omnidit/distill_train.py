"""``omnidit distill``: train a student toward a teacher, with the trainer's loop, checkpoints and exact resume.

The student is an ordinary omnidit model: the teacher's architecture (or more blocks) plus a guidance-scale input
(``model.guidance_embed``, Flux dev's), initialised from the teacher's weights, with a ``sample`` section that says
how it samples (its steps, its guidance scale as an input, no unconditional pass, one candidate). Each method's loss
lives in omnidit.distill; this module draws the batches, runs the teacher and keeps the extra state:

- ``guidance``: the teacher guided at a scale drawn per sample (its CFG and skip-layer guidance), on data noised to
  the trainer's times; the student takes the scale as an input. Sampling steps stay the teacher's.
- ``progressive``: stages of halving (distill.teacher_steps -> ... -> distill.student_steps); at each stage boundary
  the student's EMA becomes the next stage's teacher (kept in the checkpoints for exact resume).
- ``dmd``: distribution matching with a fake denoiser trained online on the student's samples (two time-scale
  updates: the generator steps every distill.generator_every-th step), with backward simulation for N steps;
  with distill.regression_weight > 0 the generator's loss adds DMD's regression term on teacher pairs (below), with
  distill.gan_weight > 0 DMD2's GAN term: a classifier on the fake denoiser's features tells the data from the
  student's samples.
- ``regression``: distill.pairs teacher samples are drawn once, each from its own noise with the teacher's sampler
  (OUT/pairs, in chunks, so an interrupted run keeps what it made); the student's N Euler steps from a pair's
  noise must land on its sample.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from omnidit import distributed as D
from omnidit.condition import Condition
from omnidit.config import Config, DistillConfig, SampleConfig, apply_overrides, config_from_dict, parse_override
from omnidit.distill import (
    FeatureClassifier,
    Velocity,
    dmd_generator_loss,
    fake_score_loss,
    gan_classifier_loss,
    gan_generator_loss,
    guidance_distillation_loss,
    guided_velocity,
    progressive_distillation_loss,
    regression_loss,
)
from omnidit.distill_pairs import PairStore
from omnidit.errors import OmniditError
from omnidit.flow import interpolate, sample_timesteps
from omnidit.model.mmdit import MMDiT
from omnidit.optim import ema_decay_at, learning_rate, make_optimizer, update_ema
from omnidit.sampling import sample, timestep_schedule
from omnidit.train import Trainer, train
from omnidit.train_batches import batch_indices

# The train section of a distillation when the command line says nothing else: short, from the teacher's weights.
DEFAULT_TRAIN = {"steps": {"guidance": 1500, "progressive": 3000, "dmd": 3000, "regression": 2000},
                 "lr": {"guidance": 1e-4, "progressive": 1e-4, "dmd": 2e-5, "regression": 1e-4},
                 "batch_size": 32, "warmup_steps": 50, "ema_decay": 0.995, "cond_dropout": 0.0, "log_every": 25,
                 "checkpoint_every": 250, "keep_last": 2, "lr_schedule": "constant"}
# Keys the student may not change: the weights only make sense with the teacher's.
FIXED_MODEL_KEYS_HINT = ("drop the model.* overrides: a student has the teacher's architecture (more blocks "
                         "allowed: model.depth, model.depth_single)")


def student_config(teacher: str | Path, out_dir: str | Path, method: str, overrides: Sequence[str] = ()) -> Config:
    """The config of a distillation run: the teacher's, with a guidance input, the distill section and a short
    train section (``DEFAULT_TRAIN``), then ``overrides`` (dotted keys). Every contradiction with the teacher is
    one clear error."""
    from omnidit.checkpoint import check_growable, read_config, resolve_model_dir, weight_differences

    try:
        directory = resolve_model_dir(teacher)
        source = read_config(directory)
    except OmniditError as e:
        raise OmniditError(f"the teacher {teacher}: {e.message}",
                           hint="pass a model folder (a run, a checkpoint-* or exported folder) or a shipped name, "
                                "e.g. shapes") from None
    if source.train.lora_rank or source.train.layout_boxes:
        raise OmniditError(f"the teacher {teacher} is an adapter (LoRA or layout), not a whole model",
                           hint="merge a LoRA first (omnidit convert) or distil the base model")
    d = source.to_dict()
    d["model"]["guidance_embed"] = True
    d["train"] = {key: (value[method] if isinstance(value, dict) else value) for key, value in DEFAULT_TRAIN.items()}
    d["train"].update(out_dir=str(out_dir), init_from=str(teacher),  # the times the teacher was trained at
                      **{k: getattr(source.train, k) for k in ("timesteps", "t_mean", "t_std", "t_shift")})
    d["distill"] = {"method": method, "teacher": str(teacher)}
    keys = [parse_override(o)[0] for o in overrides]
    d = apply_overrides(d, list(overrides))
    start = d["train"]["init_from"]
    if start != str(teacher):  # a student that starts from another (deeper) student keeps its depth
        try:
            start_model = read_config(resolve_model_dir(start)).model
        except OmniditError:  # a recipe's stage not trained yet; the run itself names a folder that is missing
            start_model = None
        if start_model is not None:
            d["model"].update({k: getattr(start_model, k) for k in ("depth", "depth_single")
                               if f"model.{k}" not in keys})
    config = config_from_dict(d)
    # A student may be deeper than its teacher: it starts as the teacher's blocks with identity blocks after
    # them (checkpoint.deepen_state, train.init_grow), so it begins computing what the teacher's weights did.
    check_growable(source.model, config.model, hint=f"give the student at least the teacher's {source.model.depth} "
                   f"double- and {source.model.depth_single} single-stream blocks (model.depth, model.depth_single), "
                   "or drop them")
    config.train.init_grow = (config.model.depth, config.model.depth_single) != (source.model.depth,
                                                                                source.model.depth_single)
    changed = weight_differences(source, config, ignore=("guidance_embed", "depth", "depth_single"),
                                 there="in the teacher")
    if not config.model.guidance_embed:
        changed.append("model.guidance_embed: a student takes the guidance scale as an input, it must stay true")
    if changed:
        raise OmniditError(f"the student's config contradicts the teacher's ({'; '.join(changed)})",
                           hint=FIXED_MODEL_KEYS_HINT)
    if config.train.lora_rank:
        raise OmniditError("distillation trains every weight of the student", hint="drop train.lora_rank")
    if config.train.grad_accum != 1 or config.train.counterfactual_weight or config.train.given_p \
            or config.train.region_p or config.train.layout_boxes or config.train.object_loss_weight != 1:
        raise OmniditError("distillation takes one batch per step, with no counterfactual pairs, given tokens, "
                           "layout or loss weights", hint="drop train.grad_accum, counterfactual_weight, given_p, "
                                                          "region_p, layout_boxes and object_loss_weight (a smaller "
                                                          "train.batch_size saves memory)")
    if len(config.model.generated_streams) != 1:
        raise OmniditError("distillation works on models of one generated stream (images or silent clips) for now",
                           hint="distil an image or video model")
    # How the student samples: its own steps, the scale as an input (no unconditional pass), one candidate.
    s, dc = config.sample, config.distill
    if "sample.steps" not in keys and method != "guidance":
        s.steps = dc.student_steps
    if method == "progressive" and s.steps != dc.student_steps:
        raise OmniditError(f"sample.steps={s.steps} contradicts distill.student_steps={dc.student_steps}: a "
                           "progressive student samples on the grid it was trained on",
                           hint="drop sample.steps")
    euler = [("sampler", "euler")] if method != "guidance" else []  # the steps the few-step methods train on
    for key, value in (("skip_scale", 0.0), ("skip_blocks", []), ("candidates", 1), ("cache", "none"),
                       ("cache_threshold", 0.0), *euler):
        if f"sample.{key}" not in keys:
            setattr(s, key, value)
    if "sample.cfg_interval" not in keys:
        s.cfg_interval = [0.0, 1.0]
    teacher_sampling(source, dc)  # checks distill.teacher_skip_scale before anything is written
    if not dc.guidance:
        dc.guidance = [1.0, 1.5 * source.sample.cfg] if method == "guidance" else [source.sample.cfg] * 2
    if "sample.cfg" not in keys:
        s.cfg = source.sample.cfg if dc.guidance[0] <= source.sample.cfg <= dc.guidance[1] else dc.guidance[1]
    return config


def teacher_sampling(teacher: Config, dc: DistillConfig) -> SampleConfig:
    """The sampling settings of the teacher's guided velocity: its own, with distill.teacher_skip_scale's scale
    where that is >= 0 (one clear error where the teacher has no skip-layer guidance to scale)."""
    if dc.teacher_skip_scale < 0:
        return teacher.sample
    if dc.teacher_skip_scale > 0 and (teacher.model.guidance_embed or not teacher.sample.skip_blocks):
        why = ("takes its guidance scale as an input (one pass, no skip-layer guidance)" if teacher.model.guidance_embed
               else "skips no blocks (its sample.skip_blocks is empty)")
        raise OmniditError(f"distill.teacher_skip_scale={dc.teacher_skip_scale:g} needs a teacher with skip-layer "
                           f"guidance, and this one {why}",
                           hint="drop distill.teacher_skip_scale, or give the teacher sample.skip_blocks")
    return replace(teacher.sample, skip_scale=dc.teacher_skip_scale)


class Distiller(Trainer):
    """A Trainer whose step is a distillation method's (config.distill.method); everything else is the trainer's."""

    def __init__(self, config: Config, progress: bool = True) -> None:
        from omnidit.checkpoint import initial_weights, load_model

        dc = config.distill
        if not dc.method or not dc.teacher:
            raise OmniditError("a distillation needs distill.method and distill.teacher",
                               hint="run it with omnidit distill TEACHER OUT --method guidance")
        super().__init__(config, progress)
        if self.multi:
            raise OmniditError("distillation works on image or silent-clip data for now", hint="distil an image model")
        self.teacher, teacher_config = load_model(dc.teacher, device=self.device)
        uses_pairs = dc.method == "regression" or dc.regression_weight > 0  # dmd's regression term reads them too
        if uses_pairs:  # the pairs record a checksum of the weights that drew them (before sharding)
            teacher_weights = float(sum(p.double().sum() for p in self.teacher.parameters()))
        if config.train.parallel == "fsdp":  # frozen, but sharded like the student: its memory is spread too
            self.teacher = D.wrap_model(self.teacher.requires_grad_(False), self.world, "fsdp")
        self.teacher_sample = teacher_sampling(teacher_config, dc)
        self.scales = tuple(float(g) for g in dc.guidance)
        self.shift = config.sample.shift
        self.stage_teacher: MMDiT | None = None  # progressive: the teacher of the current stage after the first
        self.stage = 0
        self.fake = self.fake_optimizer = self.classifier = None
        if dc.method == "dmd":  # the fake denoiser starts as the teacher's weights (initialise_from)
            torch.manual_seed(config.train.seed + 1)
            fake = MMDiT(config.model)
            fake.load_state_dict(initial_weights(dc.teacher, config)[1])  # it starts as the teacher (resume overwrites)
            if dc.gan_weight:  # DMD2's classifier: part of the fake (its weights, optimizer and checkpoints)
                self.classifier = FeatureClassifier(config.model.hidden_size)
                self.classifier.attach(fake)
            self.fake = D.wrap_model(fake.to(self.device), self.world, config.train.parallel)
            self.fake_optimizer = make_optimizer(self.fake, config.train.lr * dc.fake_lr_ratio,
                                                 config.train.weight_decay, self.device, apart=self.classifier)
        self.generator_updated = True  # dmd: whether the last step updated the student (else the fake only)
        self.classifier_gap = torch.zeros(())  # dmd's GAN term: mean logit of the data minus the samples', logged
        self.pairs = self.make_pairs(teacher_weights) if uses_pairs else None
        if dc.method == "regression":
            self.teacher = None  # the pairs hold all that regression needs of it

    # ---- the teacher and the student as velocities ---------------------------------------------
    def teacher_velocity(self, model: MMDiT, cond: Condition, scale: Tensor) -> Velocity:
        """The teacher's guided velocity at ``scale`` (B,): one pass for a model that takes the scale as an input,
        else classifier-free guidance (+ skip-layer guidance) with the teacher's own sampling settings."""
        ids = self.ids
        if model.config.guidance_embed:
            with_scale = replace(cond, guidance=scale)
            return lambda x, t: model(x, ids, t, with_scale)
        s = self.teacher_sample
        plain = replace(cond, guidance=None)
        both = Condition.cat([plain, self.null_cond.repeat(plain.batch_size)])
        (lo, hi), (skip_lo, skip_hi) = s.cfg_interval, s.skip_interval

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            v_cond, v_uncond = model(torch.cat([x, x]), ids, torch.cat([t, t]), both).chunk(2)
            w = torch.where((t >= lo) & (t <= hi), scale, torch.ones_like(scale))
            v_skip = None
            if s.skip_scale:
                inside = ((t >= skip_lo) & (t <= skip_hi)).reshape(-1, 1, 1)
                v_skip = torch.where(inside, model(x, ids, t, plain, skip_single=s.skip_blocks), v_cond)
            return guided_velocity(v_cond, v_uncond, w, v_skip, s.skip_scale)

        return velocity

    def student_velocity(self, model: nn.Module, cond: Condition, scale: Tensor) -> Velocity:
        with_scale = replace(cond, guidance=scale)
        return lambda x, t: model(x, self.ids, t, with_scale)

    # ---- progressive stages ----------------------------------------------------------------------
    def stages(self) -> int:
        dc = self.config.distill
        return round(math.log2(dc.teacher_steps / dc.student_steps))

    def stage_at(self, step: int) -> int:
        per_stage = max(1, self.config.train.steps // self.stages())
        return min(step // per_stage, self.stages() - 1)

    def _advance_stage(self) -> None:
        """At a stage boundary the student's EMA becomes the teacher (frozen)."""
        stage = self.stage_at(self.step)
        if stage > self.stage:
            self.stage_teacher = self._frozen_ema()
            self.stage = stage

    def _frozen_ema(self) -> nn.Module:
        return D.frozen_copy(self.ema, self.world, self.config.train.parallel,
                             lambda: MMDiT(self.config.model).to(self.device))

    # ---- regression: the teacher's samples, drawn once -----------------------------------------
    def make_pairs(self, teacher_weights: float) -> PairStore:
        """distill.pairs (noise, teacher sample, data index, scale) rows in OUT/pairs (omnidit.distill_pairs), each
        drawn with the teacher's sampling settings (steps, sampler, shift, CFG and skip-layer guidance; one
        candidate). ``teacher_weights``: a checksum of the teacher's weights, part of what the chunks record."""
        from omnidit.distill_pairs import draw_pairs

        dc, s = self.config.distill, self.teacher_sample
        setting = json.dumps({"teacher": dc.teacher, "teacher_weights": repr(teacher_weights), "sample": asdict(s),
                              "guidance": self.scales, "train_seed": self.config.train.seed,
                              "data": asdict(self.config.data),
                              "tokens": [self.num_tokens, self.config.model.token_dim]}, sort_keys=True)
        skip = ", skip-layer guidance" if s.skip_scale else ""
        announce = f"{s.steps} {s.sampler} steps, cfg {self.scales[0]:g}{skip}"
        return draw_pairs(self.out_dir / "pairs", dc.pairs, setting, self._pair_chunk, self.world, self.progress,
                          announce)

    def _pair_chunk(self, number: int, rows: int) -> dict[str, Tensor]:
        """Chunk ``number`` of the pairs (``rows`` of them) on every rank: each draws its share, then they are
        gathered. noise and sample (rows, N, D), index and scale (rows,)."""
        world, s = self.world, self.teacher_sample
        g = torch.Generator().manual_seed(self.config.train.seed * 7919 + number)
        source = self.cache if self.cache is not None else self.dataset
        if source.num_samples is None:  # an endless data set (shapes): scenes in order, as the trainer reads them
            index = torch.arange(number * rows, (number + 1) * rows)
        else:
            index = torch.randint(0, source.num_samples, (rows,), generator=g)
        lo, hi = self.scales
        scale = lo + (hi - lo) * torch.rand(rows, generator=g)
        noise = torch.randn((rows, self.num_tokens, self.config.model.token_dim), generator=g)
        local = rows // world.world_size
        mine = slice(world.rank * local, (world.rank + 1) * local)
        _, cond, _ = self.image_batch(index[mine].tolist())
        velocity = self.teacher_velocity(self.teacher, cond, scale[mine].to(self.device))
        with torch.no_grad():
            drawn = sample(lambda x, t: velocity(x, t.expand(x.shape[0])), noise[mine].to(self.device), s.steps,
                           s.sampler, s.shift).float()
        return {"noise": noise, "sample": D.all_gather_rows(drawn, world).cpu(), "index": index, "scale": scale}

    # ---- one step ------------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float]:
        tc, world = self.config.train, self.world
        batch, local = tc.batch_size, tc.batch_size // world.world_size
        mine = slice(world.rank * local, (world.rank + 1) * local)
        source = self.cache if self.cache is not None else self.dataset
        dc = self.config.distill
        regression = dc.method == "regression"
        rows = len(self.pairs) if regression else source.num_samples
        idx = batch_indices(self.step, batch, rows, self.config.data.seed)
        # Every draw for the global batch from the one seeded generator, identically on every rank.
        g = self.generator
        lo, hi = self.scales
        scale = (lo + (hi - lo) * torch.rand(batch, generator=g))[mine].to(self.device)
        noise = torch.randn((batch, self.num_tokens, self.config.model.token_dim), generator=g)[mine].to(self.device)
        pair = None
        if regression:  # a pair's noise, its teacher sample as x0, the condition and scale it was drawn with
            x0, noise, scale, cond = self._pair_batch(idx[mine])
        else:
            x0, cond, _ = self.image_batch(idx[mine])
        if self.pairs is not None and not regression and self.step % dc.generator_every == 0:  # dmd's regression term
            update = self.step // dc.generator_every  # the generator's updates walk through the pairs in order
            pair = self._pair_batch(batch_indices(update, batch, len(self.pairs), self.config.data.seed + 1)[mine])
        self.model.train()
        with self._autocast():
            loss, fake_loss = self._losses(batch, mine, x0, cond, scale, noise, pair)
        objective = loss if fake_loss is None else loss + fake_loss
        return self._update(loss, fake_loss, objective)

    def _pair_batch(self, rows) -> tuple[Tensor, Tensor, Tensor, Condition]:
        """Pairs ``rows`` (this rank's): the teacher's samples, their noise, and the scale and condition they were
        drawn with: (x0, noise, scale, cond)."""
        pair = self.pairs.rows(rows)
        _, cond, _ = self.image_batch(pair["index"].tolist())
        x0, noise, scale = (pair[key].to(self.device) for key in ("sample", "noise", "scale"))
        return x0, noise, scale, cond

    def _losses(self, batch: int, mine: slice, x0: Tensor, cond: Condition, scale: Tensor, noise: Tensor,
                pair: tuple | None = None) -> tuple[Tensor, Tensor | None]:
        """(the student's loss, the fake denoiser's or None) of the method, on this rank's rows; ``pair``: a batch
        of teacher pairs (``_pair_batch``) for DMD's regression term on a generator step."""
        tc, dc, g = self.config.train, self.config.distill, self.generator
        student = self.student_velocity(self.model, cond, scale)
        if dc.method == "guidance":
            t = sample_timesteps(batch, tc.timesteps, tc.t_mean, tc.t_std, tc.t_shift, generator=g)[mine]
            t = t.to(self.device)
            loss = guidance_distillation_loss(student, self.teacher_velocity(self.teacher, cond, scale),
                                              interpolate(x0, noise, t), t)
            fake_loss = None
        elif dc.method == "progressive":
            self._advance_stage()
            n = dc.teacher_steps // 2 ** (self.stage + 1)  # the student's steps in this stage
            grid = timestep_schedule(2 * n, self.shift)  # the stage teacher's, (2n + 1,) from 1 to 0
            i = torch.randint(0, n, (batch,), generator=g)[mine]
            t, t_mid, t_next = (grid[2 * i + k].to(self.device) for k in range(3))
            teacher = self.teacher if self.stage_teacher is None else self.stage_teacher
            loss = progressive_distillation_loss(student, self.teacher_velocity(teacher, cond, scale),
                                                 interpolate(x0, noise, t), t, t_mid, t_next)
            fake_loss = None
        elif dc.method == "regression":
            loss = regression_loss(student, noise, x0, timestep_schedule(dc.student_steps, self.shift).to(x0.device))
            fake_loss = None
        else:
            loss, fake_loss = self._dmd_losses(batch, mine, cond, scale, noise, x0)
            if pair is not None:  # DMD's eq. 9: L = L_DMD + lambda_reg * L_reg, on the generator's steps
                target, pair_noise, pair_scale, pair_cond = pair
                grid = timestep_schedule(dc.student_steps, self.shift).to(target.device)
                student = self.student_velocity(self.model, pair_cond, pair_scale)
                loss = loss + dc.regression_weight * regression_loss(student, pair_noise, target, grid)
        return loss, fake_loss

    def _update(self, loss: Tensor, fake_loss: Tensor | None, objective: Tensor) -> tuple[float, float]:
        """Backward, clip, step (the student only on its steps), EMA; returns (loss, gradient norm)."""
        tc, dc, world = self.config.train, self.config.distill, self.world
        objective.backward()
        max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        grad_norm = D.clip_gradients(self.model, max_norm)
        values = [D.all_reduce_mean(loss.detach(), world), grad_norm.to(loss)]
        if fake_loss is not None:
            fake_norm = D.clip_gradients(self.fake, max_norm)
            values += [D.all_reduce_mean(fake_loss.detach(), world), fake_norm.to(loss)]
        if self.classifier is not None:  # this rank's rows: for the log only
            values.append(self.classifier_gap.to(loss))
        values = torch.stack(values).tolist()  # one host sync per step
        names = ("fake_loss", "fake_grad_norm", "classifier_gap")  # logged beside the student's loss
        self.side_metrics = dict(zip(names, values[2:]))
        if all(math.isfinite(v) for v in values):
            lr = learning_rate(self.step, tc.lr, tc.warmup_steps, tc.steps, tc.lr_schedule, tc.lr_min_ratio,
                               tc.lr_decay_steps)
            if self.generator_updated:
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.optimizer.step()
                update_ema(self.ema, self.model, ema_decay_at(self.step, tc.ema_decay))
            if fake_loss is not None:
                for i, group in enumerate(self.fake_optimizer.param_groups):  # groups 2, 3: the classifier's
                    group["lr"] = lr * dc.fake_lr_ratio * (dc.gan_lr_ratio if i >= 2 else 1.0)
                self.fake_optimizer.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.fake_optimizer is not None:
            self.fake_optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return values[0], values[1]

    def _dmd_losses(self, batch: int, mine: slice, cond: Condition, scale: Tensor, noise: Tensor, real: Tensor
                    ) -> tuple[Tensor, Tensor]:
        """(generator loss, fake denoiser loss) of one DMD step. The student's sample comes from backward
        simulation (DMD2 §4.5): i steps of its own sampler without gradients, then its clean estimate at t_i.
        ``real``: (B, N, D) the data of this batch's captions, which DMD2's classifier (distill.gan_weight) tells
        from the student's samples."""
        dc, g = self.config.distill, self.generator
        n = dc.student_steps
        grid = timestep_schedule(n, self.shift).to(self.device)
        depth_all = torch.randint(0, n, (batch,), generator=g)
        depth, steps = depth_all[mine].to(self.device), int(depth_all.max())  # every rank runs as many passes
        t_lo, t_hi = dc.dmd_t_range
        t_score = (t_lo + (t_hi - t_lo) * torch.rand(batch, generator=g))[mine].to(self.device)
        t_fake = torch.rand(batch, generator=g)[mine].to(self.device)
        shape = (batch, *noise.shape[1:])  # drawn for the global batch, like every draw: each rank keeps its rows
        score_noise = torch.randn(shape, generator=g)[mine].to(self.device)
        fake_noise = torch.randn(shape, generator=g)[mine].to(self.device)
        self.generator_updated = self.step % dc.generator_every == 0
        x = noise
        with torch.no_grad():
            for j in range(steps):
                t = grid[j].expand(x.shape[0])
                moved = x + (grid[j + 1] - grid[j]) * self.student_velocity(self.model, cond, scale)(x, t)
                x = torch.where((depth > j).reshape(-1, 1, 1), moved, x)
        t_i = grid[depth]
        with torch.set_grad_enabled(self.generator_updated):
            x0 = x - t_i.reshape(-1, 1, 1) * self.student_velocity(self.model, cond, scale)(x, t_i)
        fake = self.student_velocity(self.fake, cond, scale)
        if self.generator_updated:
            loss = dmd_generator_loss(x0, self.teacher_velocity(self.teacher, cond, scale), fake, t_score,
                                      score_noise)
            if self.classifier is not None:
                loss = loss + dc.gan_weight * gan_generator_loss(x0, self._logits(cond, scale), t_score, score_noise)
        else:
            loss = x0.sum() * 0.0  # logged as 0 on the fake-only steps
        if self.classifier is None:
            return loss, fake_score_loss(fake, x0, t_fake, fake_noise)
        # The classifier reads the fake's features: the data's rows, noised as the samples are, ride in its forward.
        real_t = interpolate(real, fake_noise, t_fake)
        both = self.student_velocity(self.fake, Condition.cat([cond, cond]), torch.cat([scale, scale]))
        fake_loss = fake_score_loss(lambda x, t: both(torch.cat([x, real_t]), torch.cat([t, t]))[:len(x)], x0,
                                    t_fake, fake_noise)
        sample_logits, real_logits = self.classifier.take().chunk(2)  # the rows' order: samples, then data
        self.classifier_gap = (real_logits.mean() - sample_logits.mean()).detach()
        return loss, fake_loss + dc.gan_classifier_weight * gan_classifier_loss(real_logits, sample_logits)

    def _logits(self, cond: Condition, scale: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        """The classifier's logits (B,) as a function of (x_t, t). The pass runs through the fake's own module, not
        its DDP wrapper: it is differentiated to x_t alone (gan_generator_loss), and a wrapped forward with
        gradients on and no backward through its weights would leave DDP's reducer waiting for them."""
        fake = self.student_velocity(D.unwrap(self.fake), cond, scale)

        def logits(x: Tensor, t: Tensor) -> Tensor:
            fake(x, t)
            return self.classifier.take()

        return logits

    # ---- extra state: the stage teacher, the fake denoiser ---------------------------------------
    def extra_state(self) -> tuple[dict[str, Tensor], dict]:
        """The stage teacher and the fake denoiser with its optimizer, as full state dicts keyed by name
        (gathered from the shards under FSDP: every rank calls this)."""
        from omnidit.checkpoint import optimizer_state_to_flat

        tensors, meta = {}, {"distill_stage": self.stage}
        if self.stage_teacher is not None:
            tensors.update({f"stage_teacher/{k}": v for k, v in D.full_model_state(self.stage_teacher).items()})
        if self.fake is not None:
            tensors.update({f"fake/{k}": v for k, v in D.full_model_state(self.fake).items()})
            optimizer_state = D.full_optimizer_state(self.fake, self.fake_optimizer)
            if self.world.is_main:  # the other ranks' gathered dicts are empty
                flat, meta["fake_optimizer"] = optimizer_state_to_flat(optimizer_state)
                tensors.update({f"fake_{k}": v for k, v in flat.items()})
        return tensors, meta

    def load_extra_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        from omnidit.checkpoint import optimizer_state_from_flat

        self.stage = int(meta.get("distill_stage", 0))
        teacher = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("stage_teacher/")}
        if teacher:
            self.stage_teacher = self._frozen_ema()  # its shape (and shards); then its own weights
            D.load_full_state(self.stage_teacher, teacher)
        if self.fake is not None:
            fake = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("fake/")}
            saved = any(k.startswith("gan_classifier.") for k in fake)
            if saved != (self.classifier is not None):
                raise OmniditError(f"this DMD run was {'started with' if saved else 'started without'} DMD2's GAN "
                                   "term (distill.gan_weight); a run keeps it on or off to the end",
                                   hint=f"resume it {'with' if saved else 'without'} distill.gan_weight, or start a "
                                        "new run (train.init_from the student)")
            flat = {k[len("fake_"):]: v for k, v in tensors.items() if k.startswith("fake_optim/")}
            state = optimizer_state_from_flat(flat, meta["fake_optimizer"])
            if all(isinstance(k, int) for group in state["param_groups"] for k in group["params"]):
                # keyed by index: written by omnidit before its fake optimizer was saved by name (one process)
                D.load_full_state(self.fake, fake)
                self.fake_optimizer.load_state_dict(state)
            else:
                D.load_full_state(self.fake, fake, self.fake_optimizer, state)


def distill(config: Config, progress: bool = True) -> Path:
    """Run the distillation the config describes; returns the final checkpoint folder."""
    return train(config, progress, runner=Distiller)


RECIPE_KEYS = {"name", "method", "teacher", "init_from", "overrides"}


def read_recipe(path: str | Path, teacher: str, out: str | Path) -> list[tuple[str, str, str, list[str]]]:
    """The stages of a recipe file as (run folder, method, teacher, overrides), in order.

    A recipe is JSON: {"stages": [{"name": N, "method": M, "teacher": REF, "init_from": REF, "overrides": [...]}]}.
    A REF is "teacher" (the command's TEACHER) or the name of an earlier stage (its run folder, OUT/NAME);
    init_from (optional) is where the student starts when not at its teacher. Each stage resumes like any run, so
    running the recipe again continues where it stopped and skips finished stages."""
    from omnidit.config import DISTILL_METHODS, read_json

    recipe = read_json(path, "distillation recipe")
    stages = recipe.get("stages") if isinstance(recipe, dict) else None
    if not stages or not isinstance(stages, list) or set(recipe) != {"stages"}:
        raise OmniditError(f"the recipe {path} must be {{\"stages\": [...]}} with at least one stage",
                           hint="see configs/recipes/turbo.json")
    folders, out_stages = {"teacher": teacher}, []
    for i, stage in enumerate(stages):
        where = f"stage {i + 1} of the recipe {path}"
        if not isinstance(stage, dict) or not {"name", "method", "teacher"} <= set(stage) or set(stage) - RECIPE_KEYS:
            raise OmniditError(f"{where} must have name, method and teacher (and optionally init_from, overrides), "
                               f"got {sorted(stage) if isinstance(stage, dict) else stage!r}",
                               hint="see configs/recipes/turbo.json")
        name, overrides = str(stage["name"]), stage.get("overrides", [])
        if name in folders or not name.replace("_", "").replace("-", "").isalnum():
            raise OmniditError(f"{where}: the name '{name}' is taken or not a plain folder name",
                               hint="give each stage its own name of letters, digits, - and _")
        refs = {key: stage[key] for key in ("teacher", "init_from") if key in stage}
        unknown = [r for r in refs.values() if r not in folders]
        if unknown:
            raise OmniditError(f"{where}: '{unknown[0]}' is neither 'teacher' nor an earlier stage",
                               hint=f"use one of {', '.join(folders)}")
        if stage["method"] not in DISTILL_METHODS:
            raise OmniditError(f"{where}: unknown distillation method '{stage['method']}'",
                               hint=f"choose one of {', '.join(DISTILL_METHODS)}")
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise OmniditError(f"{where}: overrides must be a list of 'section.key=value' strings")
        if "init_from" in refs:
            overrides = [*overrides, f"train.init_from={folders[refs['init_from']]}"]
        folders[name] = str(Path(out) / name)
        out_stages.append((folders[name], str(stage["method"]), folders[refs["teacher"]], overrides))
    return out_stages
