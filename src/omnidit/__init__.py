"""omnidit: train, sample and evaluate multimodal diffusion transformers."""

from omnidit.condition import Condition
from omnidit.errors import OmniditError

__version__ = "0.1.0"
__all__ = ["Condition", "OmniditError", "__version__"]
