"""The MM-DiT model family."""

from omnidit.model.mmdit import PRESETS, MMDiT, MMDiTConfig

__all__ = ["MMDiT", "MMDiTConfig", "PRESETS"]
