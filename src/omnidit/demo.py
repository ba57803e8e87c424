"""`omnidit demo`: a labelled grid of example prompts from the shipped shapes model, in seconds on a CPU;
with a video model, a row of frames per prompt; with a model with sound, a clip with its sound (MP4)."""

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


# One prompt per motion the video model was trained on (the last one names a held-out colour-shape pair).
DEMO_VIDEO_PROMPTS = (
    "a red circle moving to the right",
    "a green triangle moves up quickly",
    "a purple square drifting down and to the left",
    "an orange diamond moves left while a cyan circle moves right",
    "a blue circle moving upwards",
)


# Two objects bouncing, each beeping at its colour's pitch (red C4, blue D#5) when it bounces.
DEMO_AV_PROMPT = "a red circle moving to the right quickly and a blue square moving up quickly"


def demo_video_grid(pipe, prompts: tuple[str, ...] = DEMO_VIDEO_PROMPTS, seed: int = 0, steps: int | None = None,
                    progress: bool = True) -> Image.Image:
    """One clip per prompt in one seeded call (the model's training length and fps); a row per prompt showing
    every frame left to right, enlarged 3x. A model with sound makes each clip with its sound (then dropped)."""
    if "audio" in pipe.model.config.extra_streams:
        clips = pipe.generate_av(list(prompts), seed=seed, steps=steps, progress=progress).video
    else:
        clips = pipe.generate_video(list(prompts), seed=seed, steps=steps, progress=progress)  # (P, C, T, H, W)
    rows = [(prompt, [to_pil(clip[:, k]) for k in range(clip.shape[1])]) for prompt, clip in zip(prompts, clips)]
    return labelled_grid(rows, scale=max(1, 96 // max(clips.shape[3:])))


def demo_grid(pipe, prompts: tuple[str, ...] = DEMO_PROMPTS, n_per_prompt: int = 3, seed: int = 0,
              steps: int | None = None, progress: bool = True) -> Image.Image:
    """Generate ``n_per_prompt`` images per prompt in one seeded call; a row per prompt, enlarged 3x."""
    batch = [p for p in prompts for _ in range(n_per_prompt)]
    images = pipe.generate(batch, seed=seed, steps=steps, progress=progress)  # (P * n, C, H, W)
    rows = [(prompt, [to_pil(img) for img in images[i * n_per_prompt:(i + 1) * n_per_prompt]])
            for i, prompt in enumerate(prompts)]
    return labelled_grid(rows, scale=max(1, 96 // max(images.shape[2:])))


def run_demo(output: str | Path, model: str | Path | None = None, n_per_prompt: int = 3, seed: int = 0,
             steps: int | None = None, device: str = "auto", progress: bool = True,
             speed: str | None = None) -> tuple[Path, float, str]:
    """Load the model (default: the shipped shapes model; a name such as shapes-video works too), draw the demo
    grid to ``output``; returns (path, seconds of sampling, what was drawn, e.g. "18 images" or "5 clips").
    ``speed``: a --speed preset (quantize.apply_speed)."""
    from omnidit.checkpoint import default_model_dir, resolve_model_dir
    from omnidit.pipeline import load_pipeline
    from omnidit.quantize import apply_speed

    model_dir = resolve_model_dir(model) if model is not None else default_model_dir()
    pipe = load_pipeline(model_dir, device=device)
    apply_speed(pipe, speed)
    video = pipe.config.data.frames > 1
    start = time.perf_counter()
    if video:
        grid = demo_video_grid(pipe, seed=seed, steps=steps, progress=progress)
    else:
        grid = demo_grid(pipe, n_per_prompt=n_per_prompt, seed=seed, steps=steps, progress=progress)
    seconds = time.perf_counter() - start
    prompts = DEMO_VIDEO_PROMPTS if video else DEMO_PROMPTS
    settings = {"prompts": " | ".join(prompts), "seed": seed, **pipe.sampling_settings(steps),
                "model": str(model_dir.resolve()), "software": "omnidit demo",
                **({"twin": str(pipe.model_dir)} if pipe.model_dir != model_dir else {})}  # a fast preset's twin drew
    drawn = f"{len(prompts)} clips" if video else f"{len(prompts) * n_per_prompt} images"
    return save_png(grid, output, settings), seconds, drawn


def run_demo_av(output: str | Path, model: str | Path, seed: int = 0, steps: int | None = None,
                device: str = "auto", progress: bool = True) -> tuple[Path, float]:
    """One clip with its sound from DEMO_AV_PROMPT (the model's training length, enlarged 4x) as an MP4 at
    ``output``; returns (path, seconds of sampling)."""
    from omnidit.checkpoint import resolve_model_dir
    from omnidit.pipeline import load_pipeline
    from omnidit.video_io import save_video

    model_dir = resolve_model_dir(model)
    pipe = load_pipeline(model_dir, device=device)
    start = time.perf_counter()
    made = pipe.generate_av([DEMO_AV_PROMPT], seed=seed, steps=steps, progress=progress)
    seconds = time.perf_counter() - start
    settings = {"prompt": DEMO_AV_PROMPT, "seed": seed, **pipe.sampling_settings(steps),
                "model": str(model_dir.resolve()), "software": "omnidit demo"}
    path = save_video(made.video[0], output, made.fps, settings, scale=4, audio=made.audio[0],
                      sample_rate=made.sample_rate)
    return path, seconds
