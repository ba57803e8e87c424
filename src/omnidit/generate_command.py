"""``omnidit generate``: images, clips (text-to-video, image-to-video, extension) and diffusers pipelines.

Also the helpers that every sampling command shares (model resolution, counts, sampler flags). -n images are
drawn in bounded batches, image i from seed SEED + i, so any one of them can be redrawn alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omnidit.errors import OmniditError
from omnidit.validate import check_number, check_output_path, parse_size, random_seed

MAX_EXTEND_FRAMES = 4096  # frames --extend reads or adds: minutes of video, bounded memory
MAX_OUTPUTS = 1_000_000  # -n: many more than anyone will look at, few enough that a typo fails fast


def sampling_args(args: argparse.Namespace, pipe=None) -> dict:
    """The sampler flags (``add_sampler_flags``) as Pipeline.generate's keyword arguments; None = the model's.
    With ``pipe``, ``--speed`` is applied to it first (quantize.apply_speed: its sampling defaults change), then
    ``--compile`` (MMDiT.compile_blocks)."""
    from omnidit.pipeline import SAMPLING_KEYS

    if pipe is not None and getattr(args, "speed", None):
        from omnidit.quantize import apply_speed

        apply_speed(pipe, args.speed)
    if pipe is not None and getattr(args, "compile", False):
        pipe.model.compile_blocks()
    return {k: getattr(args, k) for k in SAMPLING_KEYS}


def add_sampler_flags(p: argparse.ArgumentParser) -> None:
    """The sampling flags (--sampler, --shift, --cfg-interval, --skip-*, --candidates, --cache*), shared by generate and
    eval (unset: the model's sample config)."""
    p.add_argument("--sampler", default=None, help="euler, heun or midpoint (default: the model's sample.sampler)")
    p.add_argument("--shift", type=float, default=None, help="timestep shift toward noise (default: sample.shift)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only at times LO <= t <= HI (1 = noise, 0 = data); other steps cost one model call "
                        "instead of two (default: the model's sample.cfg_interval, 0 1 = every step)")
    p.add_argument("--skip-scale", type=float, default=None, metavar="S",
                   help="skip-layer guidance: also move S times away from the model without --skip-blocks, at one "
                        "more model call per step; 0 = off (default: the model's sample.skip_scale)")
    p.add_argument("--skip-blocks", type=int, nargs="+", default=None, metavar="I",
                   help="the single-stream blocks (from 0) that skip-layer guidance leaves out "
                        "(default: the model's sample.skip_blocks)")
    p.add_argument("--skip-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="apply skip-layer guidance only at times LO <= t <= HI (1 = noise; default: the model's "
                        "sample.skip_interval)")
    p.add_argument("--candidates", type=int, default=None, metavar="N",
                   help="best of N: sample each image from N seeds and keep the one with the lowest denoising error "
                        "under its prompt, judged by the model itself; about N times the time "
                        "(default: the model's sample.candidates)")
    p.add_argument("--speed", default=None, choices=["default", "fast", "faster"],
                   help="one knob for speed: fast = the model's guidance-distilled twin where one is shipped "
                        "(shapes: shapes-guided, one pass per step, its candidates ranked by shapes) in int8 on a "
                        "CPU (bf16 compute on a GPU), else the model in int8 with first-block step caching; "
                        "faster = int8, step caching and one candidate instead of best-of-N; both cost some "
                        "quality; flags given explicitly win (docs/sampling.md)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (regional compilation) before sampling: the first "
                        "call pays for compiling, later steps and calls reuse it (docs/sampling.md)")
    p.add_argument("--cache", default=None, choices=["none", "first_block", "teacache", "magcache", "interval"],
                   help="step caching: at steps where the output barely changes, run only the first block and reuse "
                        "the rest's last output: first_block (its residual barely changed), teacache and magcache "
                        "(need 'omnidit calibrate MODEL' once), interval (every --cache-interval-th step); "
                        "docs/sampling.md (default: the model's sample.cache, none)")
    p.add_argument("--cache-threshold", type=float, default=None, metavar="X",
                   help="first_block, teacache and magcache's skip threshold: larger skips more steps, 0 skips none "
                        "(the same images as no cache) (default: the model's sample.cache_threshold, or where that "
                        "is 0 the method's own, about a third of the steps skipped); interval follows its schedule")
    p.add_argument("--cache-forecast", default=None, choices=["copy", "taylor"],
                   help="a skipped step reuses the last computed residual (copy) or extrapolates the last two in t "
                        "(taylor, TaylorSeer's first order) (default: copy)")
    p.add_argument("--cache-interval", type=int, default=None, metavar="N",
                   help="--cache interval: compute every N-th step (default 2)")


def resolve_seed(seed: int, outputs: int = 1) -> int:
    """--seed: -1 draws a random one (printed, so it can be reused); else in [0, 2**63 - outputs], as output i
    uses SEED+i."""
    if seed == -1:
        seed = random_seed()
        print(f"seed {seed}")
    return check_number("--seed", seed, low=0, high=2**63 - outputs, integer=True,
                        hint="-1 draws a random seed; output i uses SEED+i")


def check_counts(num_images: int, steps: int | None) -> None:
    """generate and demo: -n and --steps must be positive."""
    if num_images < 1:
        raise OmniditError(f"-n must be at least 1, got {num_images}")
    check_number("-n", num_images, low=1, high=MAX_OUTPUTS, integer=True)
    if steps is not None and steps < 1:
        raise OmniditError(f"--steps must be at least 1, got {steps}")
    if steps is not None:
        check_number("--steps", steps, low=1, high=10_000, integer=True)


def add_box_flag(p: argparse.ArgumentParser) -> None:
    """--box PHRASE X0 Y0 X1 Y1 (repeatable), for models with a layout adapter."""
    p.add_argument("--box", action="append", nargs=5, default=None, metavar=("PHRASE", "X0", "Y0", "X1", "Y1"),
                   help="models with a layout adapter: draw PHRASE inside this box (fractions of the width and "
                        "height, y down); repeat for several (docs/editing.md#layout-boxes)")


def model_or_shipped(path: str | None, shipped: str = "shapes") -> str:
    """The model path a command was given, or the folder of the shipped model named ``shipped`` when none was."""
    from omnidit.checkpoint import shipped_model_dir

    return str(shipped_model_dir(shipped)) if path is None else path


def recorded_model(path: str) -> str:
    """The model as an output's metadata records it: its absolute folder (a shipped model's name: its folder in the
    package, as ``checkpoint.named_model_path`` finds it)."""
    from omnidit.checkpoint import named_model_path

    return str(named_model_path(path).resolve())


def cmd_generate(args: argparse.Namespace) -> None:
    from omnidit.images import make_grid, save_png, to_pil
    from omnidit.layout import box_metadata, check_layout, parse_boxes
    from omnidit.lora import apply_lora_specs
    from omnidit.pipeline import load_pipeline

    if not args.prompt.strip():
        raise OmniditError("the prompt is empty", hint='pass a description, e.g. "a red circle"')
    check_counts(args.num_images, args.steps)
    check_number("--scale", args.scale, low=1, high=64, integer=True)
    check_number("--batch-size", args.batch_size, low=1, high=4096, integer=True)
    check_sampling_numbers(args)
    args.seed = resolve_seed(args.seed, args.num_images)
    if args.output is not None:
        check_output_path("-o", args.output)
    width, height = parse_size(args.size) if args.size else (None, None)
    boxes = parse_boxes(args.box)
    args.model = model_or_shipped(args.model)
    if (Path(args.model) / "model_index.json").is_file():  # a diffusers pipeline folder (Flux / SD3)
        args.output = args.output or "out.png"
        _check_image_output(args)
        if any(v not in (None, False) for v in (args.frames, args.fps, args.image, args.extend, args.audio_only,
                                                 args.video, args.audio, args.seconds, args.lora, args.box)) \
                or args.scale != 1:
            raise OmniditError("--frames, --fps, --image, --extend, --lora, --box and --scale apply to omnidit "
                               "models, not to a diffusers pipeline folder", hint="drop them")
        return _generate_diffusers_pipeline(args, width, height)
    pipe = load_pipeline(args.model, device=args.device, use_ema=not args.no_ema)
    apply_lora_specs(pipe.model, args.lora)
    if boxes:
        check_layout(pipe.model, pipe.config.data.frames, boxes)
    if "audio" in pipe.model.config.extra_streams:
        from omnidit.generate_av_command import cmd_generate_av

        return cmd_generate_av(args, pipe, width, height)
    sound = [f for f, v in (("--audio-only", args.audio_only), ("--video", args.video), ("--audio", args.audio),
                            ("--seconds", args.seconds), ("--cfg-video", args.cfg_video),
                            ("--cfg-audio", args.cfg_audio)) if v not in (None, False)]
    if sound:
        raise OmniditError(f"{sound[0]} is for models with sound; this one has none",
                           hint="use a model with an audio stream (train one with configs/shapes_av.json)")
    if pipe.config.data.frames > 1:
        return _generate_clips(args, pipe, width, height)
    args.output = args.output or "out.png"
    _check_image_output(args)
    if any(v is not None for v in (args.frames, args.fps, args.image, args.extend)):
        raise OmniditError("--frames, --fps, --image and --extend are for video models; this one makes images",
                           hint="use a video model, e.g. --model shapes-video")
    loaded = pipe.model_dir
    sampling = sampling_args(args, pipe)
    width, height = width or pipe.config.data.width, height or pipe.config.data.height
    files = output_files(args.output, args.num_images, 1, width, height, args.scale)
    settings = {"prompt": args.prompt, "seed": args.seed, **pipe.sampling_settings(**sampling),
                "size": f"{width}x{height}", "num_images": args.num_images,
                "model": recorded_model(args.model), "ema": not args.no_ema, "software": "omnidit",
                **({"twin": str(pipe.model_dir)} if pipe.model_dir != loaded else {}),  # a fast preset's twin drew
                **({"ranked_by": str(loaded)} if pipe.scorer is not None else {}),  # ...and the model ranked
                **({"lora": args.lora} if args.lora else {}), **({"speed": args.speed} if args.speed else {}),
                **box_metadata(boxes)}
    batch = batch_size(args, pipe, 1, width, height, sampling)

    def draw(seeds: list[int], progress: bool):
        return pipe.generate([args.prompt] * len(seeds), width=width, height=height, seed=seeds, progress=progress,
                             boxes=boxes or None, **sampling)

    grid = []
    for first, images in draw_in_batches(draw, args.seed, args.num_images, batch, not args.no_progress):
        pil = [_scaled(to_pil(img), args.scale) for img in images]
        if files is None:
            grid += pil
        for k, image in enumerate(pil if files is not None else ()):
            i = first + k
            print(f"wrote {save_png(image, files[i], {**settings, 'seed': args.seed + i, 'index': i})}")
    if files is None:
        print(f"wrote {save_png(grid[0] if len(grid) == 1 else make_grid(grid), args.output, settings)}")


# Images or clips tiled into one output: beyond this a grid is too small to look at, and its pixels (times
# --scale squared) must fit in memory at once. More go to one file each (-o 'out_{i}.png').
MAX_GRID = 64
MAX_GRID_VALUES = 2**28


def output_files(output: str, n: int, frames: int, width: int, height: int, scale: int) -> list[str] | None:
    """The file of each of ``n`` outputs when ``output`` is a template with an ``{i}`` field ('out_{i}.png',
    'out_{i:04d}.mp4'); None when they are tiled into one grid at ``output``, which must stay useful."""
    if "{" not in output:
        values = n * frames * 3 * width * height * scale**2
        if scale > 1 and n == 1 and values > MAX_GRID_VALUES:
            raise OmniditError(f"--scale {scale} makes a {values * 4 / 2**30:.1f} GiB output",
                               hint="use a smaller --scale")
        if n > 1 and (n > MAX_GRID or values > MAX_GRID_VALUES):
            why = f"more than {MAX_GRID}" if n > MAX_GRID else f"{values * 4 / 2**30:.1f} GiB of pixels"
            raise OmniditError(f"-n {n} outputs in one grid is {why}",
                               hint="write one file each with an {i} in the name, e.g. -o 'out_{i}"
                                    f"{Path(output).suffix}'")
        return None
    try:
        files = [output.format(i=i) for i in range(n)]
    except (KeyError, IndexError, ValueError) as e:
        raise OmniditError(f"-o {output} is not a valid name template ({type(e).__name__}: {e})",
                           hint="use {i} (or {i:04d}) for the output's number and no other braces") from None
    if len(set(files)) != n:
        raise OmniditError(f"-o {output} gives the same name to several outputs", hint="put {i} in the file name")
    return files


def batch_size(args: argparse.Namespace, pipe, frames: int, width: int, height: int, sampling: dict) -> int:
    """--batch-size, lowered to what fits in the free memory (at least 1: one that does not fit either is refused
    with its own message when drawn)."""
    limit = pipe.batch_limit(frames, width, height, **sampling)
    return args.batch_size if limit is None else max(1, min(args.batch_size, limit))


def draw_in_batches(draw, seed: int, n: int, batch: int, progress: bool):
    """Yield (index of the first, outputs) for ``n`` outputs drawn ``batch`` at a time by ``draw(seeds,
    progress)``: output i from seed + i, so it is the same whatever the batch and can be redrawn alone with
    -n 1 --seed SEED+i. One progress bar: the sampler's for a single batch, else one over the outputs."""
    from tqdm import tqdm

    with tqdm(total=n, unit="output", disable=not progress or n <= batch, dynamic_ncols=True) as bar:
        for first in range(0, n, batch):
            seeds = [seed + i for i in range(first, min(n, first + batch))]
            yield first, draw(seeds, progress and n <= batch)
            bar.update(len(seeds))


def check_sampling_numbers(args: argparse.Namespace) -> None:
    """Finite, in-range guidance and sampler numbers, before anything is loaded."""
    if args.cfg is not None:
        check_number("--cfg", args.cfg, low=0, high=100)
    if args.shift is not None:
        check_number("--shift", args.shift, low=0, low_open=True, high=100)
    if args.skip_scale is not None:
        check_number("--skip-scale", args.skip_scale, low=0, high=100)
    for flag in ("cfg_interval", "skip_interval"):
        interval = getattr(args, flag) or ()
        for value in interval:
            check_number(f"--{flag.replace('_', '-')}", value, low=0, high=1)
        if interval and not interval[0] < interval[1]:
            raise OmniditError(f"--{flag.replace('_', '-')} {interval[0]:g} {interval[1]:g}: the interval needs "
                               "LO < HI",
                               hint="times run from 1 (noise) to 0 (data); e.g. 0.5 1.0")


def _check_image_output(args: argparse.Namespace) -> None:
    if not args.output.lower().endswith(".png"):
        raise OmniditError(f"output file must end in .png, got {args.output}",
                           hint="images are written as PNG; .mp4, .gif and .webp are for video models")


def _scaled(image, scale: int):
    from PIL import Image

    return image if scale == 1 else image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def _generate_clips(args: argparse.Namespace, pipe, width: int | None, height: int | None) -> None:
    """`generate` for a video model: text-to-video, image-to-video (--image) or extension (--extend)."""

    from omnidit.video_io import SAVE_SUFFIXES, check_clip_output, load_video, save_video

    args.output = args.output or "out.mp4"
    if Path(args.output).suffix.lower() not in SAVE_SUFFIXES:
        raise OmniditError(f"a clip cannot be written to {args.output}",
                           hint=f"end the output in one of {', '.join(SAVE_SUFFIXES)}")
    if args.image and args.extend:
        raise OmniditError("--image and --extend both give the clip's first frames", hint="pass one of them")
    if args.frames is not None:
        # One window holds every frame in one attention: activations grow with the frame count (117 MiB at
        # 32 frames of 32x32, docs/benchmarks.md), so longer clips go through --extend's windows.
        longest = MAX_EXTEND_FRAMES if args.extend else 256
        check_number("--frames", args.frames, low=1, high=longest, integer=True,
                     hint=None if args.extend else "make longer clips in windows: --extend a shorter clip")
    if args.fps is not None:
        check_number("--fps", args.fps, low=0.0, low_open=True, high=1000)
    dc = pipe.config.data
    width, height = width or dc.width, height or dc.height
    sampling = sampling_args(args, pipe)
    frames = args.frames or dc.frames  # new frames when extending
    if args.extend:
        given, clip_fps, _ = load_video(args.extend, max_frames=MAX_EXTEND_FRAMES, size=(width, height))
        fps = check_clip_output(args.output, args.fps or clip_fps)
        total, window = given.shape[1] + frames, dc.frames  # sampled in windows of the training length
    else:
        fps = check_clip_output(args.output, args.fps or dc.fps)
        first = _read_image(args.image, width, height)[None] if args.image else None  # (1, 3, H, W)
        total = window = frames
    files = output_files(args.output, args.num_images, total, width, height, args.scale)

    def draw(seeds: list[int], progress: bool):
        prompts, common = [args.prompt] * len(seeds), dict(width=width, height=height, progress=progress, **sampling)
        if args.extend:
            return extend_clip(pipe, prompts, given, frames, fps, seeds, **common)
        return pipe.generate_video(prompts, frames, fps, seed=seeds, first_frame=first, **common)

    settings = {"prompt": args.prompt, "seed": args.seed, **pipe.sampling_settings(**sampling),
                "size": f"{width}x{height}", "frames": total, "fps": fps, "num_clips": args.num_images,
                "image": args.image, "extend": args.extend, "model": recorded_model(args.model),
                "ema": not args.no_ema, "software": "omnidit"}
    batch = batch_size(args, pipe, window, width, height, sampling)
    grid = []
    for first_index, clips in draw_in_batches(draw, args.seed, args.num_images, batch, not args.no_progress):
        if files is None:
            grid.append(clips)
            continue
        for k, clip in enumerate(clips):
            i = first_index + k
            out = save_video(clip, files[i], fps, {**settings, "seed": args.seed + i, "index": i}, scale=args.scale)
            print(f"wrote {out}")
    if files is None:
        import torch

        print(f"wrote {save_video(tile_clips(torch.cat(grid)), args.output, fps, settings, scale=args.scale)}")


def tile_clips(clips):
    """(B, C, T, H, W) clips -> one (C, T, H', W') clip whose frames are grids (``make_grid``'s layout)."""
    import numpy as np
    import torch

    from omnidit.images import make_grid, to_pil

    if clips.shape[0] == 1:
        return clips[0]
    frames = []
    for k in range(clips.shape[2]):
        grid = np.asarray(make_grid([to_pil(c[:, k]) for c in clips]))
        frames.append(torch.from_numpy(grid.copy()).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(frames, dim=1)


def _read_image(path: str, width: int, height: int):
    """An image file as (3, H, W) in [-1, 1], which must have the clip's size."""
    import torch

    from omnidit.images import read_image_file
    from omnidit.video_io import undo_scale

    pixels = undo_scale(read_image_file(path), (width, height), f"the image {path}")  # a --scale k image: undone
    if pixels.shape[:2] != (height, width):
        raise OmniditError(f"the image {path} is {pixels.shape[1]}x{pixels.shape[0]} but the clip is {width}x{height}",
                           hint=f"pass --size {pixels.shape[1]}x{pixels.shape[0]}, or an image of {width}x{height}")
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1


def extend_clip(pipe, prompts: list[str], clip, new_frames: int, fps: float, seed: int | list[int] = 0,
                **generate):
    """``clip`` (C, T, H, W) followed by ``new_frames`` generated frames, for each prompt: (B, C, T + new, H, W).

    Generated in windows of the model's training length (data.frames): each window is given the last half
    window of what exists so far (or the whole clip when it is shorter) and adds the rest; the window that starts
    after k new frames draws its noise from seed + k (``seed`` one for the batch, or one per prompt).
    """
    import torch

    window = pipe.config.data.frames
    pt = pipe.model.config.temporal_patch
    if window < 2 * pt:
        raise OmniditError(f"the model's clips ({window} frames) are too short to extend in windows of tubelets "
                           f"of {pt} frames", hint="use a model trained on longer clips")
    if clip.shape[1] < pt:
        raise OmniditError(f"the clip to extend has {clip.shape[1]} frames, fewer than one tubelet of {pt}",
                           hint=f"give a clip of at least {pt} frames")
    out = clip[None].expand(len(prompts), -1, -1, -1, -1)
    made = 0
    while made < new_frames:
        # half a window of context (whole tubelets, at least one, never the whole window)
        context = min(out.shape[2] // pt, max(window // 2 // pt, 1), window // pt - 1) * pt
        given = torch.zeros(len(prompts), *out.shape[1:2], window, *out.shape[3:])
        given[:, :, :context] = out[:, :, -context:]
        shifted = seed + made if isinstance(seed, int) else [k + made for k in seed]
        clip_window = pipe.generate_video(prompts, window, fps, seed=shifted, given=given,
                                          given_frames=range(context), **generate)
        fresh = clip_window[:, :, context:][:, :, : new_frames - made]
        out = torch.cat([out, fresh], dim=2)
        made += fresh.shape[2]
    return out


def _generate_diffusers_pipeline(args: argparse.Namespace, width: int | None, height: int | None) -> None:
    """`generate` for a diffusers Flux or SD3 pipeline folder: its text encoders, VAE and schedule, omnidit's
    transformer and sampler. --cfg is Flux's embedded guidance or SD3's classifier-free guidance scale."""
    from omnidit.config import read_json
    from omnidit.images import make_grid, save_png, to_pil
    from omnidit.pipeline import resolve_device
    from omnidit.pipelines import load_flux_pipeline, load_sd3_pipeline

    kind = read_json(Path(args.model) / "model_index.json", "pipeline index").get("_class_name", "?")
    loaders = {"Flux": (load_flux_pipeline, 3.5), "StableDiffusion3": (load_sd3_pipeline, 7.0)}
    family = next((name for name in loaders if kind.startswith(name)), None)
    if family is None:
        raise OmniditError(f"pipeline folders of class {kind} are not supported yet",
                           hint="Flux and StableDiffusion3 pipeline folders are")
    if width is None:
        raise OmniditError("a pipeline folder needs --size", hint="e.g. --size 1024x1024")
    if any(v is not None for v in (args.shift, args.cfg_interval, args.skip_scale, args.skip_blocks,
                                   args.skip_interval, args.candidates, args.cache, args.cache_threshold,
                                   args.cache_forecast, args.cache_interval)):
        raise OmniditError("--shift, --cfg-interval, --skip-*, --cache* and --candidates apply to omnidit models, "
                           "not to a diffusers pipeline folder",
                           hint="drop them: the folder's scheduler config sets the shift, and guidance runs at "
                                "every step")
    loader, default_guidance = loaders[family]
    pipe = loader(args.model, device=resolve_device(args.device))
    steps, guidance = args.steps or 28, default_guidance if args.cfg is None else args.cfg
    images = pipe.generate([args.prompt] * args.num_images, width=width, height=height, steps=steps,
                           guidance=guidance, seed=args.seed, sampler=args.sampler or "euler",
                           progress=not args.no_progress)
    pil = [to_pil(img) for img in images]
    settings = {"prompt": args.prompt, "seed": args.seed, "steps": steps, "guidance": guidance,
                "size": f"{width}x{height}", "num_images": args.num_images, "model": recorded_model(args.model),
                "pipeline": kind, "software": "omnidit"}
    print(f"wrote {save_png(pil[0] if len(pil) == 1 else make_grid(pil), args.output, settings)}")
