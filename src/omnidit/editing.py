"""Flow inversion and prompt editing: take an image back to its noise with the model's own ODE, then sample
from that noise under another prompt, injecting the inversion's attention values so the rest stays in place.

- **Inversion** integrates the velocity field from t = 0 (the image) to t = 1 (noise) under the source prompt
  with the second-order midpoint rule (``sampling.midpoint``, RF-Solver's update), unguided by default: the
  same grid run back down reconstructs the image closely at moderate step counts (tests measure the PSNR).
- **Editing** (RF-Solver-Edit's and FreeFlux's value injection): while inverting, each chosen single-stream
  block's attention values V of the image tokens are kept per time; sampling back under the target prompt, the
  same blocks take those values instead of their own at the times t >= ``inject_until``. V carries what is
  where; the queries and keys, which read the new prompt, decide what changes.

- **Where to edit** (DiffEdit's mask, Couairon et al. 2022, "DiffEdit: Diffusion-based semantic image editing
  with mask guidance", sec. 3.1): the image is noised to a few times with fixed noise and the velocities under
  both prompts are compared; the tokens where they differ most (above a fraction of the largest difference,
  grown by one token) are the ones the edit may change. The other tokens follow their straight path from the
  inverted noise to the input (``sampling.follow_noised_path``, the blend of inpainting), so the model sees them
  in place at every step, and their pixels come back exactly. A user's own mask can replace the computed one.

Values are captured with forward hooks on the blocks' fused input projections (``linear1``), so the model
code knows nothing of editing. Memory: one (B, N, D) tensor per injected block and time.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from omnidit.errors import OmniditError
from omnidit.inpaint import token_mask
from omnidit.sampling import (
    classifier_free_guidance,
    follow_noised_path,
    initial_noise,
    midpoint,
    timestep_schedule,
)
from omnidit.selection import best_candidates, candidate_seeds
from omnidit.tokens import video_patchify, video_position_ids, video_unpatchify
from omnidit.validate import check_memory

DEFAULT_INJECT_UNTIL = 0.9  # the first, noisiest tenth of the trajectory, where layout is decided (chosen on
# edit-suite scenes of another seed than the suite's: docs/editing.md)
MASK_TIMES = (0.5,)  # noise levels at which the two prompts' velocities are compared
MASK_DRAWS = 4  # noise draws per time (fixed seed MASK_NOISE_SEED, so a mask depends only on image and prompts)
MASK_NOISE_SEED = 0
MASK_THRESHOLD = 0.35  # of the largest difference; then grown by MASK_GROW tokens on every side
MASK_GROW = 1
EDIT_CANDIDATES = 4  # best of 4 edits under the target prompt (threshold and count chosen on edit scenes of data
# seed 1234, not the suite's: docs/editing.md)


class ValueBank:
    """Attention values of the image tokens per (block, time): recorded during inversion, replayed in editing."""

    def __init__(self, model, blocks: Sequence[int], n_tokens: int, batch: int) -> None:
        depth = len(model.single_blocks)
        if any(not 0 <= b < depth for b in blocks):
            raise OmniditError(f"value injection can only use the model's single-stream blocks 0 to {depth - 1}, "
                               f"got {list(blocks)}", hint=f"e.g. --inject-blocks {' '.join(map(str, range(depth)))}")
        self.model, self.blocks, self.n_tokens, self.batch = model, list(blocks), n_tokens, batch
        self.saved: dict[int, dict[float, Tensor]] = {b: {} for b in self.blocks}  # block -> time -> values
        self.mode, self.t, self.inject_until = "off", 0.0, 1.0

    def _hook(self, index: int):
        dim = self.model.config.hidden_size

        def hook(module, args, out: Tensor):
            values = out[:, :self.n_tokens, 2 * dim:3 * dim]  # linear1 -> (q, k, v, mlp) per token; image first
            if self.mode == "record":  # the conditional rows (the first B of a guided batch)
                self.saved[index][round(self.t, 6)] = values[:self.batch].detach().clone()
            elif self.mode == "inject" and self.inject_until < 1.0 and self.t >= self.inject_until:
                stored = self._nearest(index)
                out = out.clone()
                out[:, :self.n_tokens, 2 * dim:3 * dim] = stored.repeat(out.shape[0] // stored.shape[0], 1, 1)
            return out

        return hook

    def _nearest(self, index: int) -> Tensor:
        """The values recorded at the time nearest the current one (the grids share every time but t = 1)."""
        saved = self.saved[index]
        return saved[min(saved, key=lambda t: abs(t - self.t))]

    @contextmanager
    def hooked(self):
        handles = [self.model.single_blocks[b].linear1.register_forward_hook(self._hook(b)) for b in self.blocks]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def _velocity(pipe, prompts: list[str], cfg: float, ids: Tensor, bank: ValueBank | None):
    """The (guided when cfg != 1) velocity under ``prompts`` that tells the value bank the current time."""
    cond, null = pipe.conditions(prompts, guidance=cfg)

    def model_fn(x: Tensor, t: Tensor, c) -> Tensor:
        if bank is not None:
            bank.t = float(t)
        return pipe.model(x, ids, t, c)

    if cfg == 1.0 or pipe.model.config.guidance_embed:  # a model that takes the scale as an input: one pass
        cond = cond.without_full_mask()
        return lambda x, t: model_fn(x, t, cond)
    if pipe.uncond_model is not None:  # the value bank's hooks sit on pipe.model alone
        raise OmniditError("editing does not follow sample.uncond_base (guidance against a LoRA run's base) yet",
                           hint="edit with a copy of the run whose config.json sets sample.uncond_base to false")
    return classifier_free_guidance(model_fn, cond, null, cfg)


def _tokens_and_ids(pipe, media: Tensor, fps: float | None = None) -> tuple[Tensor, Tensor, tuple[int, int, int]]:
    """The tokens (B, N, D) of an image (B, C, H, W) or, for a video model, a clip (B, C, T, H, W) at ``fps``
    (default the model's), their position ids (1, N, axes) and (T, H, W) (T = 1 for an image)."""
    mc = pipe.model.config
    if mc.extra_streams or (pipe.codec is not None and pipe.codec.downsample != 1):
        raise OmniditError("inversion and editing work on pixel-space image and video models",
                           hint="use an image model such as shapes, or a video model such as shapes-video")
    media = media[None] if media.dim() == 3 else media
    media = media[:, :, None] if media.dim() == 4 else media
    if media.dim() != 5 or media.shape[1] != mc.in_channels:
        raise OmniditError(f"give an image (B, {mc.in_channels}, H, W) or a clip (B, {mc.in_channels}, T, H, W) in "
                           f"[-1, 1], got {tuple(media.shape)}")
    frames, h, w = media.shape[2:]
    if frames > 1 and pipe.config.data.frames == 1:
        raise OmniditError(f"a clip of {frames} frames, and this model makes images",
                           hint="edit a clip with a video model (shapes-video), or one frame with this one")
    if h % mc.patch_size or w % mc.patch_size:
        raise OmniditError(f"the image is {w}x{h}, which the model's {mc.patch_size}-pixel patches do not divide",
                           hint=f"crop or pad it to a multiple of {mc.patch_size} pixels")
    if frames % mc.temporal_patch:
        raise OmniditError(f"{frames} frames, which the model's {mc.temporal_patch}-frame tubelets do not divide",
                           hint=f"give a multiple of {mc.temporal_patch} frames")
    tokens = video_patchify(media.float().to(pipe.device), mc.patch_size, mc.temporal_patch)
    ids = video_position_ids(frames, h // mc.patch_size, w // mc.patch_size, fps or pipe.config.data.fps,
                             mc.temporal_patch, len(mc.axes_dim), pipe.device)
    return tokens, ids, (frames, h, w)


@torch.inference_mode()
def change_mask(pipe, image: Tensor, source: str, target: str, times: Sequence[float] = MASK_TIMES,
                draws: int = MASK_DRAWS, threshold: float = MASK_THRESHOLD, grow: int = MASK_GROW,
                fps: float | None = None) -> Tensor:
    """(B, H, W) bool for an image (B, C, H, W), (B, T, H, W) for a clip (B, C, T, H, W): the pixels (whole tokens)
    where ``target`` asks for a change from ``source``: the tokens whose unguided velocities under the two prompts
    differ by more than ``threshold`` times the largest difference in the image or clip, averaged over ``times`` x
    ``draws`` noisings, grown by ``grow`` tokens within each frame."""
    tokens, ids, (frames, h, w) = _tokens_and_ids(pipe, image, fps)
    p, pt = pipe.model.config.patch_size, pipe.model.config.temporal_patch
    gen = torch.Generator("cpu").manual_seed(MASK_NOISE_SEED)
    with pipe.precision():
        conds = [pipe.conditions([text] * len(tokens), guidance=1.0)[0].without_full_mask()
                 for text in (source, target)]
        diff = torch.zeros(tokens.shape[:2], device=tokens.device)
        for t in times:
            for _ in range(draws):
                eps = torch.randn(tokens.shape[1:], generator=gen).to(tokens.device, tokens.dtype)
                x = (1 - t) * tokens + t * eps
                ts = torch.full((len(tokens),), float(t), device=tokens.device)
                diff += (pipe.model(x, ids, ts, conds[1]) - pipe.model(x, ids, ts, conds[0])).float().abs().mean(-1)
    grid = diff.view(len(tokens), 1, frames // pt, h // p, w // p)
    chosen = grid > threshold * grid.amax(dim=(2, 3, 4), keepdim=True).clamp_min(1e-12)
    if grow:
        chosen = torch.nn.functional.max_pool3d(chosen.float(), (1, 2 * grow + 1, 2 * grow + 1), stride=1,
                                                padding=(0, grow, grow)) > 0
    pixels = chosen[:, 0].repeat_interleave(pt, 1).repeat_interleave(p, 2).repeat_interleave(p, 3).cpu()
    return pixels if image.dim() == 5 else pixels[:, 0]


@torch.inference_mode()
def invert(pipe, image: Tensor, prompt: str, steps: int = 30, cfg: float = 1.0, shift: float | None = None,
           progress: bool = False, fps: float | None = None) -> Tensor:
    """The noise tokens (B, N, D) that the model's ODE under ``prompt`` carries ``image`` (B, C, H, W) in [-1, 1]
    (or a clip (B, C, T, H, W) at ``fps``, video models) to; sampling them back down the same grid with
    ``sampling.midpoint`` reconstructs it."""
    tokens, ids, _ = _tokens_and_ids(pipe, image, fps)
    ts = timestep_schedule(steps, pipe.config.sample.shift if shift is None else shift, pipe.device).flip(0)
    with pipe.precision():
        return midpoint(_velocity(pipe, [prompt] * len(tokens), cfg, ids, None), tokens, ts, progress=progress)


@torch.inference_mode()
def edit(pipe, image: Tensor, source: str, target: str, steps: int = 30, cfg: float = 1.0,
         invert_cfg: float = 1.0, inject_blocks: Sequence[int] | None = None,
         inject_until: float = DEFAULT_INJECT_UNTIL, shift: float | None = None, progress: bool = False,
         mask: Tensor | str | None = "auto", candidates: int | None = None, seed: int = 0,
         fps: float | None = None) -> Tensor:
    """``image`` (B or 1, C, H, W) in [-1, 1], described by ``source``, changed to match ``target``: (B, C, H, W).
    A video model edits a clip (B or 1, C, T, H, W) at ``fps`` (default the model's) the same way: (B, C, T, H, W).

    Inverts under ``source`` (guidance ``invert_cfg``), then samples back under ``target`` (guidance ``cfg``)
    with the inversion's values injected into single-stream blocks ``inject_blocks`` (default all) at
    t >= ``inject_until`` (1 = never, 0 = all the way). ``target == source`` with ``inject_until`` 0
    reconstructs the image.

    ``mask``: where the edit may change the image: "auto" (``change_mask``), a (H, W) or (B, H, W) bool (True =
    may change; rounded up to whole tokens; for a clip (H, W) in every frame, (T, H, W) or (B, T, H, W)), or None
    (everywhere). Outside it the pixels come back exactly as given. ``candidates`` (default EDIT_CANDIDATES with a
    mask, 1 without): candidate 0 starts from the inverted noise, the others from fresh noise inside the mask
    (seeds ``selection.candidate_seeds(seed, N)``), and the one the model finds likeliest under ``target`` is kept
    (``selection.denoising_scores``).
    """
    if not 0.0 <= inject_until <= 1.0:
        raise OmniditError(f"inject_until must lie in [0, 1], got {inject_until}",
                           hint="0.9 injects over the noisiest tenth of the steps; 1 turns injection off")
    clip = image.dim() == 5
    image = image[None] if image.dim() == 3 else image
    tokens, ids, (frames, h, w) = _tokens_and_ids(pipe, image, fps)
    mc, batch = pipe.model.config, len(tokens)
    n = edit_candidates(candidates, mask is not None)
    blocks = range(len(pipe.model.single_blocks)) if inject_blocks is None else inject_blocks
    bank = ValueBank(pipe.model, blocks, tokens.shape[1], batch)
    # memory is checked before any model pass (the automatic mask below runs the model)
    settings = pipe.sampling_settings(steps=steps, cfg=cfg, candidates=n)
    bank_bytes = len(blocks) * (2 * steps + 1) * batch * tokens.shape[1] * mc.hidden_size * 4  # midpoint: 2 per step
    check_memory(bank_bytes + batch * pipe._bytes_per_sample(frames, w, h, settings), pipe.device,
                 f"editing {batch} {'clip' if clip else 'image'}{'s' if batch > 1 else ''} of {w}x{h}"
                 + (f" with {frames} frames" if clip else ""),
                 hint="edit fewer frames or images at once, or inject into fewer blocks (--inject-blocks)")
    if isinstance(mask, str):
        if mask != "auto":
            raise OmniditError(f"unknown edit mask '{mask}'", hint="give 'auto', a (H, W) bool mask or None")
        mask = change_mask(pipe, image, source, target, fps=fps)
        if not mask.any():
            raise OmniditError("the two prompts ask for no change the model can see (its velocities under them agree)",
                               hint="change the target prompt, or edit everywhere without a mask (--mask none)")
    if mask is not None:
        mask = _check_mask(mask, batch, frames, h, w, clip)  # (B, T, H, W)
        keep = ~torch.stack([token_mask(m, mc.patch_size, mc.temporal_patch) for m in mask]).to(pipe.device)
        keep = keep.repeat(n, 1)  # (nB, N), candidate-major
    ts = timestep_schedule(steps, pipe.config.sample.shift if shift is None else shift, pipe.device)
    with bank.hooked(), pipe.precision():
        bank.mode = "record"
        noise = midpoint(_velocity(pipe, [source] * batch, invert_cfg, ids, bank), tokens, ts.flip(0),
                         progress=progress)
        bank.mode, bank.inject_until = "inject", inject_until
        velocity = _velocity(pipe, [target] * (n * batch), cfg, ids, bank)  # candidate-major rows
        fresh = [initial_noise(noise.shape, k).to(noise.device, noise.dtype) for k in candidate_seeds(seed, n)[1:]]
        start = torch.cat([noise, *fresh])
        if mask is not None:  # the kept tokens travel straight from their inverted noise to the input
            velocity = follow_noised_path(velocity, keep, (noise - tokens).repeat(n, 1, 1))
            start = torch.where(keep[..., None], noise.repeat(n, 1, 1), start)
        x = midpoint(velocity, start, ts, progress=progress)
        if n > 1:
            bank.mode = "off"
            cond = pipe.conditions([target] * (n * batch), guidance=1.0)[0].without_full_mask()
            x = best_candidates(x, pipe.candidate_scores(x, ids, cond), n)
    result = video_unpatchify(x, frames, h, w, mc.patch_size, mc.temporal_patch).clamp(-1, 1).float().cpu()
    if mask is not None:  # (B, C, T, H, W)
        given = (image if clip else image[:, :, None]).float().cpu().clamp(-1, 1)
        result = torch.where(mask[:, None], result, given)
    return result if clip else result[:, :, 0]


def edit_candidates(candidates: int | None, masked: bool) -> int:
    """The number of edit candidates: ``candidates``, by default EDIT_CANDIDATES with a mask and 1 without."""
    n = (EDIT_CANDIDATES if masked else 1) if candidates is None else candidates
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise OmniditError(f"candidates must be a whole number >= 1, got {candidates!r}")
    if n > 1 and not masked:
        raise OmniditError(f"{n} edit candidates without a mask: they would differ nowhere",
                           hint="candidates differ inside the mask: give a mask (--mask auto) or one candidate")
    return n


def _check_mask(mask: Tensor, batch: int, frames: int, h: int, w: int, clip: bool) -> Tensor:
    """An edit mask -> (B, T, H, W) bool, or a one-line error: for an image (H, W) or (B, H, W); for a clip (H, W)
    in every frame, (T, H, W) or (B, T, H, W)."""
    if mask.dim() == 2:
        mask = mask[None, None]
    elif mask.dim() == 3:
        mask = mask[None] if clip else mask[:, None]
    shape = f"{frames} frames of {w}x{h}" if clip else f"{w}x{h}"
    if mask.dim() != 4 or mask.shape[1:] != (frames, h, w) and mask.shape[1:] != (1, h, w) \
            or mask.shape[0] not in (1, batch):
        raise OmniditError(f"the edit mask is {tuple(mask.shape)} but the {'clip' if clip else 'image'} is {shape}",
                           hint="give a mask of the image's size (True = may change)")
    if not mask.any():
        raise OmniditError("the edit mask selects no pixels, so nothing can change",
                           hint="mark the pixels that may change (white), or edit everywhere (--mask none, mask=None)")
    return mask.bool().cpu().expand(batch, frames, h, w)
