"""The training loop: rectified flow on token sequences, with EMA, mixed precision, DDP/FSDP2,
gradient accumulation, a NaN guard, checkpoints and exact resume.

Every random draw (timesteps, noise, condition dropout) for the *global* batch comes from one seeded
CPU generator that every rank advances identically, and the data position is a pure function of the
step. So a resumed run continues bit-exactly, and N processes follow the same trajectory as one
process with the same global batch (each rank reads and computes only its slice).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from omnidit import distributed as D
from omnidit.checkpoint import (
    CHECKPOINT_PREFIX,
    initial_weights,
    list_checkpoints,
    load_training_state,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    prune_checkpoints,
    read_safetensors,
    save_checkpoint,
    training_provenance,
)
from omnidit.codecs import load_audio_codec, load_codec
from omnidit.condition import Condition
from omnidit.config import Config
from omnidit.data import batch_from_indices, batch_streams, build_dataset, streams
from omnidit.errors import OmniditError
from omnidit.flow import condition_keep_mask, counterfactual_loss, interpolate, velocity_errors, velocity_target
from omnidit.lora import adapters_off
from omnidit.model.mmdit import MMDiT
from omnidit.optim import ema_decay_at, learning_rate, make_optimizer, parameter_groups, update_ema  # noqa: F401
from omnidit.pipeline import Pipeline, resolve_device
from omnidit.plot import plot_training_curves
from omnidit.precompute import fields_for_config, open_cache
from omnidit.text import load_text_encoder
from omnidit.tokens import (
    StreamLayout,
    stream_layout,
    stream_tokens,
    video_patchify,
    video_position_ids,
)
from omnidit.train_batches import (
    batch_indices,
    counterfactual_pairs,
    image_draws,
    object_boxes,
    object_loss_weights,
    shows_shapes,
    stream_draws,
)
from omnidit.train_checks import check_compatible
from omnidit.validate import check_memory


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default (norms and modulation stay fp32); fp32 elsewhere."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class Trainer:
    """Holds the state of one run; ``run()`` trains to ``config.train.steps``."""

    def __init__(self, config: Config, progress: bool = True) -> None:
        self.config, tc, dc, mc = config, config.train, config.data, config.model
        self.world = D.init_world(resolve_device(tc.device))
        self.device = D.local_device(resolve_device(tc.device), self.world)
        self.progress = progress and self.world.is_main
        per_rank, rest = divmod(tc.batch_size, self.world.world_size * tc.grad_accum)
        if rest or not per_rank:
            raise OmniditError(f"train.batch_size {tc.batch_size} must be a multiple of world size x grad_accum "
                               f"({self.world.world_size} x {tc.grad_accum})")
        self.out_dir = Path(tc.out_dir)
        self.dataset = build_dataset(dc.name, dc.width, dc.height, seed=dc.seed, path=dc.path, held_out=dc.held_out,
                                     new_shapes=dc.new_shapes, new_shape_weight=dc.new_shape_weight,
                                     pair_weights=dc.pair_weights,
                                     scene_kinds=dc.scene_kinds, counterfactuals=dc.counterfactuals,
                                     counterfactual_directions=dc.counterfactual_directions,
                                     frames=dc.frames, fps=dc.fps, sample_rate=dc.sample_rate, seconds=dc.seconds)
        self.mix_dataset = build_dataset(dc.mix_name, dc.width, dc.height, seed=dc.seed, held_out=dc.held_out,
                                         frames=dc.frames, fps=dc.fps, sample_rate=dc.sample_rate,
                                         seconds=dc.seconds) if dc.mix_name else None
        picture = self.dataset if "img" in streams(self.dataset) else self.mix_dataset
        channels = picture.channels if picture is not None and "img" in streams(picture) else mc.in_channels
        self.codec = load_codec(dc.codec, channels, self.device, dc.codec_dtype)
        self.audio_codec = load_audio_codec(dc)
        check_compatible(config, self.dataset, self.codec)
        # Several streams (sound), or a second data set: every batch goes through the streams path.
        self.multi = streams(self.dataset) != ("img",) or self.mix_dataset is not None
        if self.mix_dataset is not None:
            check_compatible(config, self.mix_dataset, self.codec)
        filled = set(streams(self.dataset)) | set(streams(self.mix_dataset) if self.mix_dataset else ())
        unfed = [n for n in mc.extra_streams if n not in filled]
        if unfed:
            raise OmniditError(f"the model's {unfed[0]} stream gets no data from '{dc.name}'"
                               + (f" or '{dc.mix_name}'" if dc.mix_name else ""),
                               hint=f"train on data with {unfed[0]} (e.g. data.name=bounce), or drop it from "
                                    "model.extra_streams")
        if self.multi:
            for key, value in (("data.cache_dir", dc.cache_dir), ("train.region_p", tc.region_p)):
                if value:
                    raise OmniditError(f"{key} works on one image data set, not with sound or data.mix_name",
                                       hint=f"drop {key}")
            if tc.counterfactual_weight and self.mix_dataset is not None:
                raise OmniditError("train.counterfactual_weight works on one data set, not with data.mix_name",
                                   hint="drop data.mix_name or set train.counterfactual_weight=0")
            if tc.sample_every or tc.eval_every:
                raise OmniditError("train.sample_every and train.eval_every draw images, not clips with sound",
                                   hint="set them to 0 and evaluate checkpoints with omnidit eval")
        # With a precomputed cache, training reads latents and text features from disk: the text
        # encoder is loaded only when sampling needs it.
        self.cache = open_cache(dc.cache_dir, fields_for_config(config, self.dataset)) if dc.cache_dir else None
        if tc.region_caption and self.cache is not None:
            raise OmniditError("train.region_caption encodes the objects' captions as it goes, which a precomputed "
                               "cache cannot", hint="drop data.cache_dir or set train.region_caption=0")
        if tc.counterfactual_weight > 0:
            if self.cache is not None:
                raise OmniditError("train.counterfactual_weight needs the images themselves, not a precomputed "
                                   "cache", hint="drop data.cache_dir or set train.counterfactual_weight=0")
            if not hasattr(self.dataset, "counterfactual"):
                raise OmniditError(f"train.counterfactual_weight needs a data set with counterfactual pairs, and "
                                   f"'{dc.name}' has none",
                                   hint="use data.name=shapes (relation scenes), shapes_video (single-object "
                                        "clips) or tones")
        self.text_encoder = None
        if config.text.encoder != "none" and self.cache is None:
            self.text_encoder = load_text_encoder(config.text.encoder, config.text.max_length, device=self.device)
        torch.manual_seed(tc.seed)  # parameter init: identical on every rank
        model = MMDiT(mc).to(self.device)
        adapter_source = self.prepare_model(model)
        # Sound alone (tones): the picture's own weights would get no gradient, and a parameter without one has no
        # optimizer state to resume from, so they are frozen.
        if "img" not in filled:
            for p in model.stream_parameters("img"):
                p.requires_grad_(False)
        model.gradient_checkpointing = tc.gradient_checkpointing
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        self.model = D.wrap_model(model, self.world, tc.parallel)
        self.ema = D.wrap_model(ema, self.world, tc.parallel) if tc.parallel == "fsdp" else ema
        self.net = D.unwrap(self.model)  # the MMDiT inside (blocks, config)
        if tc.compile:
            self.net.compile_blocks()
        self.optimizer = make_optimizer(self.model, tc.lr, tc.weight_decay, self.device)
        self.amp_dtype = autocast_dtype(tc.precision, self.device)
        self.generator = torch.Generator().manual_seed(tc.seed)
        # Its own stream, so that turning train.counterfactual_weight on leaves the flow batches as they were.
        self.counterfactual_generator = torch.Generator().manual_seed(tc.seed + 1_000_003)
        self.step, self.bad_steps = 0, 0
        self.counterfactual_loss: float | None = None  # the last step's, when train.counterfactual_weight > 0
        self.side_metrics: dict[str, float] = {}  # the last step's other values to log (a distillation's fake loss)
        f = self.codec.downsample * mc.patch_size
        self.grid = (dc.height // f, dc.width // f)  # the token grid (latent pixels / patch)
        self.ids = video_position_ids(dc.frames, *self.grid, dc.fps, mc.temporal_patch, len(mc.axes_dim),
                                      device=self.device)  # (1, N, A); one frame = an image's ids
        self.num_tokens = self.ids.shape[1]
        self.layouts: dict[int, StreamLayout] = {}
        if self.multi:
            for ds in filter(None, (self.dataset, self.mix_dataset)):
                self.layouts[id(ds)] = stream_layout(mc, streams(ds), dc.frames, *self.grid, dc.fps,
                                                     getattr(ds, "samples", 0), dc.sample_rate, self.device,
                                                     self.audio_codec)
            self.num_tokens = max(sum(layout.tokens.values()) for layout in self.layouts.values())  # the larger
        self.null_cond = self._null_condition()
        self.last_checkpoint: Path | None = None
        self.init_source: dict | None = adapter_source  # set by initialise_from, kept in every checkpoint

    # ---- adapters: a frozen base, only the adapter trains and is saved ----------------------------------
    def prepare_model(self, model: MMDiT) -> dict | None:
        """Adapter runs (train.lora_rank): load the base weights into ``model`` (before the EMA copy and the
        optimizer are made), freeze them and add the adapter; returns the base's provenance. None otherwise."""
        if self.config.train.layout_boxes:
            raise OmniditError("train.layout_boxes runs train with omnidit.layout_train.LayoutTrainer",
                               hint="use omnidit.train.train(config) or omnidit train")
        if not self.config.train.lora_rank:
            return None
        from omnidit.lora import prepare_lora_training

        return prepare_lora_training(model, self.config)

    @property
    def adapter_only(self) -> bool:
        """Whether checkpoints hold the adapter alone (the base is train.init_from's)."""
        return self.config.train.lora_rank > 0

    def adapter_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The adapter's entries of a full state dict."""
        from omnidit.lora import adapter_state

        return adapter_state(state)

    def load_adapter_state(self, model: nn.Module, state: dict[str, Tensor], source: Path) -> None:
        """Load an adapter-only checkpoint's ``state`` into ``model`` (every adapter weight, nothing else)."""
        from omnidit.lora import load_adapter_state

        load_adapter_state(model, state, source)

    # ---- conditioning -------------------------------------------------------------------------
    def _null_condition(self) -> Condition:
        if self.cache is not None:
            cond = self.cache.null_condition()
        else:
            cond = self.text_encoder.encode([""]) if self.text_encoder is not None else Condition()
        if self.config.model.num_classes:
            cond.labels = torch.tensor([self.net.null_label])
        return cond.to(self.device)

    def condition(self, captions: list[str], labels: Tensor) -> Condition:
        cond = self.text_encoder.encode(captions) if self.text_encoder is not None else Condition()
        if self.config.model.num_classes:
            cond.labels = labels
        return cond.to(self.device)

    # ---- one step ------------------------------------------------------------------------------
    def _no_sync(self, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        if last or not self.world.distributed:
            return contextlib.nullcontext()
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        self.model.set_requires_gradient_sync(False)  # FSDP2; re-enabled before the last micro-batch
        return contextlib.nullcontext()

    def stream_batch_tokens(self, data: dict[str, Tensor]) -> dict[str, Tensor]:
        """Data by stream ({"img": clips, "audio": (b, 1, S)}) -> the model's tokens {name: (b, N_s, D_s)} on the
        device, through the picture's and the sound's codecs."""
        data = dict(data)
        if "img" in data:
            data["img"] = self.codec.encode(data["img"].to(self.device))
        if "audio" in data:
            data["audio"] = self.audio_codec.encode(data["audio"])
        return stream_tokens({n: x.to(self.device) for n, x in data.items()}, self.config.model, self.audio_codec)

    def train_step(self) -> tuple[float, float]:
        """One optimisation step on the batch that belongs to ``self.step``.

        Returns (loss, gradient norm): the loss averaged over the global batch, each row's error times
        train.prior_weight / prior_weight_dropped where those apply. A non-finite loss or gradient
        skips the update (the step still advances) and counts toward ``train.nan_patience``.
        """
        tc, world = self.config.train, self.world
        batch, local = tc.batch_size, tc.batch_size // world.world_size
        if self.multi:
            source, position = self.source_at(self.step)
        else:
            source, position = (self.cache if self.cache is not None else self.dataset), self.step
        idx = batch_indices(position, batch, source.num_samples, self.config.data.seed)
        # Randomness for the whole global batch, drawn identically on every rank.
        keep = condition_keep_mask(batch, tc.cond_dropout, self.generator)
        mine = slice(world.rank * local, (world.rank + 1) * local)
        counterfactual = tc.counterfactual_weight > 0
        weights = None  # train.object_loss_weight's, like x0
        known = None  # train.prior_preservation's rows (b,) that show no new shape
        if self.multi:
            layout = self.layouts[id(source)]
            ids = layout.ids
            t, noise = stream_draws(self.config, layout, batch, self.generator, self.audio_codec)
            if counterfactual:
                g = self.counterfactual_generator
                t_cf = tc.counterfactual_t_min + (1 - tc.counterfactual_t_min) * torch.rand(batch, generator=g)
                noise_cf = {n: torch.randn(v.shape, generator=g)[mine] for n, v in noise.items()}
            data, captions, labels = batch_streams(source, idx[mine])
            x0 = self.stream_batch_tokens(data)  # {name: (b, N_s, D_s)}
            cond = self.condition(captions, labels)
            pairs = counterfactual_pairs(source, idx[mine], x0, cond, labels, t_cf[mine], noise_cf,
                                         self.stream_batch_tokens, self.condition, self.device) \
                if counterfactual else None  # before the caption dropout: the pairs compare two real captions
            t = {n: v[mine].to(self.device) for n, v in t.items()}
            noise = {n: v[mine].to(self.device) for n, v in noise.items()}
        else:
            ids = self.ids
            boxes, phrases, empty = object_boxes(self.dataset, idx, self.generator, self.grid, tc.region_empty) \
                if tc.region_objects else (None, None, None)
            t, noise, on_box = image_draws(self.config, batch, self.num_tokens, self.grid, self.generator, boxes)
            # The rows whose region is their object's box (not an empty place) and whose caption becomes the object's.
            own = on_box & ~empty & (torch.rand(batch, generator=self.generator) < tc.region_caption) \
                if tc.region_caption else None
            if counterfactual:
                g = self.counterfactual_generator
                t_cf = tc.counterfactual_t_min + (1 - tc.counterfactual_t_min) * torch.rand(batch, generator=g)
                noise_cf = torch.randn(noise.shape, generator=g)
            x0, cond, labels = self.image_batch(idx[mine])
            if tc.object_loss_weight != 1:
                weights = self._patches(object_loss_weights(self.dataset, idx[mine], tc.object_loss_weight,
                                                            tc.object_loss_shapes))
            known = ~shows_shapes(self.dataset, idx[mine], self.config.data.new_shapes) \
                if tc.prior_preservation else None
            pairs = counterfactual_pairs(self.dataset, idx[mine], x0, cond, labels, t_cf[mine], noise_cf[mine],
                                         self.tokens, self.condition, self.device) \
                if counterfactual else None  # before the caption dropout: the pairs compare two real captions
            if own is not None and own[mine].any():  # after the pairs, which compare two scenes' captions
                cond = self.condition(phrases[mine], labels).where(own[mine].to(self.device), cond)
            t, noise = t[mine].to(self.device), noise[mine].to(self.device)
        cond = cond.where(keep[mine].to(self.device), self.null_cond)
        # train.prior_weight / prior_weight_dropped: drifting from the base on known scenes costs more where the
        # caption was kept / dropped (by default the unconditional velocity stays free to learn the new shape); (b,)
        # per-row factors of the errors, or None.
        row_weights = None
        if known is not None and (tc.prior_weight != 1 or tc.prior_weight_dropped != 1):
            known_weights = torch.where(keep[mine], tc.prior_weight, tc.prior_weight_dropped)
            row_weights = torch.where(known, known_weights, 1.0).to(self.device)

        self.model.train()

        def velocity(x: Tensor, tt: Tensor, c: Condition) -> Tensor:
            return self.model(x, ids, tt, c)

        micro = local // tc.grad_accum
        total = torch.zeros((), device=self.device)
        cf_total = torch.zeros((), device=self.device)
        # One forward and backward per pass: the micro-batches, then the counterfactual pairs (in one
        # pass, whatever grad_accum is); the gradients are all-reduced on the last pass only.
        passes = [slice(i * micro, (i + 1) * micro) for i in range(tc.grad_accum)] + [None] * (pairs is not None)
        for i, part in enumerate(passes):
            last = i == len(passes) - 1
            if last and world.distributed and not isinstance(self.model, nn.parallel.DistributedDataParallel):
                self.model.set_requires_gradient_sync(True)
            with self._no_sync(last), self._autocast():
                if part is not None:
                    # train.prior_preservation: the base's velocity is the target of the scenes without a new shape.
                    target = None if known is None else self.preserved_targets(
                        x0[part], noise[part], t[part], cond.rows(part), ids, known[part])
                    errors = velocity_errors(velocity, _rows(x0, part), cond.rows(part), _rows(t, part),
                                             _rows(noise, part), None if weights is None else weights[part], target)
                    if row_weights is not None:
                        errors = errors * row_weights[part]
                    loss = errors.mean()
                    objective = loss / tc.grad_accum
                    total += loss.detach() / tc.grad_accum
                else:
                    loss = counterfactual_loss(velocity, *pairs[:-1])
                    objective = loss * (pairs.scale * tc.counterfactual_weight)
                    cf_total += loss.detach() * pairs.scale
            objective.backward()
        max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        grad_norm = D.clip_gradients(self.model, max_norm)
        loss_mean = D.all_reduce_mean(total, world)
        # One host sync per step: the NaN guard needs to know. Both values agree across ranks
        # (gradients are all-reduced, the loss explicitly), so every rank takes the same branch.
        loss_value, norm_value, cf_value = torch.stack([loss_mean, grad_norm.to(loss_mean), cf_total]).tolist()
        # Rank 0's own pairs (not all-reduced: for the log only); None when it had none.
        self.counterfactual_loss = cf_value if pairs is not None and pairs.scale else None
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            lr = learning_rate(self.step, tc.lr, tc.warmup_steps, tc.steps, tc.lr_schedule, tc.lr_min_ratio,
                               tc.lr_decay_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            update_ema(self.ema, self.model, ema_decay_at(self.step, tc.ema_decay))
            self.bad_steps = 0
        else:
            self.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_value, norm_value

    def _autocast(self) -> contextlib.AbstractContextManager:
        """The forward passes' precision: bf16 autocast where train.precision asks for it (autocast_dtype)."""
        return torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None)

    def preserved_targets(self, x0: Tensor, noise: Tensor, t: Tensor, cond: Condition, ids: Tensor,
                          known: Tensor) -> Tensor:
        """(b, N, D) velocity targets: eps - x0, except on the ``known`` (b,) rows, whose target is the velocity of
        the base model (the LoRA adapters off) at the same x_t, t and condition (train.prior_preservation)."""
        target = velocity_target(x0, noise)
        rows = known.nonzero().flatten().to(self.device)
        if len(rows):
            with torch.no_grad(), adapters_off(D.unwrap(self.model)) as base, self._autocast():
                v = base(interpolate(x0[rows], noise[rows], t[rows]), ids, t[rows], cond.rows(rows))
            target[rows] = v.to(target.dtype)
        return target

    def image_batch(self, indices: list[int]) -> tuple[Tensor, Condition, Tensor]:
        """The tokens (b, N, c*pt*p*p), condition and labels of these items of the image or clip data set (or of
        its precomputed cache)."""
        mc = self.config.model
        if self.cache is not None:
            latents, _, labels, cond = self.cache.batch(indices)
            if mc.num_classes:
                cond.labels = labels
            return self._patches(latents), cond.to(self.device), labels
        images, captions, labels = batch_from_indices(self.dataset, indices)
        return self.tokens(images), self.condition(captions, labels), labels

    def tokens(self, images: Tensor) -> Tensor:
        """Images (b, C, H, W) or clips (b, C, T, H, W) of the data set -> the model's tokens (b, N, c*pt*p*p): the
        codec (identity for pixels), then the tubelets."""
        return self._patches(self.codec.encode(images.to(self.device)))

    def _patches(self, latents: Tensor) -> Tensor:
        """Latents (b, c, h, w) or (b, c, T, h, w) -> tokens on the device (an image is a clip of one frame)."""
        mc = self.config.model
        latents = latents[:, :, None] if latents.dim() == 4 else latents
        return video_patchify(latents.to(self.device), mc.patch_size, mc.temporal_patch)

    def source_at(self, step: int) -> tuple:
        """(data set, how many batches it gave before) for ``step``: every data.mix_every-th batch comes from the
        mixed-in data set, the others from the main one, so the data position stays a function of the step."""
        every = self.config.data.mix_every
        if every and (step + 1) % every == 0:
            return self.mix_dataset, step // every
        return self.dataset, step - ((step + 1) // every if every else 0)

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self) -> Path:
        """Gather full state dicts (a collective under FSDP) and let rank 0 write the folder."""
        # Gathered onto rank 0 only (the other ranks get empty dicts).
        model_state, ema_state = D.full_model_state(self.model), D.full_model_state(self.ema)
        optimizer_state = D.full_optimizer_state(self.model, self.optimizer)
        if self.adapter_only:  # the frozen base is train.init_from's: the adapter alone is the run's
            model_state, ema_state = self.adapter_state(model_state), self.adapter_state(ema_state)
        path = self.out_dir / f"{CHECKPOINT_PREFIX}{self.step:07d}"
        extra_tensors, extra_meta = self.extra_state()  # every rank: it may gather (FSDP)
        if self.world.is_main:
            tensors, meta = optimizer_state_to_flat(optimizer_state)
            tensors["rng/generator"] = self.generator.get_state()
            tensors["rng/counterfactual_generator"] = self.counterfactual_generator.get_state()
            tensors["rng/torch"] = torch.get_rng_state()
            if torch.cuda.is_available():
                tensors["rng/cuda"] = torch.cuda.get_rng_state()
            tensors.update(extra_tensors)
            meta.update(extra_meta)
            meta.update(step=self.step, world_size=self.world.world_size)
            if self.init_source:
                meta["init_from"] = self.init_source
            save_checkpoint(path, self.config, model_state, ema_state, tensors, meta)
            if self.config.train.lora_rank:  # the EMA adapter in the PEFT layout, for --lora on the base model
                from omnidit.lora import ADAPTER_FILE, save_lora

                save_lora(D.unwrap(self.ema), path / ADAPTER_FILE)
            prune_checkpoints(self.out_dir, self.config.train.keep_last)
        D.barrier(self.world)
        self.last_checkpoint = path
        return path

    def extra_state(self) -> tuple[dict[str, Tensor], dict]:
        """More (tensors, JSON metadata) for the checkpoint's training state (a distillation's extra models).
        Called on every rank, so it may gather sharded state; rank 0's result is written."""
        return {}, {}

    def load_extra_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Restore what ``extra_state`` saved."""

    def resume(self) -> Path | None:
        """Load the latest checkpoint of ``out_dir`` if there is one (every rank reads it); returns it."""
        checkpoints = list_checkpoints(self.out_dir)
        if not checkpoints:
            return None
        latest = checkpoints[-1]
        tensors, meta = load_training_state(latest)
        model_state, ema_state = (read_safetensors(latest / f) for f in ("model.safetensors", "ema.safetensors"))
        partial = self.adapter_only
        if partial:  # adapter-only checkpoints: every adapter weight must be there
            self.load_adapter_state(D.unwrap(self.model), model_state, latest / "model.safetensors")
            self.load_adapter_state(D.unwrap(self.ema), ema_state, latest / "ema.safetensors")
        D.load_full_state(self.model, model_state, self.optimizer, optimizer_state_from_flat(tensors, meta),
                          strict=not partial)
        D.load_full_state(self.ema, ema_state, strict=not partial)
        self.generator.set_state(tensors["rng/generator"])
        if "rng/counterfactual_generator" in tensors:  # absent in checkpoints from before it existed
            self.counterfactual_generator.set_state(tensors["rng/counterfactual_generator"])
        torch.set_rng_state(tensors["rng/torch"])
        if "rng/cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng/cuda"])
        self.step = int(meta["step"])
        self.load_extra_state(tensors, meta)
        self.init_source = meta.get("init_from")
        self.last_checkpoint = latest
        return latest

    def initialise_from(self, path: str | Path) -> Path:
        """Fine-tuning: load a model folder's EMA weights (raw weights if it has none) into both the
        model and the EMA; the optimizer, schedule and step start fresh. Returns the folder used."""
        directory, state = initial_weights(path, self.config)
        D.load_full_state(self.model, state)
        D.load_full_state(self.ema, state)
        self.init_source = {"folder": str(path), **training_provenance(directory)}
        self.init_source.pop("init_from", None)  # its images_seen already counts the earlier history
        return directory

    # ---- evaluation and samples ----------------------------------------------------------------
    def eval_suite(self) -> str | None:
        suite = self.config.train.eval_suite
        if suite == "auto":
            suite = self.config.data.name if self.config.data.name in ("shapes", "digits") else None
        return suite

    def pipeline(self) -> Pipeline:
        """The EMA model as a sampling pipeline (under FSDP every rank must call it in lockstep)."""
        if self.text_encoder is None and self.config.text.encoder != "none":
            self.text_encoder = load_text_encoder(self.config.text.encoder, self.config.text.max_length,
                                                  device=self.device)
        return Pipeline(self.ema, self.config, self.text_encoder, self.device, self.codec)

    def evaluate(self, log) -> dict | None:
        """Score the EMA model on a small, seeded slice of the suite; rank 0 logs it and saves its grid."""
        from omnidit.evaluate.runner import evaluate_model

        suite = self.eval_suite()
        if suite is None:
            return None
        tc = self.config.train
        report = evaluate_model(self.pipeline(), suite, n_per_prompt=tc.eval_n_per_prompt, limit=tc.eval_limit,
                                progress=False, frechet=False)
        record = {"step": self.step, "eval": {"suite": suite, "overall": report.overall,
                                              "categories": report.categories}}
        relation = report.relation_accuracy()
        if relation is not None:
            record["eval"]["relation_accuracy"] = relation
        if self.world.is_main:
            report.save(grid_path=self.out_dir / "eval" / f"step_{self.step:07d}.png")
            log.write(json.dumps(record) + "\n")
            log.flush()
            tqdm.write(f"step {self.step}: {suite} suite {report.overall:.3f} "
                       + " ".join(f"{k}={v:.2f}" for k, v in report.categories.items()))
        return record

    def sample_prompts(self) -> tuple[list[str], dict]:
        """What save_samples draws: the captions of the first 8 dataset items, and more arguments for generate."""
        return [self.dataset[i]["caption"] for i in range(8)], {}

    def save_samples(self) -> None:
        """A grid of EMA samples for ``sample_prompts``, at a fixed seed."""
        from omnidit.images import make_grid, save_png, to_pil

        prompts, extra = self.sample_prompts()
        images = self.pipeline().generate(prompts, seed=0, **extra)
        if self.world.is_main:
            save_png(make_grid([to_pil(x) for x in images], columns=4),
                     self.out_dir / "samples" / f"step_{self.step:07d}.png", {"prompts": " | ".join(prompts)})

    # ---- the loop ------------------------------------------------------------------------------
    def memory_estimate(self) -> dict[str, int]:
        """flops.estimate_training_memory for this run's micro-batch per rank (bytes per item)."""
        from omnidit.flops import estimate_training_memory

        mc, tc = self.config.model, self.config.train
        text_tokens = self.config.text.max_length if mc.context_dim else 0
        micro = max(1, tc.batch_size // (self.world.world_size * tc.grad_accum))
        memory = estimate_training_memory(mc, micro, self.num_tokens, text_tokens)
        if tc.gradient_checkpointing:  # only block inputs are kept, plus one block's activations in backward
            memory["activations"] //= max(1, mc.depth + mc.depth_single)
        return memory

    def check_memory(self) -> None:
        """Refuse, before the first step, a run whose gradients, optimizer state and activations (the weights are
        already in memory) cannot fit in what the device has free."""
        memory = self.memory_estimate()
        need = memory["grads"] + memory["optimizer"] + memory["activations"]
        tc = self.config.train
        check_memory(need, self.device, f"training with batch {tc.batch_size} of {self.num_tokens} tokens",
                     hint="lower train.batch_size, or keep it with train.grad_accum=N or "
                          "train.gradient_checkpointing=true")

    def describe(self) -> str:
        """Parameters, analytic FLOPs per image (or clip) and estimated memory, printed at start."""
        from omnidit.flops import forward_flops, training_flops

        mc, tc = self.config.model, self.config.train
        n_params = sum(p.numel() for p in self.net.parameters())
        text_tokens = self.config.text.max_length if mc.context_dim else 0
        tokens = self.num_tokens
        forward, train = forward_flops(mc, tokens, text_tokens), training_flops(mc, tokens, text_tokens)
        total_gb = sum(self.memory_estimate().values()) / 2**30
        sample = "clip" if self.config.data.frames > 1 else "image"
        return (f"{n_params / 1e6:.2f}M parameters | {forward / 1e9:.3f} GFLOP forward, "
                f"{train / 1e9:.3f} GFLOP training per {sample} | ~{total_gb:.2f} GiB estimated per rank | "
                f"{self.device}, {self.world.world_size} process(es), "
                f"{'bf16 autocast' if self.amp_dtype else 'fp32'}, batch {tc.batch_size}")

    def run(self) -> Path:
        tc, main = self.config.train, self.world.is_main
        resumed = self.resume() if tc.resume else None
        if resumed is None and self.adapter_only:  # the base weights were loaded with the adapter (__init__)
            if main:
                what = f"LoRA rank {tc.lora_rank}" if tc.lora_rank else f"a layout adapter ({tc.layout_boxes} boxes)"
                tqdm.write(f"{what} on the weights of {tc.init_from} (only the adapter trains)")
        elif resumed is None and tc.init_from:
            source = self.initialise_from(tc.init_from)
            if main:
                step = self.init_source.get("step")  # set by initialise_from
                at = f" at its step {step}" if step is not None else ""
                tqdm.write(f"initialised from the weights in {source}{at}; this run counts its own steps from 0 "
                           "(fresh optimizer and schedule)")
        elif resumed is not None and main:
            tqdm.write(f"resumed from {resumed} at step {self.step}")
            started = (self.init_source or {}).get("folder")
            if tc.init_from and started != tc.init_from:
                tqdm.write(f"note: train.init_from={tc.init_from} is ignored: {self.out_dir} already holds a run "
                           f"that started from {started or 'scratch'}")
        self.check_memory()
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            tqdm.write(f"training -> {self.out_dir} for {tc.steps} steps\n  {self.describe()}")
        log = (self.out_dir / "metrics.jsonl").open("a") if main else None
        board = _tensorboard(self.out_dir) if main and tc.tensorboard else None
        bar = tqdm(total=tc.steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        window_start, window_losses, window_steps = time.perf_counter(), [], 0
        window_side: dict[str, list[float]] = {}  # the counterfactual loss and side_metrics, averaged like the loss
        try:
            while self.step < tc.steps:
                loss, grad_norm = self.train_step()
                if self.bad_steps:
                    self._report_bad_step(loss, grad_norm, log)
                else:
                    window_losses.append(loss)
                    side = dict(self.side_metrics)
                    if self.counterfactual_loss is not None:
                        side["counterfactual_loss"] = self.counterfactual_loss
                    for key, value in side.items():
                        window_side.setdefault(key, []).append(value)
                window_steps += 1
                bar.update(1)
                elapsed = time.perf_counter() - window_start
                images_per_s = window_steps * tc.batch_size / max(elapsed, 1e-9)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.1f}")
                if main and (self.step % tc.log_every == 0 or self.step == tc.steps) and window_losses:
                    record = {"step": self.step, "loss": sum(window_losses) / len(window_losses),
                              "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                              "images_per_s": round(images_per_s, 2), "time": round(time.time(), 1)}
                    record.update({key: sum(values) / len(values) for key, values in window_side.items()})
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    if board is not None:
                        for key in ("loss", "lr", "grad_norm", "images_per_s"):
                            board.add_scalar(f"train/{key}", record[key], self.step)
                    window_start, window_losses, window_steps, window_side = time.perf_counter(), [], 0, {}
                checkpoint_due = self.step % tc.checkpoint_every == 0 or self.step == tc.steps
                if checkpoint_due:  # before the evaluation, so that a failing evaluation loses no training
                    self.save()
                if tc.eval_every and (self.step % tc.eval_every == 0 or self.step == tc.steps):
                    record = self.evaluate(log)
                    if board is not None and record:
                        board.add_scalar("eval/overall", record["eval"]["overall"], self.step)
                if tc.sample_every and (self.step % tc.sample_every == 0 or self.step == tc.steps):
                    self.save_samples()
                if checkpoint_due and main:
                    plot_training_curves(self.out_dir / "metrics.jsonl", self.out_dir / "curves.png")
            # Ranks leave together. Under FSDP on the CPU (gloo), a rank that tore its process group down
            # and exited while rank 0 still drew the curves aborted in C++ about once in eight runs.
            D.barrier(self.world)
        finally:
            bar.close()
            if log is not None:
                log.close()
            if board is not None:
                board.close()
        return self.last_checkpoint or list_checkpoints(self.out_dir)[-1]

    def _report_bad_step(self, loss: float, grad_norm: float, log) -> None:
        tc = self.config.train
        if self.world.is_main:
            tqdm.write(f"step {self.step}: non-finite loss {loss} / gradient norm {grad_norm}; update skipped")
            log.write(json.dumps({"step": self.step, "skipped": True, "loss": str(loss),
                                  "grad_norm": str(grad_norm)}) + "\n")
            log.flush()
        if self.bad_steps >= tc.nan_patience:
            first = self.step - self.bad_steps + 1
            where = self.last_checkpoint or "none (no checkpoint was written yet)"
            raise OmniditError(
                f"training stopped at step {self.step}: the loss or gradients were non-finite for "
                f"{self.bad_steps} steps in a row (steps {first}-{self.step}); the last good checkpoint is {where}",
                hint="resume from it with a lower train.lr, a longer train.warmup_steps or train.precision=fp32")


def _rows(x: Tensor | dict[str, Tensor], rows: slice) -> Tensor | dict[str, Tensor]:
    """Rows of a batch tensor, or of each stream of a mapping."""
    return {n: v[rows] for n, v in x.items()} if isinstance(x, dict) else x[rows]


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def train(config: Config, progress: bool = True, runner: type[Trainer] = Trainer) -> Path:
    """Train as the config says and return the final checkpoint folder (``runner``: a Trainer subclass such as
    omnidit.distill_train.Distiller); a layout adapter run (train.layout_boxes) takes omnidit.layout_train's."""
    if runner is Trainer and config.train.layout_boxes:
        from omnidit.layout_train import LayoutTrainer

        runner = LayoutTrainer
    trainer = runner(config, progress=progress)
    try:
        return trainer.run()
    finally:
        D.shutdown(trainer.world)
