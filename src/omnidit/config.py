"""Typed configuration: nested dataclasses, JSON files, presets and dotted overrides.

A config file is JSON with the sections below; ``model`` may name a ``preset`` whose values the
other model keys override. Unknown keys anywhere are an error that names the closest valid key
(no silent typos), and values are checked against the field's type.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnidit.data.shapes import (
    SHAPES,
    check_counterfactual_facts,
    check_new_shape_weight,
    check_new_shapes,
    check_scene_kinds,
    drawn_pairs,
    parse_held_out,
    parse_pair_weights,
)
from omnidit.data.shapes_video import PARTNER_DIRECTIONS
from omnidit.errors import OmniditError
from omnidit.model.mmdit import PRESETS, MMDiTConfig
from omnidit.sampling import SAMPLERS, check_cfg_interval, check_skip_blocks

DEFAULT_HELD_OUT = ["red triangle", "blue circle", "green square", "yellow diamond"]


@dataclass
class DataConfig:
    name: str = "shapes"  # shapes | shapes_video | bounce (clips with sound) | tones (sound) | digits | imagefolder
    width: int = 32
    height: int = 32
    frames: int = 1  # frames per clip (video data); 1 = still images
    fps: float = 8.0  # frames per second of the clips: their time axis in seconds
    path: str = ""  # imagefolder root
    seed: int = 0
    held_out: list[str] = field(default_factory=lambda: list(DEFAULT_HELD_OUT))  # "colour shape" never rendered
    codec: str = "identity"  # identity (pixels) or a local diffusers AutoencoderKL folder (latents)
    codec_dtype: str = "fp32"  # fp32 | bf16 | fp16: the precision the VAE runs in
    cache_dir: str = ""  # train from latents + text embeddings precomputed here ('omnidit precompute')
    cache_samples: int = 0  # samples to precompute (0 = the whole dataset; required for infinite data)
    # shapes only: relative weights of the scene kinds, e.g. {"single": 1, "relation": 3}; kinds left
    # out are never drawn; {} = the default mix (SCENE_KINDS in omnidit.data.shapes)
    scene_kinds: dict[str, float] = field(default_factory=dict)
    # shapes only: the facts a counterfactual partner changes (train.counterfactual_weight), drawn from
    # "relation" (reversed), "colours" (the two objects swap colours), "count" (one object fewer)
    counterfactuals: list[str] = field(default_factory=lambda: ["relation"])
    # shapes_video only: the directions a clip's counterfactual partner may move in: "any" other one,
    # "vertical" (only the up-down part changes: up against down, right against up and to the right),
    # "horizontal" (only the left-right part) or "either" (one of the two parts, never both)
    counterfactual_directions: str = "any"
    sample_rate: int = 8000  # audio samples per second (bounce, tones)
    seconds: float = 2.0  # length of sound-only clips (tones); clips with video last frames / fps
    audio_codec: str = "waveform"  # how sound becomes latents: waveform (samples) | spectrogram (log magnitude)
    audio_scale: float = 1.0  # waveform: the model sees the samples times this (codecs.WaveformCodec)
    audio_hop: int = 200  # spectrogram: samples between its columns (codecs.SpectrogramCodec)
    # Every mix_every-th training batch comes from the data set mix_name instead (0 = never), at the same size,
    # rate and seed: e.g. tones mixed into bounce, so that one model also makes sound from a caption alone.
    mix_name: str = ""
    mix_every: int = 0
    # shapes only: shapes no shipped model has seen (omnidit.data.shapes.NEW_SHAPES, e.g. ["cross"]), drawn in every
    # colour besides the usual four: data to teach a model a new shape (a LoRA, docs/lora.md)
    new_shapes: list[str] = field(default_factory=list)
    # a new shape's (colour, shape) pair has this many times a known pair's weight when objects are drawn (1: uniformly;
    # with the cross and the default held-out pairs about one object in five a cross)
    new_shape_weight: float = 1.0
    # shapes only: named colour-shape pairs drawn this many times more often still, e.g. {"pink cross": 3}
    pair_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_ranges("data", self, positive=("width", "height", "frames", "fps", "sample_rate", "seconds",
                                                "audio_scale", "audio_hop"),
                      non_negative=("cache_samples", "mix_every"),
                      choices={"codec_dtype": ("fp32", "bf16", "fp16"), "audio_codec": ("waveform", "spectrogram"),
                               "counterfactual_directions": PARTNER_DIRECTIONS})
        if bool(self.mix_name) != bool(self.mix_every) or self.mix_every == 1:
            raise OmniditError(f"data.mix_name={self.mix_name!r} and data.mix_every={self.mix_every} go together: "
                               "a second data set for every N-th batch, N >= 2",
                               hint="e.g. data.mix_name=tones data.mix_every=4, or neither")
        if self.scene_kinds:
            self._shapes_only("scene_kinds")
            check_scene_kinds(self.scene_kinds, "config key 'data.scene_kinds'")
        check_counterfactual_facts(self.counterfactuals, "config key 'data.counterfactuals'")
        check_new_shapes(self.new_shapes, "config key 'data.new_shapes'")
        if self.new_shapes:
            self._shapes_only("new_shapes")
        self.new_shape_weight = check_new_shape_weight(self.new_shape_weight, bool(self.new_shapes),
                                                       "config key 'data.new_shape_weight'")
        if self.pair_weights:
            self._shapes_only("pair_weights")
            factors = parse_pair_weights(self.pair_weights, drawn_pairs(parse_held_out(self.held_out), self.new_shapes),
                                         "config key 'data.pair_weights'")
            # One spelling per pair, factors of 1 dropped: configs that draw the same data share a cache key.
            self.pair_weights = {" ".join(pair): f for pair, f in sorted(factors.items()) if f != 1}
        if self.counterfactual_directions != "any" and self.name != "shapes_video":
            raise OmniditError(f"config key 'data.counterfactual_directions' applies to the shapes_video data set, "
                               f"not {self.name!r}", hint="drop data.counterfactual_directions")
        if list(self.counterfactuals) != ["relation"]:
            self._shapes_only("counterfactuals")

    def _shapes_only(self, key: str) -> None:
        """A one-line error when the shapes-only key ``data.KEY`` is set for another data set."""
        if self.name != "shapes":
            raise OmniditError(f"config key 'data.{key}' applies to the shapes data set, not {self.name!r}",
                               hint=f"drop data.{key}")


def _check_ranges(section: str, obj: Any, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                  choices: dict[str, tuple[str, ...]] | None = None) -> None:
    for name in positive:
        if not getattr(obj, name) > 0:
            raise OmniditError(f"config key '{section}.{name}' must be positive, got {getattr(obj, name)!r}")
    for name in non_negative:
        if not getattr(obj, name) >= 0:
            raise OmniditError(f"config key '{section}.{name}' must be >= 0, got {getattr(obj, name)!r}")
    for name, allowed in (choices or {}).items():
        if getattr(obj, name) not in allowed:
            raise OmniditError(f"config key '{section}.{name}' must be one of {', '.join(allowed)}, "
                               f"got {getattr(obj, name)!r}")


@dataclass
class TextConfig:
    encoder: str = "minilm"  # "minilm" (packaged), a local Hugging Face encoder folder, or "none"
    max_length: int = 32

    def __post_init__(self) -> None:
        _check_ranges("text", self, positive=("max_length",))


@dataclass
class TrainConfig:
    out_dir: str = "runs/shapes"
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cond_dropout: float = 0.1  # probability of training a row unconditionally (for CFG)
    timesteps: str = "logit_normal"  # uniform | logit_normal
    t_mean: float = 0.0
    t_std: float = 1.0
    t_shift: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    log_every: int = 25
    checkpoint_every: int = 500
    keep_last: int = 2
    resume: bool = True  # continue from out_dir's latest checkpoint when there is one
    init_from: str = ""  # fine-tune: start from this model folder's (EMA) weights, fresh optimizer, step 0
    init_grow: bool = False  # with init_from: the source may have fewer blocks; new ones start as identities
    # LoRA fine-tuning of train.init_from's model: adapters of this rank train, every other weight stays frozen, and
    # checkpoints hold the adapters alone (plus adapter.safetensors for --lora). 0 = train every weight.
    lora_rank: int = 0
    lora_alpha: float = 0.0  # the adapters' alpha (scale alpha / rank); 0 = the rank
    lora_targets: str = ""  # regular expression over module paths; "" = the attention and MLP projections
    # A layout adapter (omnidit.layout) on train.init_from's model, taking up to this many boxes; every base weight
    # stays frozen and checkpoints hold the adapter alone. Shapes data (its scenes give the boxes). 0 = none.
    layout_boxes: int = 0
    lr_schedule: str = "constant"  # constant | cosine | wsd (after the warmup, down to lr * lr_min_ratio)
    lr_min_ratio: float = 0.1
    lr_decay_steps: int = 0  # wsd only: length of the final linear decay (0 = 20% of steps)
    grad_accum: int = 1  # micro-batches per optimizer step; batch_size is the global batch
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | fp32 | bf16
    compile: bool = False  # torch.compile each transformer block (regional compilation)
    gradient_checkpointing: bool = False  # recompute block activations in backward to save memory
    parallel: str = "ddp"  # under torchrun: ddp | fsdp (FSDP2 fully_shard per block)
    nan_patience: int = 3  # stop after this many non-finite steps in a row (each one is skipped)
    sample_every: int = 0  # save a grid of EMA samples every N steps (0 = never)
    tensorboard: bool = True  # also log to OUT_DIR/tensorboard when tensorboard is installed
    eval_every: int = 0  # run a small evaluation of the EMA model every N steps (0 = never)
    eval_suite: str = "auto"  # auto (data.name's; layout for layout adapter runs) | shapes | digits | video | layout
    eval_limit: int = 2  # prompts per category in the in-training evaluation
    eval_n_per_prompt: int = 2
    # Counterfactual pairs (docs/training.md): add this weight times flow.counterfactual_loss on the
    # batch items whose data set has a counterfactual partner (shapes: relation scenes, the objects traded;
    # shapes_video: single-object clips moving another way; tones: one beep dropped or changed), at
    # t ~ U[counterfactual_t_min, 1]. 0 = off.
    counterfactual_weight: float = 0.0
    counterfactual_t_min: float = 0.8
    # Shapes images or shapes_video clips in pixels: the flow loss weighs the pixels that an object covers, and those
    # next to them (in the same frame), this many times a background pixel (each sample's mean becomes a weighted
    # mean), so that a small object's shape counts for more than its share of the pixels (kohya's masked loss, with
    # the data's own masks); the counterfactual pairs' loss keeps its plain mean. 1 = off.
    object_loss_weight: float = 1.0
    object_loss_shapes: list[str] = field(default_factory=list)  # the shapes whose objects it weighs; [] = every one
    # LoRA on shapes data with data.new_shapes: the scenes that show no new shape regress on the base model's velocity
    # (the adapters off, one more forward pass without gradients over those rows) instead of the data's, so that
    # what the base already drew stays as it was while the new shape is learnt (DreamBooth's prior preservation,
    # with the base's own prediction in place of images it drew); not the counterfactual pairs' loss. False = off.
    prior_preservation: bool = False
    # With prior_preservation: the weight of those scenes' errors against the base in the batch's loss where their
    # caption was kept (each sample's mean error times it, the batch's mean as before), so that the conditional
    # velocity's drift from the base on known scenes costs more than the new shape's rows gain; rows whose caption
    # was dropped take train.prior_weight_dropped instead (default 1, so that the unconditional velocity, which
    # guidance subtracts, may learn the new shape too). 1 = as the other rows.
    prior_weight: float = 1.0
    # With prior_preservation: the same for those scenes' rows whose caption was dropped (the unconditional velocity's
    # drift from the base); 1 = as the other rows.
    prior_weight_dropped: float = 1.0
    # Clips only: the probability that a training clip has some frames given as clean context (t = 0 on their
    # tokens, no loss there): the first frame, the first k or the first and last (flow.draw_given_tubelets). It
    # teaches image-to-video, extension and interpolation to the same model. 0 = off.
    given_p: float = 0.0
    # Images and clips: the probability that a sample is given as clean context except a random rectangle of
    # tokens (over all frames) to generate, or, one time in four, the rectangle alone (flow.draw_given_regions):
    # mask-aware training for omnidit inpaint (--mode tokens, the default for such a model). 0 = off.
    region_p: float = 0.0
    # Of those samples, the fraction whose rectangle is one object's box (shapes data), grown by half a token and
    # always generated with the rest given: an object inpainted as `omnidit inpaint` masks it. 0 = off.
    region_objects: float = 0.0
    # Of the samples whose region is an object's box (and stays there, train.region_empty), the fraction captioned
    # with that object alone ("a red circle"): the prompt then names what to draw in the mask, `omnidit inpaint
    # scene.png MASK "a red circle"`, and the scene outside the mask is the given context. 0 = every caption is the
    # scene's.
    region_caption: float = 0.0
    # Of the samples whose region is an object's box, the fraction whose box tries to move to an empty place (a
    # crowded scene has none): a hole the size of an object with nothing in it, under the scene's caption, which
    # names only objects outside it; the model learns to fill it with background, as the hole that `omnidit inpaint
    # --move` leaves. 0 = off.
    region_empty: float = 0.0
    # Several generated streams (video and audio): the probability that a sample's streams get independent times
    # (UniDiffuser; otherwise they share one), and, drawn after it, that one whole stream, chosen at random, is
    # given as clean context (video -> audio, audio -> video). 0 = off.
    stream_given_p: float = 0.0
    stream_independent_p: float = 0.0

    def __post_init__(self) -> None:
        for key in ("stream_given_p", "stream_independent_p"):
            if not 0 <= getattr(self, key) <= 1:
                raise OmniditError(f"train.{key} must lie in [0, 1], got {getattr(self, key)}",
                                   hint=f"e.g. train.{key}=0.3")
        _check_ranges("train", self, positive=("steps", "batch_size", "log_every", "checkpoint_every", "lr"),
                      non_negative=("warmup_steps", "weight_decay", "grad_clip", "keep_last", "t_std", "eval_every"),
                      choices={"timesteps": ("uniform", "logit_normal"),
                               "eval_suite": ("auto", "shapes", "digits", "video", "layout")})
        _check_ranges("train", self, positive=("eval_limit", "eval_n_per_prompt", "grad_accum", "nan_patience"),
                      non_negative=("sample_every", "lr_min_ratio", "lr_decay_steps"),
                      choices={"lr_schedule": ("constant", "cosine", "wsd"), "precision": ("auto", "fp32", "bf16"),
                               "parallel": ("ddp", "fsdp")})
        if self.lr_decay_steps and self.lr_schedule != "wsd":
            raise OmniditError(f"train.lr_decay_steps={self.lr_decay_steps} only applies to train.lr_schedule=wsd, "
                               f"not {self.lr_schedule}", hint="add train.lr_schedule=wsd or drop train.lr_decay_steps")
        if self.lr_schedule == "wsd" and self.lr_decay_steps > self.steps - self.warmup_steps:
            raise OmniditError(f"train.lr_decay_steps={self.lr_decay_steps} is longer than the {self.steps} steps "
                               f"after {self.warmup_steps} warmup steps",
                               hint="use a shorter train.lr_decay_steps (0 = the last 20% of train.steps)")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0 \
                or not self.lora_alpha >= 0:
            raise OmniditError(f"train.lora_rank must be a whole number >= 0 and train.lora_alpha >= 0, got "
                               f"{self.lora_rank!r} and {self.lora_alpha!r}", hint="e.g. train.lora_rank=8")
        if self.lora_rank and not self.init_from:
            raise OmniditError("train.lora_rank trains adapters on an existing model, and train.init_from is empty",
                               hint="set train.init_from to the model to adapt, e.g. train.init_from=shapes")
        if self.lora_rank and (self.init_grow or self.parallel == "fsdp"):
            raise OmniditError("train.lora_rank works with DDP or one process, without train.init_grow",
                               hint="drop train.init_grow and use train.parallel=ddp")
        if isinstance(self.layout_boxes, bool) or not isinstance(self.layout_boxes, int) or self.layout_boxes < 0:
            raise OmniditError(f"train.layout_boxes must be a whole number >= 0, got {self.layout_boxes!r}",
                               hint="e.g. train.layout_boxes=8")
        if self.layout_boxes and (not self.init_from or self.lora_rank or self.init_grow or self.parallel == "fsdp"):
            raise OmniditError("train.layout_boxes trains a layout adapter on the model of train.init_from, alone, "
                               "with DDP or one process",
                               hint="set train.init_from (e.g. shapes) and drop train.lora_rank, init_grow and fsdp")
        if self.lora_targets and not self.lora_rank:
            raise OmniditError("train.lora_targets is set but train.lora_rank is 0", hint="e.g. train.lora_rank=8")
        if not self.object_loss_weight > 0:
            raise OmniditError(f"train.object_loss_weight must be > 0, got {self.object_loss_weight}",
                               hint="1 weighs objects as the background; e.g. train.object_loss_weight=4")
        for key in ("prior_weight", "prior_weight_dropped"):
            value = getattr(self, key)
            if not value > 0:
                raise OmniditError(f"train.{key} must be > 0, got {value}",
                                   hint=f"1 weighs the known scenes as the others; e.g. train.{key}=10")
            if value != 1 and not self.prior_preservation:
                raise OmniditError(f"train.{key} weighs prior preservation's scenes, but train.prior_preservation "
                                   "is off", hint=f"add train.prior_preservation=true, or drop train.{key}")
        if not self.counterfactual_weight >= 0:
            raise OmniditError(f"train.counterfactual_weight must be >= 0, got {self.counterfactual_weight}",
                               hint="0 turns the counterfactual pairs off; e.g. train.counterfactual_weight=2")
        for key, example in (("given_p", "three clips in ten get some frames given"),
                             ("region_p", "three samples in ten get all but a region given"),
                             ("region_objects", "half the regions are an object's box"),
                             ("region_caption", "half the objects' regions are captioned with the object alone"),
                             ("region_empty", "three in ten objects' regions try to move to an empty place")):
            if not 0 <= getattr(self, key) <= 1:
                raise OmniditError(f"train.{key} must lie in [0, 1], got {getattr(self, key)}",
                                   hint=f"e.g. train.{key}=0.3: {example}")
        if not 0 <= self.counterfactual_t_min < 1:
            raise OmniditError(f"train.counterfactual_t_min must lie in [0, 1), got {self.counterfactual_t_min}",
                               hint="the loss is meant for high noise: e.g. train.counterfactual_t_min=0.8")
        if not 0 <= self.ema_decay < 1 or not 0 <= self.cond_dropout < 1 or not self.t_shift > 0:
            raise OmniditError("config keys train.ema_decay and train.cond_dropout must lie in [0, 1) and "
                               "train.t_shift must be positive")


@dataclass
class SampleConfig:
    steps: int = 30
    cfg: float = 4.0
    sampler: str = "euler"  # euler | heun | midpoint
    shift: float = 1.0
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # guide only at times LO <= t <= HI
    skip_scale: float = 0.0  # skip-layer guidance: push away from the model without skip_blocks (0 = off)
    skip_blocks: list[int] = field(default_factory=list)  # the single-stream blocks that weaker model leaves out
    skip_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # skip guidance only at LO <= t <= HI
    candidates: int = 1  # best-of-N: sample N seeds per image, keep the one with the lowest denoising error
    cache: str = "none"  # step caching (omnidit.step_cache): none | first_block | teacache | magcache | interval
    cache_threshold: float = 0.0  # its skip threshold (0 = the method's default)
    cache_forecast: str = "copy"  # a skipped step reuses the last residual (copy) or extrapolates it (taylor)
    cache_interval: int = 2  # cache 'interval': compute every N-th step
    # A LoRA run's guidance takes its unconditional velocity from the base (train.init_from's weights, the adapter
    # off) instead of the adapted model, so that on prompts the adapter did not learn only the conditional change
    # is left; two calls of B rows per step instead of one of 2B, and the base's weights in memory beside the run's.
    # Sampling only: evaluations during training guide with the run's own model.
    uncond_base: bool = False

    def __post_init__(self) -> None:
        from omnidit.step_cache import FORECASTS, METHODS

        _check_ranges("sample", self, positive=("steps", "shift", "candidates", "cache_interval"),
                      non_negative=("skip_scale", "cache_threshold"),
                      choices={"sampler": tuple(SAMPLERS), "cache": METHODS, "cache_forecast": FORECASTS})
        for key in ("cfg_interval", "skip_interval"):
            try:
                setattr(self, key, list(check_cfg_interval(getattr(self, key))))
            except OmniditError as e:
                raise OmniditError(f"config key 'sample.{key}': {e.message}", hint=e.hint) from None


DISTILL_METHODS = ("guidance", "progressive", "dmd", "regression")


@dataclass
class DistillConfig:
    """omnidit distill (omnidit.distill_train): the student trains as the train section says, from the teacher's
    weights, toward the teacher (omnidit.distill holds each method's loss). method "" = an ordinary training run."""

    method: str = ""  # "" (not a distillation) | guidance | progressive | dmd | regression
    teacher: str = ""  # the teacher's model folder, run folder or shipped name
    # Guidance scales drawn per sample, uniform in [LO, HI]; the student takes the scale as an input
    # (model.guidance_embed). [] = [1, 1.5 x the teacher's cfg] for guidance, [cfg, cfg] for the few-step methods.
    guidance: list[float] = field(default_factory=list)
    student_steps: int = 4  # the steps the student samples with (progressive, dmd); guidance keeps the teacher's
    teacher_steps: int = 32  # progressive: the first teacher's steps; each stage halves them down to student_steps
    fake_lr_ratio: float = 1.0  # dmd: the fake-score model's learning rate / train.lr
    generator_every: int = 5  # dmd: the student steps every N-th step, the fake denoiser every step (DMD2's TTUR)
    dmd_t_range: list[float] = field(default_factory=lambda: [0.02, 0.98])  # dmd: where scores are compared
    # regression: how many (noise, teacher sample) pairs to draw once with the teacher's own sampler (OUT/pairs)
    pairs: int = 8192
    # dmd: DMD's regression term (Yin et al. 2024, eq. 9, lambda_reg): this weight times the regression loss on
    # distill.pairs teacher pairs (drawn into OUT/pairs as for regression) joins the generator's loss; 0 = off
    regression_weight: float = 0.0
    # dmd: DMD2's GAN term (Yin et al. 2024b, §4.3): a classifier on the fake denoiser's last hidden states tells
    # noised real data from the student's noised samples; gan_weight scales the generator's (non-saturating) loss,
    # 0 = off (DMD2 used 3e-3 on ImageNet); gan_classifier_weight scales the classifier's loss, which joins the fake
    # denoiser's (DMD2's 1e-2)
    gan_weight: float = 0.0
    gan_classifier_weight: float = 0.01
    # dmd's GAN term: the classifier's learning rate over the fake denoiser's (DMD2 shares one; a short run on a
    # CPU may need the classifier to learn faster than the denoiser it sits on)
    gan_lr_ratio: float = 1.0
    # The skip-layer guidance scale of the teacher's guided velocity (with its sample.skip_blocks and skip_interval):
    # < 0 = the teacher's own sample.skip_scale, 0 = none, so that a student distilled before a teacher's sampling
    # settings changed can be distilled again from the same teacher
    teacher_skip_scale: float = -1.0

    def __post_init__(self) -> None:
        if self.method not in ("", *DISTILL_METHODS):
            raise OmniditError(f"unknown distillation method '{self.method}'",
                               hint=f"choose one of {', '.join(DISTILL_METHODS)}")
        _check_ranges("distill", self, positive=("student_steps", "teacher_steps", "fake_lr_ratio", "generator_every",
                                                 "pairs", "gan_lr_ratio"),
                      non_negative=("regression_weight", "gan_weight", "gan_classifier_weight"))
        if not math.isfinite(self.teacher_skip_scale):
            raise OmniditError(f"distill.teacher_skip_scale must be a finite number, got {self.teacher_skip_scale}",
                               hint="e.g. 0 for no skip-layer guidance in the teacher; drop it for the teacher's own")
        for key, what in (("regression_weight", "DMD's regression term"), ("gan_weight", "DMD2's GAN term")):
            if getattr(self, key) and self.method != "dmd":
                raise OmniditError(f"distill.{key} is {what}, not a setting of '{self.method or 'training'}'",
                                   hint="use it with --method dmd, or drop it")
        if self.gan_weight and not self.gan_classifier_weight:
            raise OmniditError("distill.gan_weight needs a classifier that learns: distill.gan_classifier_weight is 0",
                               hint="give distill.gan_classifier_weight > 0 (default 0.01)")
        if self.guidance and (len(self.guidance) != 2 or not 0 <= self.guidance[0] <= self.guidance[1]):
            raise OmniditError(f"distill.guidance must be [LO, HI] with 0 <= LO <= HI, got {self.guidance}",
                               hint="e.g. distill.guidance=[1,6], or [4,4] for one scale")
        if len(self.dmd_t_range) != 2 or not 0 < self.dmd_t_range[0] < self.dmd_t_range[1] < 1:
            raise OmniditError(f"distill.dmd_t_range must be [LO, HI] with 0 < LO < HI < 1, got {self.dmd_t_range}",
                               hint="e.g. distill.dmd_t_range=[0.02,0.98]")
        if self.method == "progressive":
            ratio = self.teacher_steps / self.student_steps
            if ratio < 2 or ratio != 2 ** round(math.log2(ratio)):
                raise OmniditError(f"progressive distillation halves the steps: distill.teacher_steps "
                                   f"({self.teacher_steps}) must be student_steps ({self.student_steps}) times a power "
                                   "of two >= 2", hint="e.g. distill.teacher_steps=32 distill.student_steps=4")


@dataclass
class Config:
    model: MMDiTConfig = field(default_factory=MMDiTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:  # checks across sections
        if self.train.region_objects and (not self.train.region_p or self.data.name != "shapes"):
            raise OmniditError("train.region_objects picks objects' boxes among train.region_p's regions, on shapes "
                               "data", hint="set train.region_p (e.g. 0.5) on data.name=shapes, or drop "
                                            "train.region_objects")
        dc = self.data
        if self.train.object_loss_weight != 1 and (dc.name not in ("shapes", "shapes_video") or dc.codec != "identity"
                                                   or dc.cache_dir or dc.mix_name):
            raise OmniditError("train.object_loss_weight weighs the pixels of shapes' objects: it needs data.name="
                               "shapes or shapes_video in pixels (data.codec=identity, no data.cache_dir or "
                               "data.mix_name)", hint="drop train.object_loss_weight, or train on shapes images or "
                                                      "clips in pixels")
        if self.train.prior_preservation and (not self.train.lora_rank or dc.name != "shapes" or not dc.new_shapes
                                              or dc.mix_name):
            raise OmniditError("train.prior_preservation keeps a LoRA's base on the shapes scenes without a new shape: "
                               "it needs train.lora_rank, data.name=shapes with data.new_shapes, no data.mix_name",
                               hint='e.g. train.lora_rank=16 data.new_shapes=["cross"], or drop '
                                    'train.prior_preservation')
        drawn = (*SHAPES, *dc.new_shapes)
        unknown = [n for n in self.train.object_loss_shapes if n not in drawn]
        if unknown:
            raise OmniditError(f"train.object_loss_shapes names {unknown[0]!r}, which the data never draws",
                               hint=f"choose from {', '.join(drawn)} (a new shape needs data.new_shapes)")
        if self.train.object_loss_shapes and self.train.object_loss_weight == 1:
            raise OmniditError("train.object_loss_shapes is set but train.object_loss_weight is 1 (off)",
                               hint="e.g. train.object_loss_weight=4")
        for key in ("region_caption", "region_empty"):
            if getattr(self.train, key) and not self.train.region_objects:
                raise OmniditError(f"train.{key} works on the regions that are an object's box, and "
                                   "train.region_objects is 0", hint=f"set train.region_objects (e.g. 0.5) or drop "
                                                                     f"train.{key}")
        if self.train.region_caption and (self.text.encoder == "none" or self.train.layout_boxes):
            raise OmniditError("train.region_caption swaps captions, which needs a text encoder and no layout boxes "
                               f"(text.encoder={self.text.encoder}, train.layout_boxes={self.train.layout_boxes})",
                               hint="drop train.region_caption, or use a text encoder without train.layout_boxes")
        if self.sample.uncond_base and not self.train.lora_rank:
            raise OmniditError("sample.uncond_base takes guidance's unconditional velocity from a LoRA run's base, "
                               "and this is not a LoRA run (train.lora_rank is 0)",
                               hint="drop sample.uncond_base, or set it on a run trained with train.lora_rank")
        try:  # the sample section's skip blocks must exist in the model section
            self.sample.skip_blocks = check_skip_blocks(self.sample.skip_scale, self.sample.skip_blocks,
                                                        self.model.depth_single)
        except OmniditError as e:
            n = self.model.depth_single
            example = f"e.g. sample.skip_blocks=[{n - 1}], " if n else ""
            raise OmniditError(f"config key 'sample.skip_blocks': {e.message}",
                               hint=f"name blocks below model.depth_single={n} ({example}check the model section), "
                                    "or set sample.skip_scale=0") from None

    def to_dict(self) -> dict:
        return {s.name: _section_dict(getattr(self, s.name)) for s in dataclasses.fields(self)}


SECTIONS: dict[str, type] = {f.name: f.default_factory().__class__ for f in dataclasses.fields(Config)}


def _section_dict(obj: Any) -> dict:
    return obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. 'train.lr' (plus 'model.preset')."""
    keys = ["model.preset"]
    for name, cls in SECTIONS.items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _unknown_key(key: str) -> OmniditError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else "run 'omnidit train --help' for the list of keys"
    return OmniditError(f"unknown config key '{key}'", hint=hint)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation, converting the harmless cases (int -> float...)."""
    origin = typing.get_origin(annotation)
    bad = OmniditError(f"config key '{key}' expects {getattr(annotation, '__name__', annotation)}, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # JSON's NaN and Infinity parse; no setting means them
                raise OmniditError(f"config key '{key}' must be a finite number, got {value!r}")
            return float(value)
        raise bad
    if annotation is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin in (list, tuple):
        item = typing.get_args(annotation)[0]
        if isinstance(value, str):  # "a,b" on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
            if item is not str:
                value = [_json_or_text(v) for v in value]
        if not isinstance(value, (list, tuple)):
            raise bad
        items = [_coerce(key, v, item) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise OmniditError(f"config key '{key}' expects a JSON object, got {value!r}",
                               hint=f"""e.g. {key}='{{"name": 1.0}}'""")
        return {_coerce(key, k, key_type): _coerce(key, v, value_type) for k, v in value.items()}
    return value


def _build_section(name: str, values: dict) -> Any:
    cls = SECTIONS[name]
    values = dict(values)
    base: dict = {}
    if name == "model" and "preset" in values:
        preset = values.pop("preset")
        if preset not in PRESETS:
            raise OmniditError(f"unknown model preset '{preset}'", hint=f"choose one of {', '.join(PRESETS)}")
        base = PRESETS[preset].to_dict()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(f"{name}.{key}")
        base[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**base)


def config_from_dict(d: dict) -> Config:
    """Build a validated Config from nested dicts (a JSON file's content)."""
    if not isinstance(d, dict):
        raise OmniditError("a config must be a JSON object with sections " + ", ".join(SECTIONS))
    for name, values in d.items():
        if name not in SECTIONS:
            raise _unknown_key(name)
        if not isinstance(values, dict):
            raise OmniditError(f"config section '{name}' must be an object, got {values!r}")
    return Config(**{name: _build_section(name, d.get(name, {})) for name in SECTIONS})


def _json_or_text(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=1e-4' -> ('train.lr', 0.0001); values are JSON when they parse, else strings."""
    if "=" not in text:
        raise OmniditError(f"override '{text}' is not of the form section.key=value", hint="e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key.count(".") != 1:
        raise _unknown_key(key)
    return key, _json_or_text(raw)


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Return a copy of the nested dict ``d`` with dotted overrides applied (not yet validated)."""
    d = json.loads(json.dumps(d))
    for text in overrides:
        key, value = parse_override(text)
        section, name = key.split(".")
        if section not in SECTIONS:
            raise _unknown_key(key)
        if not isinstance(d.setdefault(section, {}), dict):
            raise OmniditError(f"the config's '{section}' section is {json.dumps(d[section])[:40]}, not a JSON object",
                               hint=f'write it as "{section}": {{...}} (or leave it out for the defaults)')
        d[section][name] = value
    return d


def read_json(path: str | Path, what: str = "config") -> dict:
    """Read a JSON file with one-line errors for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise OmniditError(f"{what} file not found: {path}",
                           hint="paths are relative to the current folder; the example configs are in the "
                                "repository's configs/ folder" if what == "config" else None)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OmniditError(f"{what} file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):  # every JSON file omnidit reads is an object of named fields
        raise OmniditError(f"{what} file {path} must hold a JSON object ({{...}}), not {type(data).__name__}",
                           hint="a config is a JSON object with sections " + ", ".join(SECTIONS)
                           if what == "config" else None)
    return data


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a JSON config file and apply ``section.key=value`` overrides."""
    return config_from_dict(apply_overrides(read_json(path), list(overrides)))
