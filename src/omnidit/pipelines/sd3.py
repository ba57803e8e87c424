"""A diffusers Stable Diffusion 3 pipeline folder run by omnidit: its text encoders, omnidit's MMDiT, Euler, VAECodec.

``load_sd3_pipeline(folder)`` reads the folder that ``diffusers.StableDiffusion3Pipeline.save_pretrained``
writes (``transformer/``, ``vae/``, ``text_encoder/`` + ``tokenizer/`` (CLIP-L), ``text_encoder_2/`` +
``tokenizer_2/`` (CLIP-G), optionally ``text_encoder_3/`` + ``tokenizer_3/`` (T5), ``scheduler/``). Only the
scheduler's *config* is read; the time grid is computed here and integrated by ``omnidit.sampling``.

What is reproduced from ``diffusers.StableDiffusion3Pipeline`` (see tests/test_sd3_pipeline.py):

- prompts: the penultimate hidden states (``hidden_states[-2]``) of both CLIPTextModelWithProjection, padded to
  the first CLIP tokenizer's ``model_max_length`` (no attention mask), concatenated along features and
  zero-padded to T5's width, then concatenated along the sequence with T5's states ("max_length" padding to
  ``max_sequence_length``; zeros when the folder has no T5). pooled = cat(CLIP-L text_embeds, CLIP-G text_embeds);
- guidance: classifier-free, the negative prompt "" (or ``negative_prompt``), only when ``guidance > 1``;
- latents: (B, C, H/f, W/f), patchified by the transformer's patch size (``omnidit.tokens.patchify``);
- times: *not* omnidit's ``timestep_schedule``. diffusers' scheduler (no ``sigmas`` passed) spaces ``steps``
  points uniformly from 1 to its ``sigma_min`` (the last *training* sigma, 1/N shifted by the fixed shift, or
  1/N with dynamic shifting), shifts them, and appends 0. ``sd3_timesteps`` builds that grid; the shift is
  ``flux_schedule_shift``'s (fixed ``shift``, 3.0 for SD3, or exp(mu) with dynamic shifting);
- decode: ``latents / scaling_factor + shift_factor`` through the VAE (``omnidit.codecs.VAECodec``).

Noise: as in ``omnidit.pipelines.flux``, the whole batch is one ``torch.randn`` from
``torch.Generator("cpu").manual_seed(seed)`` in the text encoders' dtype, so a seed gives diffusers' image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from omnidit.condition import Condition
from omnidit.convert.sd3 import load_sd3_transformer
from omnidit.errors import OmniditError
from omnidit.flow import shift_timesteps
from omnidit.model.mmdit import MMDiT, MMDiTConfig
from omnidit.pipelines.flux import SCHEDULE_DEFAULTS, diffusers_noise, flux_schedule_shift
from omnidit.sampling import SAMPLERS, classifier_free_guidance
from omnidit.tokens import check_image_size, image_position_ids, patchify, unpatchify

_HINT = ("pass a local diffusers Stable Diffusion 3 pipeline folder (model_index.json, transformer/, vae/, "
         "text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/, [text_encoder_3/, tokenizer_3/,] scheduler/)")
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
# StableDiffusion3Pipeline's calculate_shift fallbacks differ from Flux's in max_shift.
SD3_SCHEDULE_DEFAULTS = {**SCHEDULE_DEFAULTS, "max_shift": 1.16, "num_train_timesteps": 1000}


def sd3_timesteps(scheduler_config: dict, steps: int, image_seq_len: int) -> Tensor:
    """The sigmas of ``StableDiffusion3Pipeline`` (steps + 1,) float32, from 1 down to 0."""
    if steps < 1:
        raise OmniditError(f"steps must be at least 1, got {steps}")
    c = {**SD3_SCHEDULE_DEFAULTS, **scheduler_config}
    shift = flux_schedule_shift(c, image_seq_len)  # checks unsupported options
    n_train = int(c["num_train_timesteps"])
    # The scheduler's sigma_min: its last training sigma (float32), shifted at init unless dynamic.
    s_min = torch.tensor(1.0, dtype=torch.float32) / n_train
    if not c["use_dynamic_shifting"]:
        s_min = shift_timesteps(s_min, float(c["shift"]))
    base = torch.linspace(1.0, float(s_min.item()), steps, dtype=torch.float64)
    ts = shift_timesteps(base, shift).float()
    return torch.cat([ts, ts.new_zeros(1)])


@dataclass
class SD3PipelineOmnidit:
    """Text encoders + MMDiT + VAE of an SD3 pipeline folder; ``generate`` returns images in [-1, 1]."""

    model: MMDiT
    model_config: MMDiTConfig
    codec: object  # omnidit.codecs.VAECodec
    clip_l: object  # transformers.CLIPTextModelWithProjection
    clip_l_tokenizer: object
    clip_g: object  # transformers.CLIPTextModelWithProjection
    clip_g_tokenizer: object
    t5: object | None  # transformers.T5EncoderModel, or None (SD3 without T5: zeros)
    t5_tokenizer: object | None
    scheduler_config: dict
    sample_size: int = 128  # the transformer config's sample_size: default resolution in latent pixels
    device: torch.device = torch.device("cpu")

    @property
    def vae_scale_factor(self) -> int:
        return self.codec.downsample

    @property
    def text_dtype(self) -> torch.dtype:
        return (self.t5 or self.clip_l).dtype

    def _clip(self, encoder, tokenizer, prompts: list[str]) -> tuple[Tensor, Tensor]:
        ids = tokenizer(prompts, padding="max_length", max_length=self.clip_l_tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        out = encoder(ids.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2].to(self.clip_l.dtype), out[0]

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str], max_sequence_length: int = 256) -> Condition:
        """Condition(txt = [CLIP-L|CLIP-G|0 ; T5] (B, 77 + max_sequence_length, C), pooled = [L|G] (B, P))."""
        if max_sequence_length > 512:
            raise OmniditError(f"max_sequence_length {max_sequence_length} exceeds SD3's 512")
        states_l, pooled_l = self._clip(self.clip_l, self.clip_l_tokenizer, prompts)
        states_g, pooled_g = self._clip(self.clip_g, self.clip_g_tokenizer, prompts)
        if self.t5 is not None:
            ids = self.t5_tokenizer(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                                    add_special_tokens=True, return_tensors="pt").input_ids
            t5 = self.t5(ids.to(self.device))[0].to(self.t5.dtype)
        else:
            t5 = torch.zeros(len(prompts), max_sequence_length, self.model_config.context_dim, device=self.device,
                             dtype=self.clip_l.dtype)
        clip = torch.cat([states_l, states_g], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Condition(txt=torch.cat([clip, t5], dim=-2), pooled=torch.cat([pooled_l, pooled_g], dim=-1))

    def initial_noise(self, batch: int, latent_h: int, latent_w: int, seed: int) -> Tensor:
        """diffusers' draw (see module docs): (B, C, h, w) in the text encoders' dtype."""
        return diffusers_noise((batch, self.model_config.in_channels, latent_h, latent_w), seed, self.text_dtype)

    @torch.inference_mode()
    def generate(self, prompt: Sequence[str] | str, width: int | None = None, height: int | None = None,
                 steps: int = 28, guidance: float = 7.0, seed: int = 0, negative_prompt: str | Sequence[str] = "",
                 max_sequence_length: int = 256, sampler: str = "euler", progress: bool = False) -> Tensor:
        """One image per prompt: (B, 3, height, width) float32 in [-1, 1] on the CPU.

        width / height default to ``sample_size`` x the VAE factor (1024 for SD3) and must be multiples of
        patch size x the VAE factor. ``guidance`` <= 1 runs without classifier-free guidance (as diffusers).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not isinstance(p, str) for p in prompts):
            raise OmniditError("generate() needs a non-empty list of prompt strings")
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise OmniditError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if sampler not in SAMPLERS:
            raise OmniditError(f"unknown sampler '{sampler}'", hint=f"choose one of {', '.join(SAMPLERS)}")
        f, mc = self.vae_scale_factor, self.model_config
        p = mc.patch_size
        width, height = width or self.sample_size * f, height or self.sample_size * f
        check_image_size(height, width, p * f)
        lh, lw = height // f, width // f
        param = next(self.model.parameters())
        cond = self.encode_prompts(prompts, max_sequence_length).to(self.device, param.dtype)
        ids = image_position_ids(lh // p, lw // p, len(mc.axes_dim), device=self.device)
        noise = patchify(self.initial_noise(len(prompts), lh, lw, seed), p).to(self.device, torch.float32)
        ts = sd3_timesteps(self.scheduler_config, steps, noise.shape[1]).to(self.device)

        def model_fn(x: Tensor, t: Tensor, c: Condition) -> Tensor:  # latents stay float32 between steps
            return self.model(x.to(param.dtype), ids, t, c).float()

        if guidance > 1:
            null = self.encode_prompts(negatives, max_sequence_length).to(self.device, param.dtype)
            velocity = classifier_free_guidance(model_fn, cond, null, float(guidance))
        else:
            def velocity(x: Tensor, t: Tensor) -> Tensor:
                return model_fn(x, t, cond)

        x = SAMPLERS[sampler](velocity, noise, ts, progress=progress)
        images = self.codec.decode(unpatchify(x, lh, lw, p))
        return images.clamp(-1, 1).float().cpu()


def load_sd3_pipeline(folder: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype | str | None = None) -> SD3PipelineOmnidit:
    """Load a local diffusers Stable Diffusion 3 / 3.5 pipeline folder (nothing is downloaded).

    ``dtype``: one dtype for every component; None means float32. A folder without ``text_encoder_3/`` runs
    with zero T5 states, as diffusers does.
    """
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    from omnidit.codecs import VAECodec, resolve_dtype
    from omnidit.config import read_json
    from omnidit.text import quiet_transformers

    folder = Path(folder).expanduser().resolve()
    if not (folder / "model_index.json").is_file():
        raise OmniditError(f"no model_index.json in {folder}", hint=_HINT)
    missing = [s for s in SUBFOLDERS if not (folder / s).is_dir()]
    if missing:
        raise OmniditError(f"the SD3 pipeline folder {folder} has no '{missing[0]}/'", hint=_HINT)
    dtype = torch.float32 if dtype is None else resolve_dtype(dtype)
    device = torch.device(device)
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json", "scheduler config")
    sd3_timesteps(scheduler_config, 1, 256)  # fail early on an unsupported schedule
    transformer_config = read_json(folder / "transformer" / "config.json", "transformer config")
    model, config = load_sd3_transformer(folder / "transformer", dtype=dtype, device=device)
    codec = VAECodec(folder / "vae", device=device, dtype=dtype)
    if codec.channels != config.in_channels:
        raise OmniditError(f"the VAE has {codec.channels} latent channels but the transformer reads "
                           f"{config.in_channels}", hint=_HINT)
    has_t5 = (folder / "text_encoder_3").is_dir()
    with quiet_transformers():
        try:
            tok_l = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
            tok_g = AutoTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True)
            clip_l = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder", local_files_only=True,
                                                                 dtype=dtype)
            clip_g = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", local_files_only=True,
                                                                 dtype=dtype)
            t5 = t5_tok = None
            if has_t5:
                t5_tok = AutoTokenizer.from_pretrained(folder / "tokenizer_3", local_files_only=True)
                t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_3", local_files_only=True, dtype=dtype)
        except Exception as e:  # OSError, ValueError, safetensors errors ... all mean "bad folder"
            raise OmniditError(f"cannot load the text encoders in {folder}: {e}", hint=_HINT) from e
    for m in (clip_l, clip_g, t5):
        if m is not None:
            m.to(device).eval().requires_grad_(False)
    return SD3PipelineOmnidit(model=model, model_config=config, codec=codec, clip_l=clip_l, clip_l_tokenizer=tok_l,
                              clip_g=clip_g, clip_g_tokenizer=tok_g, t5=t5, t5_tokenizer=t5_tok,
                              scheduler_config=scheduler_config,
                              sample_size=int(transformer_config.get("sample_size", 128)), device=device)
