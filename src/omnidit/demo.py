"""`omnidit demo`: a labelled grid of example prompts from the shipped shapes model, in seconds on a CPU."""

from __future__ import annotations

import time
from pathlib import Path

from PIL import Image

from omnidit.images import labelled_grid, save_png, to_pil

# One prompt per thing the model was trained to do (the last one is a held-out colour-shape pair:
# the training data never shows a blue circle).
DEMO_PROMPTS = (
    "a red circle above a blue square",
    "a large yellow triangle",
    "three green circles",
    "a purple diamond to the left of an orange circle",
    "a pink square and a cyan triangle",
    "a blue circle",
)


def demo_grid(pipe, prompts: tuple[str, ...] = DEMO_PROMPTS, n_per_prompt: int = 3, seed: int = 0,
              steps: int | None = None, progress: bool = True) -> Image.Image:
    """Generate ``n_per_prompt`` images per prompt in one seeded call; a row per prompt, enlarged 3x."""
    batch = [p for p in prompts for _ in range(n_per_prompt)]
    images = pipe.generate(batch, seed=seed, steps=steps, progress=progress)  # (P * n, C, H, W)
    rows = [(prompt, [to_pil(img) for img in images[i * n_per_prompt:(i + 1) * n_per_prompt]])
            for i, prompt in enumerate(prompts)]
    return labelled_grid(rows, scale=max(1, 96 // max(images.shape[2:])))


def run_demo(output: str | Path, model: str | Path | None = None, n_per_prompt: int = 3, seed: int = 0,
             steps: int | None = None, device: str = "auto", progress: bool = True) -> tuple[Path, float]:
    """Load the model (default: the shipped one), draw the demo grid to ``output``; returns (path, seconds)."""
    from omnidit.checkpoint import default_model_dir
    from omnidit.pipeline import load_pipeline

    model_dir = Path(model) if model is not None else default_model_dir()
    pipe = load_pipeline(model_dir, device=device)
    start = time.perf_counter()
    grid = demo_grid(pipe, n_per_prompt=n_per_prompt, seed=seed, steps=steps, progress=progress)
    seconds = time.perf_counter() - start
    settings = {"prompts": " | ".join(DEMO_PROMPTS), "seed": seed, **pipe.sampling_settings(steps),
                "model": str(model_dir.resolve()), "software": "omnidit demo"}
    return save_png(grid, output, settings), seconds
