"""A diffusers Flux pipeline folder run by omnidit: its text encoders, omnidit's MMDiT, Euler and VAECodec.

``load_flux_pipeline(folder)`` reads the folder that ``diffusers.FluxPipeline.save_pretrained`` writes
(``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/`` (CLIP), ``tokenizer/``,
``text_encoder_2/`` (T5), ``tokenizer_2/``, ``scheduler/``). Only the scheduler's *config* is read: the
time grid is computed here and integrated by ``omnidit.sampling``; no diffusers scheduler object exists.

What is reproduced from ``diffusers.FluxPipeline`` (so that outputs match it, see
tests/test_flux_pipeline.py):

- prompts: T5 hidden states of the prompt padded to ``max_sequence_length`` ("max_length" padding, no
  attention mask, pad tokens included), CLIP ``pooler_output`` with padding to the CLIP tokenizer's
  ``model_max_length`` (77); text position ids are all 0;
- latents: (B, C, H/f, W/f) with f the VAE factor, packed 2x2 into tokens (``omnidit.tokens.patchify``);
- times: t_i = 1 - i/steps (i = 0..steps), shifted by ``exp(mu)`` with
  ``mu = calculate_shift(image tokens, base_image_seq_len, max_image_seq_len, base_shift, max_shift)``
  when the scheduler uses dynamic shifting (FLUX.1-dev), else by its fixed ``shift`` (schnell: 1).
  diffusers' ``exp(mu) / (exp(mu) + 1/t - 1)`` is exactly ``shift_timesteps(t, exp(mu))``;
- guidance: embedded by the model (guidance-distilled dev), no classifier-free batching;
- decode: ``latents / scaling_factor + shift_factor`` through the VAE (``omnidit.codecs.VAECodec``).

Noise convention (differs from the rest of omnidit): ``omnidit.sampling.initial_noise`` draws each
shape from its own seeded CPU generator, and ``Pipeline.generate`` can take one seed per prompt. Here,
as in diffusers, the *whole batch* (B, C, H/f, W/f) is drawn in one ``torch.randn`` call from
``torch.Generator("cpu").manual_seed(seed)`` in the text encoders' dtype, before packing. A seed
therefore gives the image that ``FluxPipeline(..., generator=torch.Generator("cpu").manual_seed(seed))``
gives, on any device, but image i depends on the batch size and position.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from omnidit.condition import Condition
from omnidit.convert.flux import FLUX_PACK, load_flux_transformer
from omnidit.errors import OmniditError
from omnidit.model.mmdit import MMDiT, MMDiTConfig
from omnidit.sampling import SAMPLERS, sample
from omnidit.tokens import check_image_size, image_position_ids, patchify, unpatchify

_HINT = ("pass a local diffusers Flux pipeline folder (model_index.json, transformer/, vae/, text_encoder/, "
         "tokenizer/, text_encoder_2/, tokenizer_2/, scheduler/)")
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
# FlowMatchEulerDiscreteScheduler options that change the grid in ways this module does not reproduce.
_UNSUPPORTED_SCHEDULE = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                         "invert_sigmas", "use_flow_sigmas", "stochastic_sampling")
# diffusers' defaults (FluxPipeline reads the scheduler config with these fallbacks).
SCHEDULE_DEFAULTS = {"shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
                     "base_image_seq_len": 256, "max_image_seq_len": 4096, "time_shift_type": "exponential"}
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size, in latent pixels


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's mu: linear in the number of image tokens, base_shift at base_seq_len, max_shift at max_seq_len."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flux_schedule_shift(scheduler_config: dict, image_seq_len: int) -> float:
    """The ``shift`` for ``omnidit.sampling.timestep_schedule`` that reproduces the Flux pipeline's sigmas."""
    c = {**SCHEDULE_DEFAULTS, **scheduler_config}
    bad = [k for k in _UNSUPPORTED_SCHEDULE if c.get(k)]
    if bad:
        raise OmniditError(f"the scheduler config sets '{bad[0]}', which omnidit's pipelines do not reproduce")
    if not c["use_dynamic_shifting"]:
        return float(c["shift"])
    if c["time_shift_type"] != "exponential":
        raise OmniditError(f"unsupported time_shift_type '{c['time_shift_type']}' (only 'exponential')")
    mu = calculate_shift(image_seq_len, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"],
                         c["max_shift"])
    return math.exp(mu)


def diffusers_noise(shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> Tensor:
    """The whole batch in one randn from a seeded CPU generator, as diffusers' pipelines draw it."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=dtype)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OmniditError(f"cannot read {path}: {e}", hint=_HINT) from e


@dataclass
class FluxPipelineOmnidit:
    """Text encoders + MMDiT + VAE of a Flux pipeline folder; ``generate`` returns images in [-1, 1]."""

    model: MMDiT
    model_config: MMDiTConfig
    codec: object  # omnidit.codecs.VAECodec
    clip: object  # transformers.CLIPTextModel
    clip_tokenizer: object
    t5: object  # transformers.T5EncoderModel
    t5_tokenizer: object
    scheduler_config: dict
    device: torch.device = torch.device("cpu")

    @property
    def vae_scale_factor(self) -> int:
        return self.codec.downsample

    @property
    def text_dtype(self) -> torch.dtype:
        return self.t5.dtype

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str], max_sequence_length: int = 512) -> Condition:
        """Condition(txt = T5 states (B, max_sequence_length, C), pooled = CLIP pooler_output (B, P))."""
        if max_sequence_length > 512:
            raise OmniditError(f"max_sequence_length {max_sequence_length} exceeds Flux's 512")
        t5_ids = self.t5_tokenizer(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                                   return_tensors="pt").input_ids
        txt = self.t5(t5_ids.to(self.device), output_hidden_states=False)[0]
        clip_ids = self.clip_tokenizer(prompts, padding="max_length", max_length=self.clip_tokenizer.model_max_length,
                                       truncation=True, return_tensors="pt").input_ids
        pooled = self.clip(clip_ids.to(self.device), output_hidden_states=False).pooler_output
        return Condition(txt=txt.to(self.text_dtype), pooled=pooled.to(self.clip.dtype))

    def initial_noise(self, batch: int, latent_h: int, latent_w: int, seed: int) -> Tensor:
        """diffusers' draw (see module docs): (B, C, h, w) in the text encoders' dtype."""
        return diffusers_noise((batch, self.model_config.in_channels, latent_h, latent_w), seed, self.text_dtype)

    @torch.inference_mode()
    def generate(self, prompt: Sequence[str] | str, width: int | None = None, height: int | None = None,
                 steps: int = 28, guidance: float = 3.5, seed: int = 0, max_sequence_length: int = 512,
                 sampler: str = "euler", progress: bool = False) -> Tensor:
        """One image per prompt: (B, 3, height, width) float32 in [-1, 1] on the CPU.

        width / height default to 1024 for an 8x VAE (diffusers' default) and must be multiples of
        2 x the VAE factor. ``guidance`` is ignored by models without a guidance embedding (schnell).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not isinstance(p, str) for p in prompts):
            raise OmniditError("generate() needs a non-empty list of prompt strings")
        if sampler not in SAMPLERS:
            raise OmniditError(f"unknown sampler '{sampler}'", hint=f"choose one of {', '.join(SAMPLERS)}")
        f = self.vae_scale_factor
        width, height = width or DEFAULT_SAMPLE_SIZE * f, height or DEFAULT_SAMPLE_SIZE * f
        check_image_size(height, width, FLUX_PACK * f)
        lh, lw = height // f, width // f
        p, mc = FLUX_PACK, self.model_config
        param = next(self.model.parameters())
        cond = self.encode_prompts(prompts, max_sequence_length).to(self.device, param.dtype)
        if mc.guidance_embed:
            cond.guidance = torch.full((len(prompts),), float(guidance), device=self.device, dtype=torch.float32)
        ids = image_position_ids(lh // p, lw // p, len(mc.axes_dim), device=self.device)
        noise = patchify(self.initial_noise(len(prompts), lh, lw, seed), p).to(self.device, torch.float32)
        shift = flux_schedule_shift(self.scheduler_config, noise.shape[1])

        def velocity(x: Tensor, t: Tensor) -> Tensor:  # latents stay float32 between steps
            return self.model(x.to(param.dtype), ids, t, cond).float()

        x = sample(velocity, noise, steps, sampler, shift, progress=progress)
        images = self.codec.decode(unpatchify(x, lh, lw, p))
        return images.clamp(-1, 1).float().cpu()


def load_flux_pipeline(folder: str | Path, device: str | torch.device = "cpu",
                       dtype: torch.dtype | str | None = None) -> FluxPipelineOmnidit:
    """Load a local diffusers Flux pipeline folder (nothing is downloaded).

    ``dtype``: one dtype for every component; None means float32 (use bfloat16 for real FLUX.1 on a GPU).
    """
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    from omnidit.codecs import VAECodec, resolve_dtype
    from omnidit.text import quiet_transformers

    folder = Path(folder).expanduser().resolve()
    if not (folder / "model_index.json").is_file():
        raise OmniditError(f"no model_index.json in {folder}", hint=_HINT)
    missing = [s for s in SUBFOLDERS if not (folder / s).is_dir()]
    if missing:
        raise OmniditError(f"the Flux pipeline folder {folder} has no '{missing[0]}/'", hint=_HINT)
    dtype = torch.float32 if dtype is None else resolve_dtype(dtype)
    device = torch.device(device)
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")
    flux_schedule_shift(scheduler_config, 256)  # fail early on an unsupported schedule
    model, config = load_flux_transformer(folder / "transformer", dtype=dtype, device=device)
    codec = VAECodec(folder / "vae", device=device, dtype=dtype)
    if codec.channels != config.in_channels:
        raise OmniditError(f"the VAE has {codec.channels} latent channels but the transformer reads "
                           f"{config.in_channels}", hint=_HINT)
    with quiet_transformers():
        try:
            clip_tok = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
            t5_tok = AutoTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True)
            clip = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True, dtype=dtype)
            t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_2", local_files_only=True, dtype=dtype)
        except Exception as e:  # OSError, ValueError, safetensors errors ... all mean "bad folder"
            raise OmniditError(f"cannot load the text encoders in {folder}: {e}", hint=_HINT) from e
    clip.to(device).eval().requires_grad_(False)
    t5.to(device).eval().requires_grad_(False)
    return FluxPipelineOmnidit(model=model, model_config=config, codec=codec, clip=clip, clip_tokenizer=clip_tok,
                               t5=t5, t5_tokenizer=t5_tok, scheduler_config=scheduler_config, device=device)
