"""Layout boxes: phrases placed in boxes, through an adapter on an image MMDiT.

CreatiLayout's idea (a layout stream that attends jointly with the image in an MM-DiT) in GLIGEN's gated form:
each box, a phrase and (x0, y0, x1, y1) in fractions of the width and height (y down), becomes one layout
token, the phrase's pooled text vector and Fourier features of the box through a small MLP. After every block
of the model the image tokens attend over themselves and the layout tokens in the adapter's own attention (its
own norm, QKV, QK norms and output projection), and add the result to their residual. Rotary positions put
each layout token at its box's centre on the image's token grid, so that an image token reads its offset from
every box; the box's size is in the token's features. The output projections start at zero, so a new adapter
is the identity.

The adapter is a submodule of the model (``model.layout_adapter``, its weights ``layout_adapter.*``) that
works through forward hooks: the model's code knows nothing of layouts. A call whose ``Condition`` has no
layout fields runs the base model exactly; a sample whose layout has no boxes gets nothing added. Training
(omnidit.layout_train, ``train.layout_boxes``) freezes the base and trains the adapter alone.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from omnidit.condition import Condition
from omnidit.errors import OmniditError
from omnidit.model.layers import Linear, RMSNorm, layer_norm
from omnidit.model.math import attention, rope_rotations

ADAPTER = "layout_adapter"  # the submodule's name, and the prefix of its weights
FOURIER_FREQUENCIES = 8  # per box coordinate: sin and cos of 2^k * pi * x, k < 8 (GLIGEN's box embedding)


@dataclass(frozen=True)
class Box:
    """A phrase to draw inside (x0, y0, x1, y1), fractions of the image's width and height (y grows down)."""

    phrase: str
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def coords(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


def parse_box(values: Sequence[str]) -> Box:
    """A Box from the command line's ``--box PHRASE X0 Y0 X1 Y1``; a one-line error for anything else."""
    hint = 'e.g. --box "a red circle" 0.1 0.1 0.4 0.4 (fractions of the width and height, y down)'
    if len(values) != 5:
        raise OmniditError(f"--box takes a phrase and four numbers, got {len(values)} values", hint=hint)
    phrase, *numbers = values
    try:
        coords = [float(v) for v in numbers]
    except ValueError:
        raise OmniditError(f"--box {phrase!r}: {' '.join(numbers)} are not four numbers", hint=hint) from None
    return check_box(Box(phrase, *coords))


def parse_boxes(flags: Sequence[Sequence[str]] | None) -> list[Box]:
    """The boxes of the command line's repeated ``--box`` flags (none: an empty list)."""
    return [parse_box(values) for values in flags or ()]


def box_metadata(boxes: Sequence[Box]) -> dict:
    """The PNG metadata entry that records ``boxes`` (nothing when there are none)."""
    return {"boxes": [[b.phrase, *b.coords] for b in boxes]} if boxes else {}


def check_box(box: Box) -> Box:
    """``box`` if its phrase is not empty and it is a box of positive area inside [0, 1]; else a one-line error."""
    hint = "give x0 < x1 and y0 < y1, each in [0, 1] (fractions of the width and height, y down)"
    if not isinstance(box.phrase, str) or not box.phrase.strip():
        raise OmniditError("a layout box has an empty phrase", hint='name what goes in it, e.g. "a red circle"')
    if not all(isinstance(v, numbers.Real) and math.isfinite(v) and 0 <= v <= 1 for v in box.coords):
        raise OmniditError(f"the box of {box.phrase!r} {list(box.coords)} is not inside [0, 1]", hint=hint)
    if not (box.x0 < box.x1 and box.y0 < box.y1):
        raise OmniditError(f"the box of {box.phrase!r} {list(box.coords)} has no area", hint=hint)
    return box


def box_features(boxes: Tensor, frequencies: int = FOURIER_FREQUENCIES) -> Tensor:
    """Fourier features of boxes: (..., 4) -> (..., 8 * frequencies), sin and cos of 2^k * pi * coordinate."""
    scales = math.pi * 2.0 ** torch.arange(frequencies, dtype=boxes.dtype, device=boxes.device)
    angles = (boxes[..., None] * scales).flatten(-2)  # (..., 4 * frequencies)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class LayoutAttention(nn.Module):
    """One block's layout attention: image tokens attend over [image, layout] tokens; returns the update.

    img: (B, N, D); layout: (B, M, D); pe: rotations of the N + M tokens; mask: (B, N + M) bool -> (B, N, D).
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = layer_norm(dim)
        self.qkv = Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = RMSNorm(dim // heads), RMSNorm(dim // heads)
        self.proj = Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)  # the adapter starts as the identity
        nn.init.zeros_(self.proj.bias)

    def forward(self, img: Tensor, layout: Tensor, pe: Tensor, mask: Tensor) -> Tensor:
        x = self.norm(torch.cat([img, layout.to(img.dtype)], dim=1))
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(2)
        q, k, v = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        return self.proj(attention(q, k, v, pe, mask)[:, :img.shape[1]])


class LayoutAdapter(nn.Module):
    """Layout tokens from (phrase vectors, boxes) and one LayoutAttention per block of ``model`` (see the module
    docstring). ``max_boxes``: the most boxes a call may give (layouts are padded to it)."""

    def __init__(self, model: nn.Module, max_boxes: int) -> None:
        super().__init__()
        cfg = model.config
        if not cfg.pooled_dim or not cfg.rope or cfg.extra_streams:
            raise OmniditError("a layout adapter needs an image model with rotary positions and a pooled text vector "
                               "(its phrases)", hint="use a text-conditioned image model such as the shapes model")
        dim = cfg.hidden_size
        self.max_boxes, self.phrase_dim = int(max_boxes), cfg.pooled_dim
        self.axes_dim, self.theta = tuple(cfg.axes_dim), cfg.rope_theta
        self.embed = nn.Sequential(Linear(cfg.pooled_dim + 8 * FOURIER_FREQUENCIES, dim), nn.SiLU(),
                                   Linear(dim, dim))
        self.blocks = nn.ModuleList(LayoutAttention(dim, cfg.num_heads) for _ in range(cfg.depth + cfg.depth_single))
        # What the blocks' hooks read: set by each forward of the model and kept until the next one, so that
        # gradient checkpointing's recomputation of a block in the backward pass sees the same layout.
        self._call: tuple | None = None

    def tokens(self, phrases: Tensor, boxes: Tensor) -> Tensor:
        """(B, M, P) phrase vectors and (B, M, 4) boxes -> (B, M, D) layout tokens."""
        return self.embed(torch.cat([phrases, box_features(boxes.to(phrases.dtype))], dim=-1))

    def positions(self, img_ids: Tensor, boxes: Tensor) -> Tensor:
        """The rotary rotations of the image tokens followed by the layout tokens, each box at its centre on the
        image's token grid (token (r, c) covers rows r..r+1 of the grid, so a box centre y sits at y * rows - 0.5).

        img_ids: (B or 1, N, A) (time, ..., row, column); boxes: (B, M, 4) -> (B, 1, N + M, head_dim / 2, 2)."""
        batch = boxes.shape[0]
        rows = img_ids[..., -2].amax(dim=1, keepdim=True) + 1  # (B or 1, 1)
        cols = img_ids[..., -1].amax(dim=1, keepdim=True) + 1
        ids = img_ids.new_zeros(batch, boxes.shape[1], img_ids.shape[-1])  # (B, M, A), time 0 as an image's
        ids[..., -2] = (boxes[..., 1] + boxes[..., 3]) / 2 * rows - 0.5
        ids[..., -1] = (boxes[..., 0] + boxes[..., 2]) / 2 * cols - 0.5
        return rope_rotations(torch.cat([img_ids.expand(batch, -1, -1), ids], dim=1), self.axes_dim, self.theta)

    # ---- the hooks -------------------------------------------------------------------------------------
    def _begin(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the model: read the call's layout (or none) for the blocks' hooks."""
        self._call = None
        named = ("x", "x_ids", "t", "cond")
        values = dict(zip(named, args)) | {k: v for k, v in kwargs.items() if k in named}
        x, x_ids, cond = values.get("x"), values.get("x_ids"), values.get("cond")
        if cond is None or cond.layout_boxes is None:
            return
        img_ids = x_ids if isinstance(x_ids, Tensor) else x_ids.get("img")
        if img_ids is None or not isinstance(x, Tensor) and "img" not in x:
            return
        mask = cond.layout_mask
        tokens = self.tokens(cond.layout_phrases, cond.layout_boxes)  # (B, M, D)
        n = img_ids.shape[1]
        attend = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)  # (B, N + M)
        active = mask.any(dim=1)[:, None, None]  # (B, 1, 1): a sample without boxes gets nothing added
        self._call = (tokens, self.positions(img_ids, cond.layout_boxes), attend, active, n)

    def _after_block(self, index: int, block: nn.Module, args: tuple, output):
        """Forward hook of block ``index``: add the layout attention to the image tokens of its output (the first
        stream of a double-stream block's list, the first N rows of a single-stream block's joint sequence)."""
        if self._call is None:
            return None
        tokens, pe, attend, active, n = self._call
        img = output[0] if isinstance(output, list) else output[:, :n]
        if img.shape[0] != tokens.shape[0]:  # e.g. a recomputation after another forward: never a wrong layout
            raise RuntimeError(f"the layout adapter's state belongs to another forward pass (batch {tokens.shape[0]}, "
                               f"this block has {img.shape[0]}); call backward before the next forward")
        img = img + active * self.blocks[index](img, tokens, pe, attend)
        return [img, *output[1:]] if isinstance(output, list) else torch.cat([img, output[:, n:]], dim=1)


def add_layout_adapter(model: nn.Module, max_boxes: int) -> LayoutAdapter:
    """Give ``model`` (an MMDiT) a new layout adapter that takes up to ``max_boxes`` boxes; returns it."""
    if not isinstance(max_boxes, int) or max_boxes < 1:
        raise OmniditError(f"a layout adapter takes at least one box, got {max_boxes!r}", hint="e.g. 8")
    if hasattr(model, ADAPTER):
        raise OmniditError("the model already has a layout adapter")
    adapter = LayoutAdapter(model, max_boxes)
    model.add_module(ADAPTER, adapter)
    model.register_forward_pre_hook(adapter._begin, with_kwargs=True)
    blocks = [*model.double_blocks, *model.single_blocks]
    for index, block in enumerate(blocks):
        block.register_forward_hook(_BlockHook(adapter, index))
    return adapter


class _BlockHook:
    """A block's forward hook bound to the adapter and the block's index (a plain object, so that deep copies
    of the model, such as the trainer's EMA, get hooks bound to their own adapter)."""

    def __init__(self, adapter: LayoutAdapter, index: int) -> None:
        self.adapter, self.index = adapter, index

    # Eager under torch.compile (MMDiT.compile_blocks compiles each block with its hooks): traced, each block's hook
    # would be one more graph (its index, its output type) and the blocks would outrun dynamo's recompile limit.
    @torch.compiler.disable
    def __call__(self, block: nn.Module, args: tuple, output):
        return self.adapter._after_block(self.index, block, args, output)


def layout_adapter(model: nn.Module) -> LayoutAdapter | None:
    """The model's layout adapter, or None."""
    return getattr(model, ADAPTER, None)


def adapter_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The layout adapter's entries of a model's state dict."""
    return {k: v for k, v in state.items() if k.startswith(ADAPTER + ".")}


# ---- layouts in a Condition ------------------------------------------------------------------------------
def layout_fields(rows: Sequence[Sequence[Box]], encoder, max_boxes: int, phrase_dim: int,
                  device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """The Condition fields for one list of boxes per row, padded to ``max_boxes``: layout_phrases (B, M, P),
    layout_boxes (B, M, 4), layout_mask (B, M). ``encoder``: the text encoder that gives each phrase's pooled
    vector (each distinct phrase is encoded once)."""
    for boxes in rows:
        check_box_count(len(boxes), max_boxes)
        for box in boxes:
            check_box(box)
    phrases = sorted({b.phrase for boxes in rows for b in boxes})
    vectors = encoder.encode(phrases).pooled.float().cpu() if phrases else None
    index = {p: i for i, p in enumerate(phrases)}
    out_phrases = torch.zeros(len(rows), max_boxes, phrase_dim)
    out_boxes = torch.zeros(len(rows), max_boxes, 4)
    out_mask = torch.zeros(len(rows), max_boxes, dtype=torch.bool)
    for r, boxes in enumerate(rows):
        for j, box in enumerate(boxes):
            out_phrases[r, j] = vectors[index[box.phrase]]
            out_boxes[r, j] = torch.tensor(box.coords)
            out_mask[r, j] = True
    return {"layout_phrases": out_phrases.to(device), "layout_boxes": out_boxes.to(device),
            "layout_mask": out_mask.to(device)}


def without_boxes(cond: Condition, max_boxes: int, phrase_dim: int) -> Condition:
    """``cond`` with an empty layout (no boxes) in every row: what guidance's unconditional branch and the
    trainer's dropped captions get."""
    return replace(cond, **layout_fields([[]] * cond.batch_size, None, max_boxes, phrase_dim, cond.device))


def check_box_count(count: int, max_boxes: int) -> None:
    """A one-line error when ``count`` boxes are more than the adapter's ``max_boxes``."""
    if count > max_boxes:
        raise OmniditError(f"{count} layout boxes, but the model's layout adapter takes at most {max_boxes}",
                           hint=f"give at most {max_boxes} boxes")


def check_layout(model: nn.Module, frames: int, boxes: Sequence[Box]) -> LayoutAdapter:
    """The model's layout adapter, after checking that it exists, makes images, and takes this many ``boxes``."""
    adapter = layout_adapter(model)
    if adapter is None:
        raise OmniditError("this model has no layout adapter, so it cannot take boxes",
                           hint="train one with train.layout_boxes (docs/editing.md#layout-boxes), or drop the boxes")
    if frames != 1 or model.config.extra_streams:
        raise OmniditError("layout boxes place objects in images, not clips or sound", hint="drop the boxes")
    check_box_count(len(boxes), adapter.max_boxes)
    return adapter


def with_layout(model: nn.Module, encoder, cond: Condition, null: Condition, boxes: Sequence, prompts: int,
                frames: int = 1) -> tuple[Condition, Condition]:
    """(cond, null) for sampling with ``boxes``: one list of Box for every prompt, or one list per prompt. cond's
    rows are candidate-major over the ``prompts`` prompts (row j * prompts + i is prompt i); null gets no boxes,
    so that guidance pushes towards the layout as it does towards the caption."""
    adapter = check_layout(model, frames, ())
    if all(isinstance(b, Box) for b in boxes):
        per_prompt = [list(boxes)] * prompts
    elif all(isinstance(row, (list, tuple)) and all(isinstance(b, Box) for b in row) for row in boxes):
        per_prompt = [list(row) for row in boxes]
    else:
        raise OmniditError("layout boxes must be omnidit.layout.Box objects, in one list for every prompt or one "
                           "list per prompt", hint='e.g. boxes=[Box("a red circle", 0.1, 0.1, 0.4, 0.4)]')
    if len(per_prompt) != prompts:
        raise OmniditError(f"{len(per_prompt)} lists of boxes for {prompts} prompts",
                           hint="give one list of boxes for all prompts, or one per prompt")
    rows = [per_prompt[r % prompts] for r in range(cond.batch_size)]
    fields = layout_fields(rows, encoder, adapter.max_boxes, adapter.phrase_dim, cond.device)
    return replace(cond, **fields), without_boxes(null, adapter.max_boxes, adapter.phrase_dim)


def scene_boxes(scene) -> list[Box]:
    """The boxes of a shapes scene's objects, each phrased "a red circle"."""
    from omnidit.data.shapes import _phrase

    return [Box(_phrase(obj, with_size=False), *obj.box) for obj in scene.objects]


# ---- training and loading ----------------------------------------------------------------------------------
def prepare_layout_training(model: nn.Module, config) -> dict:
    """train.layout_boxes: load train.init_from's weights into ``model`` (a fresh MMDiT of ``config.model``),
    freeze them and add a layout adapter for train.layout_boxes boxes. Returns the provenance of the base."""
    from omnidit.checkpoint import load_adapter_base

    source = load_adapter_base(model, config)
    model.requires_grad_(False)
    add_layout_adapter(model, config.train.layout_boxes).to(next(model.parameters()).device)
    return source


def load_layout_state(model: nn.Module, state: dict[str, Tensor], source) -> None:
    """Load a layout run's adapter-only ``state`` into a model prepared like it (every adapter weight, nothing
    else)."""
    from omnidit.checkpoint import load_adapter_only

    load_adapter_only(model, state, adapter_state(model.state_dict()), source, "layout adapter",
                      "train.layout_boxes and the model must be those the run trained with")


def layout_model(config, adapter: dict[str, Tensor], source) -> nn.Module:
    """An MMDiT for sampling: train.init_from's weights with a layout run's ``adapter``."""
    from omnidit.model import MMDiT

    model = MMDiT(config.model)
    prepare_layout_training(model, config)
    load_layout_state(model, adapter, source)
    return model
