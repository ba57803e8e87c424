"""Training a layout adapter (omnidit.layout): the trainer, with each shapes scene's object boxes in the batch.

``omnidit train CONFIG train.init_from=shapes train.layout_boxes=8`` trains the adapter alone on a frozen base
(resume, DDP, EMA, checkpoints as for any run; checkpoints hold the adapter's weights). The boxes of a scene's
objects, each phrased "a red circle", go with its caption; a row whose caption is dropped (train.cond_dropout)
loses its boxes too, which is what guidance's unconditional branch sees when sampling with boxes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import Tensor, nn

from omnidit.condition import Condition
from omnidit.config import Config
from omnidit.errors import OmniditError
from omnidit.layout import (
    adapter_state,
    layout_fields,
    load_layout_state,
    prepare_layout_training,
    scene_boxes,
    without_boxes,
)
from omnidit.model import MMDiT
from omnidit.train import Trainer


class LayoutTrainer(Trainer):
    """A Trainer whose model is train.init_from's, frozen, with a layout adapter of train.layout_boxes boxes."""

    def __init__(self, config: Config, progress: bool = True) -> None:
        dc, tc = config.data, config.train
        if dc.name != "shapes" or dc.frames != 1 or dc.mix_name or dc.cache_dir or tc.counterfactual_weight:
            raise OmniditError("a layout adapter trains on shapes images (their scenes give the boxes), without "
                               "data.mix_name, data.cache_dir or train.counterfactual_weight",
                               hint="use data.name=shapes with one frame, e.g. configs/layout.json")
        if config.text.encoder == "none":
            raise OmniditError("a layout adapter reads its phrases with the model's text encoder",
                               hint="train it on a text-conditioned model")
        super().__init__(config, progress)

    def prepare_model(self, model: MMDiT) -> dict:
        return prepare_layout_training(model, self.config)

    @property
    def adapter_only(self) -> bool:
        return True

    def adapter_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return adapter_state(state)

    def load_adapter_state(self, model: nn.Module, state: dict[str, Tensor], source: Path) -> None:
        load_layout_state(model, state, source)

    def eval_suite(self) -> str | None:
        """The layout suite (auto): scored without boxes, the shapes suite would only show the frozen base."""
        return "layout" if self.config.train.eval_suite == "auto" else super().eval_suite()

    def sample_prompts(self) -> tuple[list[str], dict]:
        """The first scenes' captions, with their boxes."""
        scenes = [self.dataset.scene(i) for i in range(8)]
        boxes = [scene_boxes(s)[:self.config.train.layout_boxes] for s in scenes]
        return [s.caption for s in scenes], {"boxes": boxes}

    def _null_condition(self) -> Condition:
        return without_boxes(super()._null_condition(), self.config.train.layout_boxes, self.config.model.pooled_dim)

    def image_batch(self, indices: list[int]) -> tuple[Tensor, Condition, Tensor]:
        x0, cond, labels = super().image_batch(indices)
        rows = [scene_boxes(self.dataset.scene(i))[:self.config.train.layout_boxes] for i in indices]
        fields = layout_fields(rows, self.text_encoder, self.config.train.layout_boxes, self.config.model.pooled_dim,
                               self.device)
        return x0, replace(cond, **fields), labels
