"""From prompts (or class labels) to images: text encoding, guidance, sampling, unpatchify.

``Pipeline`` bundles a model with its config and text encoder so that the CLI, the trainer's
sample grids and the evaluators share one path from prompt to pixels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from omnidit.condition import Condition
from omnidit.config import Config
from omnidit.data import caption_vocabulary
from omnidit.data.shapes import NEW_SHAPE_WORDS
from omnidit.errors import OmniditError, PromptWarning, shorten
from omnidit.flops import sampling_bytes_per_sample
from omnidit.layout import with_layout
from omnidit.model.mmdit import MMDiT
from omnidit.sampling import (
    SAMPLERS,
    StepCallback,
    check_cfg_interval,
    check_skip_blocks,
    classifier_free_guidance,
    initial_noise,
    sample,
    token_times,
)
from omnidit.selection import best_candidates, candidate_seeds, denoising_scores
from omnidit.tokens import (
    check_frame_count,
    check_image_size,
    given_tubelets,
    video_patchify,
    video_position_ids,
    video_unpatchify,
)
from omnidit.validate import USABLE_FRACTION, available_memory, check_memory, check_number

# The sampling arguments of Pipeline.generate and sampling_settings (None = the config's sample section).
SAMPLING_KEYS = ("steps", "cfg", "sampler", "shift", "cfg_interval", "skip_scale", "skip_blocks", "skip_interval",
                 "candidates", "cache", "cache_threshold", "cache_forecast", "cache_interval")

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


def guided(settings: dict, guidance_input: bool = False) -> bool:
    """Whether sampling with ``settings`` runs a second (unconditional or skip-layer) row per sample. A model that
    takes the guidance scale as an input (``guidance_input``: a distilled student, Flux dev) needs none for cfg."""
    return settings["cfg"] != 1.0 and not guidance_input or bool(settings["skip_scale"])


def warn_unknown_words(prompts: Sequence[str], vocabulary: Collection[str] | None) -> None:
    """A PromptWarning for each prompt with words outside ``vocabulary`` (the words of the model's training
    captions; None = open captions, nothing to check): the model draws such words as something random."""
    if vocabulary is None:
        return
    for prompt in dict.fromkeys(prompts):
        unknown = [w for w in dict.fromkeys(re.findall(r"\w+", prompt.lower())) if w not in vocabulary]
        if unknown:
            warnings.warn(f"the prompt {shorten(prompt)} has words this model never saw in training "
                          f"({', '.join(unknown)}); it knows only: {', '.join(sorted(vocabulary))}",
                          PromptWarning, stacklevel=4)


@dataclass
class Pipeline:
    model: MMDiT
    config: Config
    text_encoder: object | None = None  # omnidit.text.TextEncoder when the model reads text
    device: torch.device = torch.device("cpu")
    codec: object | None = None  # omnidit.codecs.LatentCodec; None means pixels (identity)
    model_dir: Path | None = None  # the folder it was loaded from (its step-cache calibration lives there)
    # The model that ranks best-of-N candidates (None: the model itself). A fast preset that samples with a model's
    # guidance-distilled twin keeps the model here: its conditional velocity ranks better than the twin's.
    scorer: MMDiT | None = None
    # sample.uncond_base: the LoRA run's base (train.init_from's weights), which computes guidance's unconditional
    # velocity in place of the model itself (None: the model does).
    uncond_model: MMDiT | None = None

    @property
    def channels(self) -> int:
        """Channels of the images the pipeline returns."""
        return self.config.model.in_channels if self.codec is None or self.codec.downsample == 1 else 3

    @property
    def ranker(self) -> MMDiT:
        """The model whose velocity ranks best-of-N candidates: ``scorer``, else the model itself."""
        return self.model if self.scorer is None else self.scorer

    def conditions(self, prompts: list[str], negative_prompt: str = "", guidance: float | None = None
                   ) -> tuple[Condition, Condition]:
        """(cond, null_cond) for a batch of prompts; null_cond has batch 1: the empty prompt, or
        ``negative_prompt`` (what guidance steers away from). A model that takes the guidance scale as an input
        gets ``guidance`` (default the config's cfg) in both."""
        for p in prompts:
            if not isinstance(p, str) or (self.text_encoder is not None and not p.strip()):
                raise OmniditError("the prompt is empty", hint='pass a description, e.g. "a red circle"')
        if not isinstance(negative_prompt, str) or negative_prompt and self.text_encoder is None:
            raise OmniditError("a negative prompt needs a model that reads text", hint="leave it out")
        mc = self.model.config
        cond, null = Condition(), Condition()
        if self.text_encoder is not None:
            dc = self.config.data
            vocabulary = caption_vocabulary(dc.name, dc.mix_name)
            if dc.new_shapes and vocabulary is not None:
                vocabulary = vocabulary | NEW_SHAPE_WORDS
            warn_unknown_words(prompts + [negative_prompt], vocabulary)
            cond, null = self.text_encoder.encode(prompts), self.text_encoder.encode([negative_prompt])
        if mc.num_classes:
            cond.labels = labels_from_prompts(prompts, mc.num_classes)
            null.labels = torch.tensor([self.model.null_label])
        if mc.pooled_dim and cond.pooled is None or mc.context_dim and cond.txt is None:
            raise OmniditError("this model reads text but the pipeline has no text encoder")
        if mc.guidance_embed:
            scale = float(self.config.sample.cfg if guidance is None else guidance)
            cond.guidance = torch.full((len(prompts),), scale)
            null.guidance = torch.full((1,), scale)
        return cond.to(self.device), null.to(self.device)

    def sampling_settings(self, steps: int | None = None, cfg: float | None = None, sampler: str | None = None,
                          shift: float | None = None, cfg_interval: Sequence[float] | None = None,
                          skip_scale: float | None = None, skip_blocks: Sequence[int] | None = None,
                          skip_interval: Sequence[float] | None = None, candidates: int | None = None,
                          cache: str | None = None, cache_threshold: float | None = None,
                          cache_forecast: str | None = None, cache_interval: int | None = None) -> dict:
        """{"steps", "cfg", "sampler", "shift", "cfg_interval", "skip_scale", "skip_blocks", "skip_interval",
        "candidates", "cache", "cache_threshold", "cache_forecast", "cache_interval"}: the given values, the
        config's ``sample`` section for unset ones."""
        s = self.config.sample
        candidates = s.candidates if candidates is None else candidates
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise OmniditError(f"candidates must be a whole number >= 1, got {candidates!r}",
                               hint="1 samples each image once; e.g. --candidates 2 keeps the better of two")
        skip_scale = check_number("the skip-layer guidance scale", s.skip_scale if skip_scale is None else skip_scale,
                                  low=0, high=100)
        try:
            skip_blocks = check_skip_blocks(skip_scale, s.skip_blocks if skip_blocks is None else skip_blocks,
                                            self.model.config.depth_single)
        except OmniditError as e:
            last = self.model.config.depth_single - 1
            example = f"e.g. --skip-scale 1 --skip-blocks {last}, or " if last >= 0 else ""
            raise OmniditError(e.message, hint=f"{example}--skip-scale 0 to turn it off") from None
        steps = s.steps if steps is None else check_number("steps", steps, low=1, high=10_000, integer=True)
        cfg = s.cfg if cfg is None else check_number("the guidance scale cfg", cfg, low=0, high=100)
        shift = s.shift if shift is None else check_number("shift", shift, low=0, low_open=True, high=100)
        return {"steps": steps, "cfg": cfg, "sampler": sampler or s.sampler, "shift": shift,
                "cfg_interval": list(s.cfg_interval if cfg_interval is None else check_cfg_interval(cfg_interval)),
                "skip_scale": skip_scale, "skip_blocks": skip_blocks if skip_scale else [],
                "skip_interval": list(s.skip_interval if skip_interval is None else check_cfg_interval(skip_interval)),
                "candidates": candidates, **self._cache_settings(steps, cache, cache_threshold, cache_forecast,
                                                                 cache_interval)}

    def scoring_condition(self, cond: Condition) -> Condition:
        """The condition best-of-N scores candidates under (``selection.denoising_scores``, which measures the
        conditional flow): ``cond`` itself, except that a ranker (``ranker``) taking the guidance scale as an input
        (a guidance-distilled student ranking its own candidates) is read at the least guided scale it was trained
        on (``distill.guidance``'s low end), the closest it has to the conditional velocity."""
        scales = self.config.distill.guidance
        if cond.guidance is None or not self.ranker.config.guidance_embed or not scales:
            return cond
        return dataclasses.replace(cond, guidance=torch.full_like(cond.guidance, float(scales[0])))

    def _cache_settings(self, steps: int, method: str | None, threshold: float | None, forecast: str | None,
                        interval: int | None) -> dict:
        """The step-cache keys of sampling_settings, checked (CacheSettings), with the threshold resolved."""
        from omnidit.step_cache import CacheSettings

        s = self.config.sample
        # The config's threshold and forecast were set for its own method (a preset's, a model's): another method
        # asked for explicitly takes its own defaults. The config's threshold 0 means the method's default.
        own = method is None or method == s.cache
        cache = CacheSettings(s.cache if method is None else method,
                              ((s.cache_threshold or None) if own else None) if threshold is None else threshold,
                              s.cache_interval if interval is None else interval,
                              (s.cache_forecast if own else "copy") if forecast is None else forecast, steps)
        if cache.method == "none" and any(v is not None for v in (threshold, interval, forecast)):
            raise OmniditError("a step-cache setting (threshold, interval or forecast) was given, and no step cache "
                               "is on", hint="choose one too (--cache first_block, teacache, magcache or interval) "
                                             "or drop the setting")
        return {"cache": cache.method, "cache_threshold": cache.threshold, "cache_forecast": cache.forecast,
                "cache_interval": cache.interval}

    def step_cache(self, settings: dict):
        """A context manager that caches steps on the model as ``settings`` say, for one sampling run."""
        from omnidit.step_cache import CacheSettings, using_step_cache

        cache = CacheSettings(settings["cache"], settings["cache_threshold"], settings["cache_interval"],
                              settings["cache_forecast"], settings["steps"])
        return using_step_cache(self.model, cache, self.calibration if cache.method != "none" else None)

    def uncond_fn(self, ids: Tensor, time_mask: Tensor | None, settings: dict
                  ) -> Callable[[Tensor, Tensor, Condition], Tensor] | None:
        """Guidance's unconditional velocity from ``uncond_model`` (sample.uncond_base), or None: the model's own."""
        base = self.uncond_model
        if base is None:
            return None
        if settings["cache"] != "none":
            raise OmniditError("step caching follows one model, and sample.uncond_base samples with two",
                               hint="sample without a cache (--cache none, and no --speed preset), or set "
                                    "sample.uncond_base=false")
        return lambda x, t, c: base(x, ids, token_times(t, time_mask), c)

    def candidate_scores(self, x: Tensor, ids: Tensor, cond: Condition) -> Tensor:
        """(B,) best-of-N scores of clean tokens x (B, N, D) at position ids under cond (lower is better): the
        ranker's denoising score (``selection.denoising_scores``) at its own precision."""
        ranker = self.ranker
        with self.precision(ranker):
            return denoising_scores(lambda x, t, c: ranker(x, ids, t, c), x, self.scoring_condition(cond))

    def precision(self, model: MMDiT | None = None):
        """A context manager for ``model``'s compute precision (default the pipeline's model): bfloat16 autocast for
        a ``bf16`` quantized folder or preset (omnidit.quantize), nothing otherwise."""
        dtype = getattr(self.model if model is None else model, "autocast_dtype", None)
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    @property
    def calibration(self):
        """The model folder's step-cache calibration (omnidit calibrate), or None."""
        from omnidit.step_cache import Calibration

        return Calibration.load(self.model_dir) if self.model_dir is not None else None

    @torch.inference_mode()
    def generate(self, prompts: list[str], width: int | None = None, height: int | None = None,
                 steps: int | None = None, cfg: float | None = None, seed: int | Sequence[int] = 0,
                 sampler: str | None = None, shift: float | None = None,
                 cfg_interval: Sequence[float] | None = None, skip_scale: float | None = None,
                 skip_blocks: Sequence[int] | None = None, skip_interval: Sequence[float] | None = None,
                 candidates: int | None = None, progress: bool = False, negative_prompt: str = "",
                 on_step: StepCallback | None = None, cache: str | None = None, cache_threshold: float | None = None,
                 cache_forecast: str | None = None, cache_interval: int | None = None,
                 boxes: Sequence | None = None) -> Tensor:
        """One image per prompt: (B, C, H, W) in [-1, 1]. Unset settings come from the config.

        ``seed``: one seed for the whole batch, or one per prompt (then each image is independent of
        what else is in the batch, which evaluators rely on). ``candidates`` N > 1: sample each image from
        N seeds (the first is its own) and keep the one the model itself scores best (omnidit.selection),
        at about N times the cost. ``negative_prompt``: what guidance steers away from (default the empty
        prompt). ``on_step(done, total)`` runs after each sampler step (raise from it to stop). ``cache`` and
        its ``cache_*`` settings: step caching (omnidit.step_cache), e.g. ``cache="teacache"``. ``boxes``: for a
        model with a layout adapter, a list of ``omnidit.layout.Box`` for every prompt or one list per prompt.
        """
        settings = self.sampling_settings(steps, cfg, sampler, shift, cfg_interval, skip_scale, skip_blocks,
                                          skip_interval, candidates, cache, cache_threshold, cache_forecast,
                                          cache_interval)
        clips = self._generate(prompts, 1, 1.0, width, height, settings, seed, None, (), progress, negative_prompt,
                               on_step, boxes=boxes)
        return clips[:, :, 0]

    @torch.inference_mode()
    def generate_video(self, prompts: list[str], frames: int | None = None, fps: float | None = None,
                       width: int | None = None, height: int | None = None, seed: int | Sequence[int] = 0,
                       given: Tensor | None = None, given_frames: Sequence[int] = (), progress: bool = False,
                       first_frame: Tensor | None = None, negative_prompt: str = "",
                       on_step: StepCallback | None = None, **sampling) -> Tensor:
        """One clip per prompt: (B, C, T, H, W) in [-1, 1]. Unset settings come from the config (data.frames,
        data.fps, the sample section); ``sampling`` takes the keys of ``SAMPLING_KEYS``.

        ``given`` (B or 1, C, T, H, W) in [-1, 1] and ``given_frames`` (frame indices): those frames are clean
        context (per-token t = 0) that the sampler leaves exactly as given: image-to-video gives frame 0,
        extension the first k frames, interpolation the first and the last. Each given frame must fill
        whole tubelets. ``first_frame`` (B or 1, C, H, W) is image-to-video in one argument: the clip starts
        with that image (held for the first tubelet's frames when the model's temporal patch is > 1).
        """
        settings = self.sampling_settings(**{k: sampling.get(k) for k in SAMPLING_KEYS})
        unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
        if unknown:
            raise TypeError(f"generate_video() got unexpected keyword arguments {unknown}")
        frames = self.config.data.frames if frames is None else frames
        fps = self.config.data.fps if fps is None else fps
        if first_frame is not None:
            if given is not None or given_frames:
                raise OmniditError("pass either first_frame or given and given_frames, not both")
            pt = self.model.config.temporal_patch
            if first_frame.dim() != 4:
                raise OmniditError(f"first_frame must be (B or 1, C, H, W), got {tuple(first_frame.shape)}")
            given = first_frame[:, :, None].expand(-1, -1, max(int(frames), pt), -1, -1)[:, :, :int(frames)]
            given_frames = range(min(pt, int(frames)))
        return self._generate(prompts, frames, fps, width, height, settings, seed, given, given_frames, progress,
                              negative_prompt, on_step)

    @torch.inference_mode()
    def generate_av(self, prompts: list[str], frames: int | None = None, fps: float | None = None,
                    width: int | None = None, height: int | None = None, seconds: float | None = None,
                    seed: int | Sequence[int] = 0, video: Tensor | None = None, audio: Tensor | None = None,
                    given_frames: Sequence[int] | None = None, audio_only: bool = False,
                    cfg_video: float | None = None, cfg_audio: float | None = None, progress: bool = False,
                    negative_prompt: str = "", on_step: StepCallback | None = None, **sampling):
        """One clip with sound per prompt, from a model with an ``audio`` stream -> ``av.AudioVideo`` (video
        (B, C, T, H, W) or None, audio (B, 1, S), both in [-1, 1]). Unset settings come from the config.

        Which streams are given picks the direction: nothing (text -> clip with sound), ``video`` (B or 1, C, T,
        H, W) (video -> audio), ``audio`` (B or 1, 1, S) at the model's sample rate (audio -> video); with
        ``given_frames`` only those frames of ``video`` and the sound over the same time (``audio``, if given)
        are kept (extend a clip with its sound). Given streams come back exactly as given. ``audio_only``:
        sound alone, ``seconds`` long (default data.seconds). ``cfg_video`` / ``cfg_audio``: each stream's
        guidance scale (default the sampling cfg). ``seed``: sample i uses seed + i (or one seed each).
        """
        from omnidit.av import generate_av

        return generate_av(self, prompts, frames, fps, width, height, seconds, seed, video, audio, given_frames,
                           audio_only, cfg_video, cfg_audio, progress, negative_prompt, on_step, **sampling)

    def inpaint(self, prompts: list[str], image: Tensor, mask: Tensor, mode: str = "auto",
                seed: int | Sequence[int] = 0, progress: bool = False, negative_prompt: str = "",
                on_step: StepCallback | None = None, boxes: Sequence | None = None, fps: float | None = None,
                **sampling) -> Tensor:
        """Fill the pixels of ``image`` (B or 1, C, H, W) in [-1, 1] where ``mask`` (H, W) is True, one result per
        prompt: (B, C, H, W); every other pixel comes back exactly as given. A clip (B or 1, C, T, H, W) at ``fps``
        works the same for a video model, with the mask in every frame or one per frame (T, H, W). ``mode``: auto,
        tokens or blend (omnidit.inpaint); ``boxes``: layout boxes (see ``generate``); ``sampling``: the keys of
        ``SAMPLING_KEYS``."""
        from omnidit.inpaint import inpaint

        return inpaint(self, prompts, image, mask, mode, seed, progress, negative_prompt, on_step, boxes, fps,
                       **sampling)

    def _generate(self, prompts: list[str], frames: int, fps: float, width: int | None, height: int | None,
                  settings: dict, seed: int | Sequence[int], given: Tensor | None, given_frames: Sequence[int],
                  progress: bool, negative_prompt: str = "", on_step: StepCallback | None = None,
                  token_mask: Tensor | None = None, given_noised: bool = False, boxes: Sequence | None = None
                  ) -> Tensor:
        """The one path from prompts to clips (an image is a clip of one frame at time 0): (B, C, T, H, W).

        ``token_mask`` (N,) bool: the tokens of ``given`` (in the model's token space) that are known, instead of
        whole ``given_frames`` (inpainting); ``given_noised``: they follow their noised path (sampling.sample)
        rather than sitting at t = 0; ``boxes``: layout boxes (see ``generate``)."""
        mc = self.model.config
        if mc.out_channels not in (0, mc.in_channels):
            raise OmniditError(f"this model outputs {mc.out_channels} channels per {mc.in_channels} input channels "
                               "(e.g. DiT's learned variance); the flow samplers need a velocity model")
        width, height = width or self.config.data.width, height or self.config.data.height
        frames = check_number("the frame count", frames, low=1, integer=True)
        fps = check_number("fps", fps, low=0.0, low_open=True)
        check_frame_count(frames, mc.temporal_patch)
        n = settings["candidates"]
        steps, cfg, sampler, shift = settings["steps"], settings["cfg"], settings["sampler"], settings["shift"]
        factor = self.codec.downsample if self.codec is not None else 1
        if factor != 1 and frames > 1:
            raise OmniditError("this model works in an image VAE's latent space and cannot make clips",
                               hint="use a pixel-space video model, e.g. --model shapes-video")
        check_image_size(height, width, mc.patch_size * factor)
        what = f"sampling {len(prompts)} {'clip' if frames > 1 else 'image'}{'s' if len(prompts) > 1 else ''} of " \
               f"{width}x{height}" + (f" with {frames} frames" if frames > 1 else "")
        check_memory(len(prompts) * self._bytes_per_sample(frames, width, height, settings), self.device, what,
                     hint="draw fewer at once (fewer prompts per call; generate's --batch-size), a smaller size or "
                          "fewer frames")
        height, width = height // factor, width // factor  # the model works on the latent grid
        if sampler not in SAMPLERS:
            raise OmniditError(f"unknown sampler '{sampler}'", hint=f"choose one of {', '.join(SAMPLERS)}")
        mask = tokens = None
        if given_frames or token_mask is not None:
            mask, tokens = self._given_tokens(given, given_frames, len(prompts), frames, height, width, token_mask)
            tokens = tokens.repeat(n, 1, 1) if len(tokens) > 1 else tokens  # candidate-major, like the noise
        time_mask = None if given_noised else mask  # noised given tokens share the sampler's t
        if negative_prompt and mc.guidance_embed:
            raise OmniditError("this model takes its guidance scale as an input and draws no unconditional row, so "
                               "it cannot follow a negative prompt",
                               hint="drop the negative prompt, or (with --speed fast or faster, which sample shapes "
                                    "through its guidance-distilled twin) use the default speed")
        cond, null = self.conditions(prompts, negative_prompt, guidance=cfg)
        if n > 1:
            cond = Condition.cat([cond] * n)  # candidate-major: rows j * B .. j * B + B - 1 are candidate j
        if boxes:  # an empty list: no layout, as for a model without an adapter
            cond, null = with_layout(self.model, self.text_encoder, cond, null, boxes, len(prompts), frames)
        grid_h, grid_w = height // mc.patch_size, width // mc.patch_size
        ids = video_position_ids(frames, grid_h, grid_w, fps, mc.temporal_patch, len(mc.axes_dim), self.device)

        def model_fn(x: Tensor, t: Tensor, c: Condition) -> Tensor:
            return self.model(x, ids, token_times(t, time_mask), c)

        def skip_fn(x: Tensor, t: Tensor, c: Condition) -> Tensor:  # skip-layer guidance's weaker model
            return self.model(x, ids, token_times(t, time_mask), c, skip_single=settings["skip_blocks"])

        if not guided(settings, mc.guidance_embed):
            cond = cond.without_full_mask()  # one check here, none per step
            velocity = lambda x, t: model_fn(x, t, cond)  # noqa: E731
        else:
            cfg = 1.0 if mc.guidance_embed else cfg  # the scale is the model's input: no unconditional row
            velocity = classifier_free_guidance(model_fn, cond, null, cfg, settings["cfg_interval"], skip_fn,
                                                settings["skip_scale"], settings["skip_interval"],
                                                uncond_fn=self.uncond_fn(ids, time_mask, settings))
        shape = (mc.in_channels, frames, height, width)
        if isinstance(seed, int):
            noise = torch.cat([initial_noise((len(prompts), *shape), s) for s in candidate_seeds(seed, n)])
        else:
            if len(seed) != len(prompts):
                raise ValueError(f"{len(seed)} seeds for {len(prompts)} prompts")
            per_image = [candidate_seeds(int(k), n) for k in seed]
            noise = torch.cat([initial_noise((1, *shape), seeds[j]) for j in range(n) for seeds in per_image])
        noise = video_patchify(noise.to(self.device), mc.patch_size, mc.temporal_patch)
        with self.step_cache(settings), self.precision():
            x = sample(velocity, noise, steps, sampler, shift, progress=progress, given=mask, given_tokens=tokens,
                       on_step=on_step, given_noised=given_noised)
        if n > 1:  # every token noised alike, given ones too: the score ranks whole results under their prompt
            x = best_candidates(x, self.candidate_scores(x, ids, cond.without_full_mask()), n)
        latents = video_unpatchify(x, frames, height, width, mc.patch_size, mc.temporal_patch)
        if self.codec is not None:  # an image VAE decodes the one frame; the identity codec takes clips as they are
            latents = self.codec.decode(latents[:, :, 0])[:, :, None] if factor != 1 else self.codec.decode(latents)
        return latents.clamp(-1, 1).float().cpu()

    def _bytes_per_sample(self, frames: int, width: int, height: int, settings: dict) -> int:
        """Peak activation bytes that one image or clip adds to a sampling batch (flops.sampling_bytes_per_sample
        times the rows it takes: candidates, and the unconditional row of guidance)."""
        mc = self.model.config
        factor = self.codec.downsample if self.codec is not None else 1
        tokens = -(-frames // mc.temporal_patch) * (height // factor // mc.patch_size) * (width // factor //
                                                                                             mc.patch_size)
        rows = settings["candidates"] * (2 if guided(settings, mc.guidance_embed) else 1)
        dtype_bytes = next(self.model.parameters()).element_size()
        return rows * sampling_bytes_per_sample(mc, tokens, self.config.text.max_length, dtype_bytes)

    def batch_limit(self, frames: int = 1, width: int | None = None, height: int | None = None,
                    **sampling) -> int | None:
        """How many images (frames 1) or clips of this size fit in one sampling call in the memory the device has
        free now (0 = not even one); None where the free memory cannot be read."""
        free = available_memory(self.device)
        if free is None:
            return None
        settings = self.sampling_settings(**{k: sampling.get(k) for k in SAMPLING_KEYS})
        width, height = width or self.config.data.width, height or self.config.data.height
        return int(USABLE_FRACTION * free // max(1, self._bytes_per_sample(frames, width, height, settings)))

    def _given_tokens(self, given: Tensor | None, given_frames: Sequence[int], batch: int, frames: int,
                      height: int, width: int, token_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The token mask (1, N) and the clean tokens (B or 1, N, D) of the given frames (or of the tokens that
        ``token_mask`` (N,) marks)."""
        mc = self.model.config
        pt = mc.temporal_patch
        want = (mc.in_channels, frames, height, width)
        if given is None or given.dim() != 5 or tuple(given.shape[1:]) != want or given.shape[0] not in (1, batch):
            got = None if given is None else tuple(given.shape)
            raise OmniditError(f"the given frames must be a (B or 1, C, T, H, W) = (B, {', '.join(map(str, want))}) "
                               f"clip, got {got}", hint="give frames of the size and length being generated")
        if token_mask is not None:
            mask = token_mask.reshape(1, -1).to(self.device)
        else:
            tubelets = given_tubelets(given_frames, frames, pt)
            per_frame = (height // mc.patch_size) * (width // mc.patch_size)
            known = torch.zeros(frames // pt, dtype=torch.bool)
            known[tubelets] = True
            mask = known.repeat_interleave(per_frame)[None].to(self.device)  # (1, N)
        tokens = video_patchify(given.to(self.device, torch.float32), mc.patch_size, pt)
        return mask, tokens


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
    from omnidit.checkpoint import resolve_model_dir

    model, config = load_model(model_dir, use_ema=use_ema, device=dev)
    pipe = build_pipeline(model, config, dev)
    pipe.model_dir = resolve_model_dir(model_dir)
    if config.sample.uncond_base:
        from omnidit.checkpoint import load_lora_base

        pipe.uncond_model = load_lora_base(pipe.model_dir, dev)
    return pipe
