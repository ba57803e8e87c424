"""The training loop: rectified flow on token sequences, with EMA, checkpoints and exact resume.

Every random draw (data order, timesteps, noise, condition dropout) comes from one seeded CPU
generator whose state is saved in each checkpoint, and the data position is a pure function of
the step, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from omnidit.checkpoint import (
    CHECKPOINT_PREFIX,
    list_checkpoints,
    load_state_into,
    load_training_state,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    prune_checkpoints,
    read_safetensors,
    save_checkpoint,
)
from omnidit.condition import Condition
from omnidit.config import Config
from omnidit.data import batch_from_indices, build_dataset
from omnidit.errors import OmniditError
from omnidit.flow import drop_condition, sample_timesteps, training_loss
from omnidit.model.mmdit import MMDiT
from omnidit.pipeline import resolve_device
from omnidit.plot import plot_training_curves
from omnidit.tokens import check_image_size, image_position_ids, patchify


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (linear weights, embeddings); none on biases and norm scales."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warmup over ``warmup_steps``, then constant."""
    return base_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else base_lr


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)


def ema_decay_at(step: int, decay: float) -> float:
    """Warm the EMA up: early on, average over roughly the steps seen so far."""
    return min(decay, (1 + step) / (10 + step))


def batch_indices(step: int, batch_size: int, num_samples: int | None, seed: int) -> list[int]:
    """Dataset indices of the batch at ``step``: the data position is a pure function of the step.

    Finite datasets are read in a fresh seeded permutation every epoch; infinite ones in order.
    """
    start = step * batch_size
    if num_samples is None:
        return list(range(start, start + batch_size))
    out, perm_epoch, perm = [], -1, None
    for pos in range(start, start + batch_size):
        epoch, i = divmod(pos, num_samples)
        if epoch != perm_epoch:
            perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            perm_epoch = epoch
        out.append(int(perm[i]))
    return out


def check_compatible(config: Config, dataset) -> None:
    """Model, data and text settings must agree; say which key to change when they do not."""
    mc = config.model
    if mc.in_channels != dataset.channels:
        raise OmniditError(f"model.in_channels is {mc.in_channels} but the '{config.data.name}' data has "
                           f"{dataset.channels} channels", hint=f"set model.in_channels={dataset.channels}")
    if dataset.num_classes and mc.num_classes not in (0, dataset.num_classes):
        raise OmniditError(f"model.num_classes is {mc.num_classes} but the data has {dataset.num_classes} classes")
    check_image_size(config.data.height, config.data.width, mc.patch_size)
    if config.text.encoder == "none":
        if mc.context_dim or mc.pooled_dim:
            raise OmniditError("text.encoder is 'none' but the model reads text",
                               hint="set model.context_dim=0 and model.pooled_dim=0 (class labels only)")
        if not mc.num_classes:
            raise OmniditError("the model has neither text nor class conditioning",
                               hint="set text.encoder=minilm or model.num_classes")
        return
    from omnidit.text import text_encoder_dims

    dim, pooled = text_encoder_dims(config.text.encoder)
    if mc.context_dim not in (0, dim) or mc.pooled_dim not in (0, pooled):
        raise OmniditError(f"the text encoder gives {dim}-d tokens and {pooled}-d pooled vectors, but the model has "
                           f"context_dim={mc.context_dim}, pooled_dim={mc.pooled_dim}",
                           hint=f"set model.context_dim={dim} model.pooled_dim={pooled}")


class Trainer:
    """Holds the state of one run; ``run()`` trains to ``config.train.steps``."""

    def __init__(self, config: Config, progress: bool = True) -> None:
        self.config, self.progress = config, progress
        tc = config.train
        self.device = resolve_device(tc.device)
        self.out_dir = Path(tc.out_dir)
        dc = config.data
        self.dataset = build_dataset(dc.name, dc.width, dc.height, seed=dc.seed, path=dc.path, held_out=dc.held_out)
        check_compatible(config, self.dataset)
        self.text_encoder = None
        if config.text.encoder != "none":
            from omnidit.text import load_text_encoder

            self.text_encoder = load_text_encoder(config.text.encoder, config.text.max_length, device=self.device)
        torch.manual_seed(tc.seed)  # parameter init
        self.model = MMDiT(config.model).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, tc.weight_decay), lr=tc.lr,
                                           betas=(0.9, 0.999), eps=1e-8)
        self.generator = torch.Generator().manual_seed(tc.seed)
        self.step = 0
        mc = config.model
        self.ids = image_position_ids(dc.height // mc.patch_size, dc.width // mc.patch_size, len(mc.axes_dim),
                                      device=self.device)
        self.null_cond = self._null_condition()

    def _null_condition(self) -> Condition:
        cond = self.text_encoder.encode([""]) if self.text_encoder is not None else Condition()
        if self.config.model.num_classes:
            cond.labels = torch.tensor([self.model.null_label])
        return cond.to(self.device)

    def condition(self, captions: list[str], labels: Tensor) -> Condition:
        cond = self.text_encoder.encode(captions) if self.text_encoder is not None else Condition()
        if self.config.model.num_classes:
            cond.labels = labels
        return cond.to(self.device)

    def train_step(self) -> float:
        """One optimisation step on the batch that belongs to ``self.step``; returns the loss."""
        tc, mc = self.config.train, self.config.model
        idx = batch_indices(self.step, tc.batch_size, self.dataset.num_samples, self.config.data.seed)
        images, captions, labels = batch_from_indices(self.dataset, idx)
        x0 = patchify(images, mc.patch_size).to(self.device)  # (B, N, C*p*p)
        cond = drop_condition(self.condition(captions, labels), self.null_cond, tc.cond_dropout, self.generator)
        t = sample_timesteps(len(idx), tc.timesteps, tc.t_mean, tc.t_std, tc.t_shift, generator=self.generator)
        noise = torch.randn(x0.shape, generator=self.generator)
        lr = learning_rate(self.step, tc.lr, tc.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss = training_loss(lambda x, tt, c: self.model(x, self.ids, tt, c), x0, cond, t.to(self.device),
                             noise.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.optimizer.step()
        update_ema(self.ema, self.model, ema_decay_at(self.step, tc.ema_decay))
        self.step += 1
        return loss.item()

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self) -> Path:
        tensors, meta = optimizer_state_to_flat(self.optimizer.state_dict())
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        meta.update(step=self.step)
        path = save_checkpoint(self.out_dir / f"{CHECKPOINT_PREFIX}{self.step:07d}", self.config,
                               self.model.state_dict(), self.ema.state_dict(), tensors, meta)
        prune_checkpoints(self.out_dir, self.config.train.keep_last)
        return path

    def resume(self) -> Path | None:
        """Load the latest checkpoint of ``out_dir`` if there is one; returns it."""
        checkpoints = list_checkpoints(self.out_dir)
        if not checkpoints:
            return None
        latest = checkpoints[-1]
        load_state_into(self.model, read_safetensors(latest / "model.safetensors"), latest / "model.safetensors")
        load_state_into(self.ema, read_safetensors(latest / "ema.safetensors"), latest / "ema.safetensors")
        tensors, meta = load_training_state(latest)
        self.optimizer.load_state_dict(optimizer_state_from_flat(tensors, meta))
        self.generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        self.step = int(meta["step"])
        return latest

    # ---- evaluation during training ----------------------------------------------------------
    def eval_suite(self) -> str | None:
        suite = self.config.train.eval_suite
        if suite == "auto":
            suite = self.config.data.name if self.config.data.name in ("shapes", "digits") else None
        return suite

    def evaluate(self, log) -> dict | None:
        """Score the EMA model on a small, seeded slice of the suite; log it and save its grid."""
        from omnidit.evaluate.runner import evaluate_model
        from omnidit.pipeline import Pipeline

        suite = self.eval_suite()
        if suite is None:
            return None
        tc = self.config.train
        pipe = Pipeline(self.ema, self.config, self.text_encoder, self.device)
        report = evaluate_model(pipe, suite, n_per_prompt=tc.eval_n_per_prompt, limit=tc.eval_limit,
                                progress=False, frechet=False)
        report.save(grid_path=self.out_dir / "eval" / f"step_{self.step:07d}.png")
        record = {"step": self.step, "eval": {"suite": suite, "overall": report.overall,
                                              "categories": report.categories}}
        log.write(json.dumps(record) + "\n")
        log.flush()
        tqdm.write(f"step {self.step}: {suite} suite {report.overall:.3f} "
                   + " ".join(f"{k}={v:.2f}" for k, v in report.categories.items()))
        return record

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> Path:
        tc = self.config.train
        if tc.resume and (resumed := self.resume()) is not None:
            tqdm.write(f"resumed from {resumed} at step {self.step}")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in self.model.parameters())
        tqdm.write(f"training {n_params / 1e6:.2f}M parameters on {self.device} for {tc.steps} steps "
                   f"(batch {tc.batch_size}) -> {self.out_dir}")
        log = (self.out_dir / "metrics.jsonl").open("a")
        bar = tqdm(total=tc.steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        last_saved, start, losses = None, time.perf_counter(), []
        try:
            while self.step < tc.steps:
                loss = self.train_step()
                if not math.isfinite(loss):
                    raise OmniditError(f"the loss became {loss} at step {self.step}",
                                       hint="lower train.lr or raise train.warmup_steps")
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    elapsed = time.perf_counter() - start
                    record = {"step": self.step, "loss": sum(losses) / len(losses),
                              "lr": self.optimizer.param_groups[0]["lr"], "elapsed_s": round(elapsed, 3)}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    losses = []
                if tc.eval_every and (self.step % tc.eval_every == 0 or self.step == tc.steps):
                    self.evaluate(log)
                if self.step % tc.checkpoint_every == 0 or self.step == tc.steps:
                    last_saved = self.save()
                    plot_training_curves(self.out_dir / "metrics.jsonl", self.out_dir / "curves.png")
        finally:
            bar.close()
            log.close()
        return last_saved or list_checkpoints(self.out_dir)[-1]


def train(config: Config, progress: bool = True) -> Path:
    """Train as the config says and return the final checkpoint folder."""
    return Trainer(config, progress=progress).run()
