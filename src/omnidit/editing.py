"""Flow inversion and prompt editing: take an image back to its noise with the model's own ODE, then sample
from that noise under another prompt, injecting the inversion's attention values so the rest stays in place.

- **Inversion** integrates the velocity field from t = 0 (the image) to t = 1 (noise) under the source prompt
  with the second-order midpoint rule (``sampling.midpoint``, RF-Solver's update), unguided by default: the
  same grid run back down reconstructs the image closely at moderate step counts (tests measure the PSNR).
- **Editing** (RF-Solver-Edit's and FreeFlux's value injection): while inverting, each chosen single-stream
  block's attention values V of the image tokens are kept per time; sampling back under the target prompt, the
  same blocks take those values instead of their own at the times t >= ``inject_until``. V carries what is
  where; the queries and keys, which read the new prompt, decide what changes.

Values are captured with forward hooks on the blocks' fused input projections (``linear1``), so the model
code knows nothing of editing. Memory: one (B, N, D) tensor per injected block and time.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from omnidit.errors import OmniditError
from omnidit.sampling import classifier_free_guidance, midpoint, timestep_schedule
from omnidit.tokens import video_patchify, video_position_ids, video_unpatchify

DEFAULT_INJECT_UNTIL = 0.9  # the first, noisiest tenth of the trajectory, where layout is decided (chosen on
# edit-suite scenes of another seed than the suite's: docs/editing.md)


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
    return classifier_free_guidance(model_fn, cond, null, cfg)


def _tokens_and_ids(pipe, image: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
    mc = pipe.model.config
    if pipe.config.data.frames > 1 or mc.extra_streams or (pipe.codec is not None and pipe.codec.downsample != 1):
        raise OmniditError("inversion and editing work on pixel-space image models",
                           hint="use an image model such as the shipped shapes model")
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[1] != mc.in_channels:
        raise OmniditError(f"the image must be (B, {mc.in_channels}, H, W) in [-1, 1], got {tuple(image.shape)}")
    h, w = image.shape[-2:]
    if h % mc.patch_size or w % mc.patch_size:
        raise OmniditError(f"the image is {w}x{h}, which the model's {mc.patch_size}-pixel patches do not divide",
                           hint=f"crop or pad it to a multiple of {mc.patch_size} pixels")
    tokens = video_patchify(image.float().to(pipe.device)[:, :, None], mc.patch_size)
    ids = video_position_ids(1, h // mc.patch_size, w // mc.patch_size, 1.0, 1, len(mc.axes_dim), pipe.device)
    return tokens, ids, (h, w)


@torch.inference_mode()
def invert(pipe, image: Tensor, prompt: str, steps: int = 30, cfg: float = 1.0, shift: float | None = None,
           progress: bool = False) -> Tensor:
    """The noise tokens (B, N, D) that the model's ODE under ``prompt`` carries ``image`` (B, C, H, W) in [-1, 1]
    to; sampling them back down the same grid with ``sampling.midpoint`` reconstructs the image."""
    tokens, ids, _ = _tokens_and_ids(pipe, image)
    ts = timestep_schedule(steps, pipe.config.sample.shift if shift is None else shift, pipe.device).flip(0)
    with pipe.precision():
        return midpoint(_velocity(pipe, [prompt] * len(tokens), cfg, ids, None), tokens, ts, progress=progress)


@torch.inference_mode()
def edit(pipe, image: Tensor, source: str, target: str, steps: int = 30, cfg: float = 1.0,
         invert_cfg: float = 1.0, inject_blocks: Sequence[int] | None = None,
         inject_until: float = DEFAULT_INJECT_UNTIL, shift: float | None = None, progress: bool = False) -> Tensor:
    """``image`` (B or 1, C, H, W) in [-1, 1], described by ``source``, changed to match ``target``: (B, C, H, W).

    Inverts under ``source`` (guidance ``invert_cfg``), then samples back under ``target`` (guidance ``cfg``)
    with the inversion's values injected into single-stream blocks ``inject_blocks`` (default all) at
    t >= ``inject_until`` (1 = never, 0 = all the way). ``target == source`` with ``inject_until`` 0
    reconstructs the image.
    """
    if not 0.0 <= inject_until <= 1.0:
        raise OmniditError(f"inject_until must lie in [0, 1], got {inject_until}",
                           hint="0.9 injects over the noisiest tenth of the steps; 1 turns injection off")
    tokens, ids, (h, w) = _tokens_and_ids(pipe, image)
    mc = pipe.model.config
    blocks = range(len(pipe.model.single_blocks)) if inject_blocks is None else inject_blocks
    bank = ValueBank(pipe.model, blocks, tokens.shape[1], len(tokens))
    ts = timestep_schedule(steps, pipe.config.sample.shift if shift is None else shift, pipe.device)
    with bank.hooked(), pipe.precision():
        bank.mode = "record"
        noise = midpoint(_velocity(pipe, [source] * len(tokens), invert_cfg, ids, bank), tokens, ts.flip(0),
                         progress=progress)
        bank.mode, bank.inject_until = "inject", inject_until
        x = midpoint(_velocity(pipe, [target] * len(tokens), cfg, ids, bank), noise, ts, progress=progress)
    return video_unpatchify(x, 1, h, w, mc.patch_size)[:, :, 0].clamp(-1, 1).float().cpu()
