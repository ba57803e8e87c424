"""What the trainer draws for a step: which items (a function of the step), and every random draw of the *global*
batch (times, noise, tokens given as clean context) from the run's seeded generator, so that runs resume exactly
and N processes follow one; and the counterfactual partners of a batch's rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from omnidit.condition import Condition
from omnidit.config import Config
from omnidit.data import counterfactual_batch, counterfactual_streams
from omnidit.data.shapes import object_caption
from omnidit.errors import OmniditError
from omnidit.flow import (
    box_token_span,
    draw_given_regions,
    draw_given_tubelets,
    given_token_times,
    sample_timesteps,
    stream_timesteps,
    token_times_with_context,
)
from omnidit.tokens import StreamLayout, audio_frame_size, audio_tubelets

EMPTY_SPOT_STEPS = 33  # places per axis tried for train.region_empty's box


def batch_indices(step: int, batch_size: int, num_samples: int | None, seed: int) -> list[int]:
    """Dataset indices of the (global) batch at ``step``: the data position is a function of the step.

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


def _times(config: Config, n: int, generator: torch.Generator) -> Tensor:
    tc = config.train
    return sample_timesteps(n, tc.timesteps, tc.t_mean, tc.t_std, tc.t_shift, generator=generator)


def _given_tubelets(config: Config, batch: int, generator: torch.Generator) -> Tensor:
    """(batch, T / pt) bool: the tubelets of each clip given as clean context (train.given_p)."""
    count = config.data.frames // config.model.temporal_patch
    return draw_given_tubelets(batch, count, config.train.given_p, generator)


def image_draws(config: Config, batch: int, num_tokens: int, grid: tuple[int, int], generator: torch.Generator,
                boxes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Times and noise for a batch of images or silent clips of ``num_tokens`` tokens on a token ``grid``
    (rows, columns): t (batch,), or (batch, N) when some tokens are given at t = 0 (the frame patterns of
    train.given_p, the regions of train.region_p, some of them the ``boxes`` (batch, 4) of an object each,
    train.region_objects); noise (batch, N, token features); and (batch,) bool, the samples whose generated
    region is their box in ``boxes`` (the object's, or the empty place it was moved to)."""
    tc, mc = config.train, config.model
    t = _times(config, batch, generator)
    noise = torch.randn((batch, num_tokens, mc.token_dim), generator=generator)
    on_box = torch.zeros(batch, dtype=torch.bool)
    if tc.given_p > 0:  # clips with some frames given as clean context
        t = token_times_with_context(t, _given_tubelets(config, batch, generator), num_tokens)
    if tc.region_p > 0:  # all but a rectangle given (mask-aware training for inpainting)
        tubelets = config.data.frames // mc.temporal_patch
        given, on_box = draw_given_regions(batch, tubelets, *grid, tc.region_p, generator, boxes, tc.region_objects)
        t = given_token_times(t, given)
    return t, noise, on_box


def stream_draws(config: Config, layout: StreamLayout, batch: int, generator: torch.Generator, audio_codec
                 ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per-token times {name: (batch, N_s)} and noise {name: (batch, N_s, D_s)} for a batch of several streams:
    one time per sample, or one per stream (train.stream_independent_p); then one whole stream given at t = 0
    (train.stream_given_p); then the frame patterns of train.given_p over the picture and, over the same
    stretches of time, the sound (a clip extended with its sound)."""
    tc, dc, mc, g = config.train, config.data, config.model, generator
    names, tokens = layout.names, layout.tokens
    times = stream_timesteps(_times(config, batch, g), names, tc.stream_independent_p,
                             lambda n: _times(config, n, g), g)
    per_token = {n: times[n][:, None].expand(-1, tokens[n]).clone() for n in names}
    if len(names) > 1 and tc.stream_given_p > 0:
        whole = torch.rand(batch, generator=g) < tc.stream_given_p
        which = torch.randint(0, len(names), (batch,), generator=g)
        for i, n in enumerate(names):
            per_token[n][whole & (which == i)] = 0.0
    count = dc.frames // mc.temporal_patch
    if tc.given_p > 0 and "img" in names and count > 1:
        tubelets = _given_tubelets(config, batch, g)  # (batch, T / pt)
        per_token["img"][tubelets.repeat_interleave(tokens["img"] // count, dim=1)] = 0.0
        if "audio" in names:
            frame = audio_frame_size(mc, audio_codec)
            where = audio_tubelets(tokens["audio"] * frame, frame, dc.sample_rate, dc.fps, mc.temporal_patch, count)
            per_token["audio"][tubelets[:, where]] = 0.0
    noise = {n: torch.randn((batch, tokens[n], layout.features[n]), generator=g) for n in names}
    return per_token, noise


class CounterfactualPairs(NamedTuple):
    """Arguments of flow.counterfactual_loss for R rows and their partners, plus the weight ``scale``
    (0 for a stand-in when the batch has no pairs). x0, x0_cf, noise: (R, N, D), or {name: (R, N_s, D_s)} for
    several streams; t: (R,)."""

    x0: Tensor | dict[str, Tensor]
    x0_cf: Tensor | dict[str, Tensor]
    cond: Condition
    cond_cf: Condition
    t: Tensor
    noise: Tensor | dict[str, Tensor]
    scale: float


def counterfactual_pairs(dataset, indices: list[int], x0: Tensor | dict[str, Tensor], cond: Condition,
                         labels: Tensor, t: Tensor, noise: Tensor | dict[str, Tensor], tokens: Callable,
                         condition: Callable[[list[str], Tensor], Condition],
                         device: torch.device) -> CounterfactualPairs:
    """The rows of this batch (``indices`` of ``dataset``) that have a counterfactual partner, for
    flow.counterfactual_loss.

    x0: (b, N, D) and cond (the batch's encoded captions) on the device; t: (b,), noise: (b, N, D) on the CPU;
    ``tokens``: images or clips to the model's tokens, as x0's (the codec, then the patches); ``condition``:
    captions and labels to a Condition. Several streams (sound): x0 and noise are {name: ...} and ``tokens``
    takes the partners' data by stream ({"audio": (R, 1, S)}, say). Only the partners' captions are encoded here.
    When no row has a partner, a stand-in (row 0 paired with itself) with scale 0: every rank still runs the
    pass, so that the gradient all-reduce sees the same passes everywhere.
    """
    streams = isinstance(x0, dict)
    rows, data_cf, captions_cf = (counterfactual_streams if streams else counterfactual_batch)(dataset, indices)
    at = torch.tensor(rows or [0])  # CPU indices: they index CPU and device tensors alike

    def take(x: Tensor | dict[str, Tensor], to_device: bool = False):
        if isinstance(x, dict):
            return {n: take(v, to_device) for n, v in x.items()}
        return x[at].to(device) if to_device else x[at]

    mine = cond.rows(at.to(device))
    if rows:
        if streams and set(data_cf) != set(x0):
            raise OmniditError(f"the counterfactual partners of '{type(dataset).__name__}' have the streams "
                               f"{sorted(data_cf)}, its items {sorted(x0)}",
                               hint="give every partner the streams of its item, or set "
                                    "train.counterfactual_weight=0")
        x0_cf = tokens(data_cf)
        cond_cf = condition(captions_cf, labels[at])
    else:
        x0_cf, cond_cf = take(x0), mine
    return CounterfactualPairs(take(x0), x0_cf, mine, cond_cf, t[at].to(device), take(noise, True),
                               1.0 if rows else 0.0)


def object_loss_weights(dataset, indices: Sequence[int], weight: float, shapes: Sequence[str] = ()) -> Tensor:
    """(b, C, H, W) for images, (b, C, T, H, W) for clips: ``weight`` on the pixels that an object of these shapes
    items covers (an object of ``shapes``; () = any) and on those next to them in the same frame (the mask grown by
    one pixel, so that a stray pixel drawn beside an edge is weighed as the edge), 1 elsewhere."""
    masks = torch.stack([dataset.object_mask(i, shapes or None) for i in indices])[:, None].float()
    image = masks.dim() == 4  # (b, 1, H, W): weighed as a clip of one frame
    masks = masks[:, :, None] if image else masks  # (b, 1, T, H, W)
    near = torch.nn.functional.max_pool3d(masks, (1, 3, 3), stride=1, padding=(0, 1, 1))
    weights = (1 + (weight - 1) * near).expand(-1, dataset.channels, -1, -1, -1)
    return weights[:, :, 0] if image else weights


def shows_shapes(dataset, indices: Sequence[int], shapes: Sequence[str]) -> Tensor:
    """(len(indices),) bool: the items of a shapes data set whose scene has an object of one of ``shapes``."""
    return torch.tensor([any(o.shape in shapes for o in dataset.scene(int(i)).objects) for i in indices],
                        dtype=torch.bool)


def object_boxes(dataset, indices: Sequence[int], generator: torch.Generator, grid: tuple[int, int] | None = None,
                 empty_p: float = 0.0) -> tuple[Tensor, list[str], Tensor]:
    """One object of each shapes scene, drawn from ``generator`` (train.region_objects): its box (len(indices), 4)
    (x0, y0, x1, y1 fractions), its own caption ("a red circle", train.region_caption), and (len(indices),) bool,
    the rows whose box was moved to an empty place (train.region_empty, with probability ``empty_p``): a box of
    the object's size whose region on the token ``grid`` (rows, columns), grown as object regions are, meets no
    object's, so that the region to generate is background, as the hole that a moved object leaves."""
    scenes = [dataset.scene(int(i)) for i in indices]
    which = torch.randint(0, 2**31 - 1, (len(scenes),), generator=generator)
    objects = [s.objects[int(k) % len(s.objects)] for s, k in zip(scenes, which)]
    boxes = torch.tensor([o.box for o in objects], dtype=torch.float32)
    empty = torch.zeros(len(scenes), dtype=torch.bool)
    if empty_p > 0:  # drawn only then, so that runs without it keep their draws
        if grid is None:
            raise ValueError("object_boxes needs the token grid to find empty places")
        moved = torch.rand(len(scenes), generator=generator) < empty_p
        pick = torch.rand(len(scenes), generator=generator)
        for i in moved.nonzero().flatten().tolist():
            taken = torch.tensor([o.box for o in scenes[i].objects], dtype=torch.float32)
            place = _empty_place(boxes[i, 2:] - boxes[i, :2], taken, grid, float(pick[i]))
            if place is not None:  # a crowded scene keeps its object's box
                boxes[i], empty[i] = place, True
    return boxes, [object_caption(o) for o in objects], empty


def _empty_place(size: Tensor, taken: Tensor, grid: tuple[int, int], pick: float) -> Tensor | None:
    """A box (4,) of ``size`` (2,) (width, height fractions) whose region on the token ``grid`` (rows, columns),
    grown as object regions are, meets none of the ``taken`` (K, 4) boxes' regions: the free place that ``pick``
    in [0, 1) chooses among EMPTY_SPOT_STEPS x EMPTY_SPOT_STEPS, or None if there is none."""
    steps = torch.linspace(0, 1, EMPTY_SPOT_STEPS)
    starts = torch.stack(torch.meshgrid(steps, steps, indexing="ij"), -1).reshape(-1, 2) * (1 - size)  # (S * S, 2)
    apart = []  # (S * S, K) per axis: the two regions' token spans do not meet along it
    for axis, cells in ((0, grid[1]), (1, grid[0])):  # x over the columns, y over the rows
        lo, hi = box_token_span(starts[:, axis], starts[:, axis] + size[axis], cells)
        taken_lo, taken_hi = box_token_span(taken[:, axis], taken[:, axis + 2], cells)
        apart.append((hi[:, None] <= taken_lo[None]) | (taken_hi[None] <= lo[:, None]))
    free = (apart[0] | apart[1]).all(1).nonzero().flatten()  # apart from every object along x or along y
    if not len(free):
        return None
    at = starts[int(free[int(pick * len(free))])]
    return torch.cat([at, at + size])
