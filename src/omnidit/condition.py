"""The conditioning that travels with a batch: text tokens, pooled vector, class labels, guidance, layout boxes.

Every field is optional; a model uses the ones its config asks for. Batch helpers (``cat``,
``where``, ``repeat``) exist so that CFG batching and condition dropout are one line each.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class Condition:
    """Per-sample conditioning.

    txt: (B, L, C) text token features; txt_mask: (B, L) bool, True for real tokens;
    pooled: (B, P) pooled text vector; labels: (B,) int64 class ids; guidance: (B,) guidance scale
    (for guidance-distilled models); layout_phrases: (B, M, P) each box's pooled phrase vector,
    layout_boxes: (B, M, 4) the boxes (x0, y0, x1, y1) in [0, 1], layout_mask: (B, M) bool, True for real
    boxes (for a model with a layout adapter, omnidit.layout).
    """

    txt: Tensor | None = None
    txt_mask: Tensor | None = None
    pooled: Tensor | None = None
    labels: Tensor | None = None
    guidance: Tensor | None = None
    layout_phrases: Tensor | None = None
    layout_boxes: Tensor | None = None
    layout_mask: Tensor | None = None

    def _tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def batch_size(self) -> int:
        tensors = self._tensors()
        if not tensors:
            raise ValueError("an empty Condition has no batch size")
        return next(iter(tensors.values())).shape[0]

    @property
    def device(self) -> torch.device:
        tensors = self._tensors()
        if not tensors:
            raise ValueError("an empty Condition has no device")
        return next(iter(tensors.values())).device

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Condition:
        """Move to ``device``; floating fields (not masks or labels) also cast to ``dtype``."""
        out = {}
        for name, t in self._tensors().items():
            cast = dtype if (dtype is not None and t.is_floating_point()) else None
            out[name] = t.to(device=device, dtype=cast)
        return replace(self, **out)

    def with_mask(self) -> Condition:
        """The same condition with an explicit all-True txt_mask where it had none."""
        if self.txt is None or self.txt_mask is not None:
            return self
        return replace(self, txt_mask=torch.ones(self.txt.shape[:2], dtype=torch.bool, device=self.txt.device))

    def without_full_mask(self) -> Condition:
        """Drop a txt_mask that masks nothing, so attention can take its unmasked fast path.

        Reads the mask once (a host sync): call it before a sampling loop, not inside it.
        """
        if self.txt_mask is not None and bool(self.txt_mask.all()):
            return replace(self, txt_mask=None)
        return self

    def pad_text(self, length: int) -> Condition:
        """Right-pad txt with zeros and txt_mask with False up to ``length`` tokens."""
        if self.txt is None or self.txt.shape[1] >= length:
            return self
        extra = length - self.txt.shape[1]
        txt = torch.nn.functional.pad(self.txt, (0, 0, 0, extra))
        mask = self.txt_mask
        if mask is None:
            mask = torch.ones(self.txt.shape[:2], dtype=torch.bool, device=self.txt.device)
        mask = torch.nn.functional.pad(mask, (0, extra), value=False)
        return replace(self, txt=txt, txt_mask=mask)

    @staticmethod
    def cat(conds: list[Condition]) -> Condition:
        """Concatenate along the batch, padding text to the longest sequence."""
        if any(c.txt is not None for c in conds):
            length = max(c.txt.shape[1] for c in conds)
            conds = [c.pad_text(length).with_mask() for c in conds]
        out = {}
        for f in fields(Condition):
            parts = [getattr(c, f.name) for c in conds]
            if all(p is None for p in parts):
                continue
            if any(p is None for p in parts):
                raise ValueError(f"cannot concatenate conditions where only some have '{f.name}'")
            out[f.name] = torch.cat(parts, dim=0)
        return Condition(**out)

    def rows(self, index: slice | Tensor) -> Condition:
        """The rows ``index`` (a slice or index tensor) of every field."""
        return Condition(**{k: t[index] for k, t in self._tensors().items()})

    def repeat(self, n: int) -> Condition:
        """Repeat every row ``n`` times (row i becomes rows i*n .. i*n+n-1)."""
        return Condition(**{k: t.repeat_interleave(n, dim=0) for k, t in self._tensors().items()})

    def where(self, keep: Tensor, other: Condition) -> Condition:
        """Row-wise choice: self where ``keep`` (B,) is True, else ``other`` (batch B or 1).

        Used for condition dropout: ``cond.where(keep, null_cond)``.
        """
        batch = keep.shape[0]
        if other.batch_size == 1 and batch != 1:
            other = other.repeat(batch)
        a, b = self, other
        if a.txt is not None:
            length = max(a.txt.shape[1], b.txt.shape[1])
            a, b = a.pad_text(length).with_mask(), b.pad_text(length).with_mask()
        out = {}
        for name, t in a._tensors().items():
            o = getattr(b, name)
            if o is None:
                raise ValueError(f"the replacement condition lacks '{name}'")
            k = keep.view(-1, *([1] * (t.dim() - 1)))
            out[name] = torch.where(k, t, o.to(t.dtype))
        return Condition(**out)
