"""From prompts (or class labels) to images: text encoding, guidance, sampling, unpatchify.

``Pipeline`` bundles a model with its config and text encoder so that the CLI, the trainer's
sample grids and the evaluators share one path from prompt to pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from omnidit.condition import Condition
from omnidit.config import Config
from omnidit.errors import OmniditError
from omnidit.model.mmdit import MMDiT
from omnidit.sampling import (
    SAMPLERS,
    check_cfg_interval,
    check_skip_blocks,
    classifier_free_guidance,
    initial_noise,
    sample,
)
from omnidit.selection import best_candidates, candidate_seeds, denoising_scores
from omnidit.tokens import check_image_size, image_position_ids, patchify, unpatchify

# The sampling arguments of Pipeline.generate and sampling_settings (None = the config's sample section).
SAMPLING_KEYS = ("steps", "cfg", "sampler", "shift", "cfg_interval", "skip_scale", "skip_blocks", "skip_interval",
                 "candidates")

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU; anything else must be available or it is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise OmniditError(f"unknown device '{name}'", hint="use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OmniditError("device 'cuda' requested but CUDA is not available", hint="use --device cpu")
    return device


def labels_from_prompts(prompts: list[str], num_classes: int) -> Tensor:
    """Class ids from prompts: '7', 'seven' or 'the digit seven' (digit words map to 0-9)."""
    labels = []
    for prompt in prompts:
        words = prompt.lower().replace(",", " ").split()
        found = [int(w) for w in words if w.isdigit()] + [DIGIT_WORDS.index(w) for w in words if w in DIGIT_WORDS]
        if len(found) != 1 or not 0 <= found[0] < num_classes:
            raise OmniditError(f"cannot read a class label in 0..{num_classes - 1} from the prompt '{prompt}'",
                               hint="this model is class-conditional: pass e.g. '7' or 'the digit seven'")
        labels.append(found[0])
    return torch.tensor(labels, dtype=torch.long)


@dataclass
class Pipeline:
    model: MMDiT
    config: Config
    text_encoder: object | None = None  # omnidit.text.TextEncoder when the model reads text
    device: torch.device = torch.device("cpu")
    codec: object | None = None  # omnidit.codecs.LatentCodec; None means pixels (identity)

    @property
    def channels(self) -> int:
        """Channels of the images the pipeline returns."""
        return self.config.model.in_channels if self.codec is None or self.codec.downsample == 1 else 3

    def conditions(self, prompts: list[str]) -> tuple[Condition, Condition]:
        """(cond, null_cond) for a batch of prompts; null_cond has batch 1."""
        for p in prompts:
            if not isinstance(p, str) or (self.text_encoder is not None and not p.strip()):
                raise OmniditError("the prompt is empty", hint='pass a description, e.g. "a red circle"')
        mc = self.model.config
        cond, null = Condition(), Condition()
        if self.text_encoder is not None:
            cond, null = self.text_encoder.encode(prompts), self.text_encoder.encode([""])
        if mc.num_classes:
            cond.labels = labels_from_prompts(prompts, mc.num_classes)
            null.labels = torch.tensor([self.model.null_label])
        if mc.pooled_dim and cond.pooled is None or mc.context_dim and cond.txt is None:
            raise OmniditError("this model reads text but the pipeline has no text encoder")
        return cond.to(self.device), null.to(self.device)

    def sampling_settings(self, steps: int | None = None, cfg: float | None = None, sampler: str | None = None,
                          shift: float | None = None, cfg_interval: Sequence[float] | None = None,
                          skip_scale: float | None = None, skip_blocks: Sequence[int] | None = None,
                          skip_interval: Sequence[float] | None = None, candidates: int | None = None) -> dict:
        """{"steps", "cfg", "sampler", "shift", "cfg_interval", "skip_scale", "skip_blocks", "skip_interval",
        "candidates"}: the given values, the config's ``sample`` section for unset ones."""
        s = self.config.sample
        candidates = s.candidates if candidates is None else candidates
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise OmniditError(f"candidates must be a whole number >= 1, got {candidates!r}",
                               hint="1 samples each image once; e.g. --candidates 2 keeps the better of two")
        skip_scale = s.skip_scale if skip_scale is None else skip_scale
        try:
            skip_blocks = check_skip_blocks(skip_scale, s.skip_blocks if skip_blocks is None else skip_blocks,
                                            self.model.config.depth_single)
        except OmniditError as e:
            raise OmniditError(e.message, hint="e.g. --skip-scale 1 --skip-blocks 2, or --skip-scale 0 to turn it "
                                               "off") from None
        return {"steps": steps or s.steps, "cfg": s.cfg if cfg is None else cfg, "sampler": sampler or s.sampler,
                "shift": s.shift if shift is None else shift,
                "cfg_interval": list(s.cfg_interval if cfg_interval is None else check_cfg_interval(cfg_interval)),
                "skip_scale": skip_scale, "skip_blocks": skip_blocks if skip_scale else [],
                "skip_interval": list(s.skip_interval if skip_interval is None else check_cfg_interval(skip_interval)),
                "candidates": candidates}

    @torch.inference_mode()
    def generate(self, prompts: list[str], width: int | None = None, height: int | None = None,
                 steps: int | None = None, cfg: float | None = None, seed: int | Sequence[int] = 0,
                 sampler: str | None = None, shift: float | None = None,
                 cfg_interval: Sequence[float] | None = None, skip_scale: float | None = None,
                 skip_blocks: Sequence[int] | None = None, skip_interval: Sequence[float] | None = None,
                 candidates: int | None = None, progress: bool = False) -> Tensor:
        """One image per prompt: (B, C, H, W) in [-1, 1]. Unset settings come from the config.

        ``seed``: one seed for the whole batch, or one per prompt (then each image is independent of
        what else is in the batch, which evaluators rely on). ``candidates`` N > 1: sample each image from
        N seeds (the first is its own) and keep the one the model itself scores best (omnidit.selection),
        at about N times the cost.
        """
        mc = self.model.config
        if mc.out_channels not in (0, mc.in_channels):
            raise OmniditError(f"this model outputs {mc.out_channels} channels per {mc.in_channels} input channels "
                               "(e.g. DiT's learned variance); the flow samplers need a velocity model")
        width, height = width or self.config.data.width, height or self.config.data.height
        settings = self.sampling_settings(steps, cfg, sampler, shift, cfg_interval, skip_scale, skip_blocks,
                                          skip_interval, candidates)
        n = settings["candidates"]
        steps, cfg, sampler, shift = settings["steps"], settings["cfg"], settings["sampler"], settings["shift"]
        factor = self.codec.downsample if self.codec is not None else 1
        check_image_size(height, width, mc.patch_size * factor)
        height, width = height // factor, width // factor  # the model works on the latent grid
        if sampler not in SAMPLERS:
            raise OmniditError(f"unknown sampler '{sampler}'", hint=f"choose one of {', '.join(SAMPLERS)}")
        cond, null = self.conditions(prompts)
        if n > 1:
            cond = Condition.cat([cond] * n)  # candidate-major: rows j * B .. j * B + B - 1 are candidate j
        grid_h, grid_w = height // mc.patch_size, width // mc.patch_size
        ids = image_position_ids(grid_h, grid_w, len(mc.axes_dim), device=self.device)

        def model_fn(x: Tensor, t: Tensor, c: Condition) -> Tensor:
            return self.model(x, ids, t, c)

        def skip_fn(x: Tensor, t: Tensor, c: Condition) -> Tensor:  # skip-layer guidance's weaker model
            return self.model(x, ids, t, c, skip_single=settings["skip_blocks"])

        if cfg == 1.0 and not settings["skip_scale"]:
            cond = cond.without_full_mask()  # one check here, none per step
            velocity = lambda x, t: model_fn(x, t, cond)  # noqa: E731
        else:
            velocity = classifier_free_guidance(model_fn, cond, null, cfg, settings["cfg_interval"], skip_fn,
                                                settings["skip_scale"], settings["skip_interval"])
        if isinstance(seed, int):
            noise = torch.cat([initial_noise((len(prompts), mc.in_channels, height, width), s)
                               for s in candidate_seeds(seed, n)])
        else:
            if len(seed) != len(prompts):
                raise ValueError(f"{len(seed)} seeds for {len(prompts)} prompts")
            per_image = [candidate_seeds(int(k), n) for k in seed]
            noise = torch.cat([initial_noise((1, mc.in_channels, height, width), seeds[j])
                               for j in range(n) for seeds in per_image])
        noise = noise.to(self.device)
        x = sample(velocity, patchify(noise, mc.patch_size), steps, sampler, shift, progress=progress)
        if n > 1:
            scores = denoising_scores(model_fn, x, cond.without_full_mask())
            x = best_candidates(x, scores, n)
        latents = unpatchify(x, height, width, mc.patch_size)
        images = self.codec.decode(latents) if self.codec is not None else latents
        return images.clamp(-1, 1).float().cpu()


def build_pipeline(model: MMDiT, config: Config, device: torch.device | str = "cpu") -> Pipeline:
    """Attach the text encoder named by the config to a model."""
    from omnidit.codecs import load_codec
    from omnidit.text import load_text_encoder

    device = torch.device(device)
    encoder = None
    if config.text.encoder != "none":
        encoder = load_text_encoder(config.text.encoder, config.text.max_length, device=device)
    dc = config.data
    pixel_channels = model.config.in_channels if dc.codec == "identity" else 3
    codec = load_codec(dc.codec, pixel_channels, device, dc.codec_dtype)
    return Pipeline(model=model, config=config, text_encoder=encoder, device=device, codec=codec)


def load_pipeline(model_dir: str | Path, device: str = "auto", use_ema: bool = True) -> Pipeline:
    """Load a checkpoint folder (or run folder) for sampling."""
    from omnidit.checkpoint import load_model

    dev = resolve_device(device)
    model, config = load_model(model_dir, use_ema=use_ema, device=dev)
    return build_pipeline(model, config, dev)
