"""The ``omnidit`` command line: train | precompute | generate | inpaint | demo | eval | eval-prompts | convert |
serve | info | calibrate | edit | quantize | distill.

User mistakes (missing files, bad sizes, unknown config keys, corrupt checkpoints) print one line
``omnidit: error: ... (hint: ...)`` and exit with code 2; there is no traceback for them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from omnidit.calibrate_command import add_calibrate_parser, cmd_calibrate
from omnidit.distill_command import add_distill_parser, cmd_distill
from omnidit.edit_command import add_edit_parser, add_inpaint_parser, cmd_edit, cmd_inpaint
from omnidit.errors import OmniditError
from omnidit.generate_command import (
    MAX_GRID,
    add_box_flag,
    add_sampler_flags,
    check_counts,
    check_sampling_numbers,
    cmd_generate,
    model_or_shipped,
    resolve_seed,
    sampling_args,
)
from omnidit.serve.command import add_serve_parser, cmd_serve
from omnidit.validate import check_number, check_output_path

MAX_PER_PROMPT = 256  # eval and eval-prompts: images per prompt


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user error
        raise OmniditError(f"{self.prog}: {message}", hint=f"run '{self.prog} --help'")


def _keys_epilog() -> str:
    from omnidit.config import all_keys

    return "config keys (override with section.key=value):\n  " + "\n  ".join(all_keys())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="omnidit", description="Train, sample and inspect multimodal diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    config_commands = {
        "train": ("train a model from a JSON config",
                  "Train a model. Checkpoints go to train.out_dir; an interrupted run resumes from its latest "
                  "checkpoint when started again. Under torchrun: python -m torch.distributed.run "
                  "--nproc_per_node N -m omnidit train CONFIG."),
        "precompute": ("cache latents and text embeddings for training",
                       "Encode the config's data with its codec (identity or VAE) and text encoder into "
                       "data.cache_dir, keyed by every setting that changes the values (codec, encoder, dtype, "
                       "resolution, samples, data seed, held-out pairs): a run with data.cache_dir set then "
                       "trains from the cache, and a changed setting never reuses a stale one."),
    }
    for name, (summary, description) in config_commands.items():
        p = sub.add_parser(name, help=summary, description=description, epilog=_keys_epilog(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("config", help="JSON config file, e.g. configs/shapes_quick.json")
        p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config values")
        p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")

    p = sub.add_parser("generate", help="generate images or clips from a prompt",
                       description="Generate images or, with a video model, clips. Several images are tiled into "
                                   "one grid PNG, several clips into one clip of grids; the file's metadata holds the "
                                   "prompt, seed and settings. Clips are written by the output's suffix: .mp4 "
                                   "(H.264), .gif, .webp, or .png (a strip of frames).")
    p.add_argument("prompt", help='what to draw, e.g. "a red circle above a blue square" (a class-conditional '
                                  "model takes a label such as '7')")
    p.add_argument("--model", default=None, help="a shipped model's name (shapes, shapes-video), a checkpoint folder, "
                                                  "a training run folder, or a diffusers Flux / SD3 pipeline folder "
                                                  "(model_index.json); default: the shipped shapes model")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's sample.steps)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale; 1 disables it "
                                                          "(default: the model's sample.cfg)")
    p.add_argument("--seed", type=int, default=0,
                   help="noise seed: output i is drawn from SEED+i, the same on any device and in any batch, so "
                        "-n 1 --seed SEED+i redraws it alone; -1 draws a random seed, printed and recorded in the "
                        "file (default: 0)")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT in pixels (default: the training size)")
    p.add_argument("-n", "--num-images", type=int, default=1,
                   help=f"number of images or clips: up to {MAX_GRID} are tiled into one grid; with {{i}} in -o, any "
                        "number, each written to its own file as soon as its batch is drawn (default: 1)")
    p.add_argument("-o", "--output", default=None,
                   help="output path: .png for images; .mp4, .gif, .webp or .png (frame strip) for clips; an {i} "
                        "(or {i:04d}) in it writes one file per output ('out_{i}.png'); an existing file is "
                        "replaced; the folder must exist (default: out.png, or out.mp4 for a video model)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="outputs drawn at once; lowered automatically to what fits in free memory (default: 8)")
    p.add_argument("--scale", type=int, default=1, help="enlarge the output N times (nearest neighbour) for viewing "
                                                        "small images and clips (default: 1)")
    p.add_argument("--frames", type=int, default=None,
                   help="video models: frames to generate, any multiple of the model's temporal patch (default: the "
                        "training length); with --extend, the number of new frames")
    p.add_argument("--fps", type=float, default=None, help="video models: frames per second (default: the model's "
                                                           "data.fps; with --extend, the clip's own)")
    p.add_argument("--image", default=None, help="video models: image-to-video, the clip starts with this image")
    p.add_argument("--extend", default=None, help="video models: continue this clip (MP4, GIF, WebP) by --frames new "
                                                  "frames; the output is the clip followed by them (models with "
                                                  "sound: an MP4 with its sound, continued with both)")
    p.add_argument("--audio-only", action="store_true",
                   help="models with sound: make sound alone from the caption (-o beeps.wav), --seconds long")
    p.add_argument("--seconds", type=float, default=None,
                   help="models with sound: the length of --audio-only sound (default: the model's data.seconds)")
    p.add_argument("--video", default=None,
                   help="models with sound: video -> audio, make the sound for this clip (MP4, GIF, WebP)")
    p.add_argument("--audio", default=None,
                   help="models with sound: audio -> video, make a clip for this sound (WAV, or a clip's sound track) "
                        "at the model's sample rate; its length sets the clip's")
    p.add_argument("--cfg-video", type=float, default=None,
                   help="models with sound: guidance scale of the picture (default: --cfg)")
    p.add_argument("--cfg-audio", type=float, default=None,
                   help="models with sound: guidance scale of the sound (default: --cfg)")
    add_sampler_flags(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:WEIGHT]",
                   help="apply a LoRA adapter file (PEFT/diffusers or kohya layout, safetensors) at WEIGHT "
                        "(default 1); repeat for several (docs/lora.md)")
    add_box_flag(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("demo", help="draw example prompts with the shipped shapes model (seconds on a CPU)",
                       description="Generate a grid of example prompts (a row per prompt) with the shipped "
                                   "shapes model, or --model, and print where it was written. With the shipped "
                                   "video model installed, also a grid of clips (OUTPUT_video.png: a row of "
                                   "frames per prompt), and with the shipped audio-video model a clip with sound "
                                   "(OUTPUT_av.mp4); a video --model draws the grid of clips alone.")
    p.add_argument("-o", "--output", default="omnidit_demo.png", help="output PNG path (default: omnidit_demo.png)")
    p.add_argument("--model", default=None, help="a shipped model's name, checkpoint or run folder (default: the "
                                                  "shipped shapes model, then shapes-video if installed)")
    p.add_argument("-n", "--num-images", type=int, default=3, help="images per prompt (default: 3; clips: 1)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's sample.steps)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--speed", default=None, choices=["default", "fast", "faster"],
                   help="fast: the model's guidance-distilled twin where one is shipped (shapes) in int8 on a CPU "
                        "(bf16 on a GPU), else the model in int8 with step caching; faster: int8, step caching and "
                        "one candidate (docs/sampling.md)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("eval", help="score a model (or a folder of images) with an exact evaluation suite",
                       description="Score a model with the shapes suite (GenEval-style, judged by an exact detector) "
                                   "or the digits suite (judged by a classifier trained on real digits); or score a "
                                   "folder of images made by any system, whose prompts come from its manifest.json "
                                   "(write one with 'omnidit eval-prompts').")
    p.add_argument("target", nargs="?", default=None,
                   help="checkpoint or run folder, or a folder of images with a manifest.json "
                        "(default: the shipped shapes model)")
    p.add_argument("--suite", default=None, choices=["shapes", "digits", "video", "audio", "av", "edit", "layout",
                                                     "new_shape"],
                   help="which suite (default: from the model's data.name: video for video models, av for clips "
                        "with sound, audio for sound alone; shapes for image folders); edit: inpainting and "
                        "prompt-edit faithfulness on shapes scenes; layout: objects drawn in their boxes by a model "
                        "with a layout adapter (docs/editing.md); new_shape: a shape the shipped models never saw "
                        "(data.new_shapes, docs/lora.md), in every colour")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:WEIGHT]",
                   help="score the model with a LoRA adapter file applied at WEIGHT (default 1); repeatable "
                        "(docs/lora.md)")
    p.add_argument("--inpaint-mode", default="auto", choices=["auto", "tokens", "blend"],
                   help="--suite edit: how the kept pixels take part in sampling (omnidit inpaint --mode; "
                        "default: auto)")
    p.add_argument("--inpaint-prompt", default="auto", choices=["auto", "scene", "object"],
                   help="--suite edit: what the recolour, replace and restore inpaints ask for: the whole scene's "
                        "caption, or the filled object's own (\"a red circle\"); auto: object for a model trained "
                        "with train.region_caption, else scene")
    p.add_argument("--n-per-prompt", type=int, default=None,
                   help="samples per prompt (default: 4 for images, 1 for clips, sound and edits)")
    p.add_argument("--limit", type=int, default=None, help="prompts per category, for a quick seeded run")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's sample.steps)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's sample.cfg)")
    add_sampler_flags(p)
    p.add_argument("--seed", type=int, default=0, help="noise seed of the run (default: 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images generated per batch (default: 64)")
    p.add_argument("--json", default=None, help="write the scores as JSON to this path (with every failed image's "
                                               "prompt, reason and noise seed)")
    p.add_argument("--grid", default=None, help="grid PNG path, a row per category, frames green for pass and red "
                                               "for fail (default: eval_SUITE.png beside --json, else none)")
    p.add_argument("--no-fd", action="store_true", help="skip the Fréchet distance")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("compare", help="test whether two eval reports differ beyond chance (paired, exact)",
                       description="Pair two 'omnidit eval --json' reports image by image (same suite, --seed, "
                                   "--limit and --n-per-prompt, so the same prompts and noise seeds) and print "
                                   "their scores per category, the images that fail in only one of them, and the "
                                   "exact two-sided McNemar p-value of that split (docs/evaluation.md).")
    p.add_argument("report_a", help="the first report (A), e.g. eval_default.json")
    p.add_argument("report_b", help="the second report (B), e.g. eval_fast.json")

    p = sub.add_parser("eval-prompts", help="write the shapes suite's prompts and manifest for another system",
                       description="Write OUT_DIR/prompts.txt and OUT_DIR/manifest.json. Render one image per "
                                   "manifest entry into OUT_DIR under the listed file name, then run "
                                   "'omnidit eval OUT_DIR --suite shapes'.")
    p.add_argument("out_dir", help="folder to write prompts.txt and manifest.json into")
    p.add_argument("--n-per-prompt", type=int, default=4, help="images per prompt (default: 4)")
    p.add_argument("--limit", type=int, default=None, help="prompts per category (default: all)")

    p = sub.add_parser("convert", help="convert between omnidit checkpoints and diffusers transformer folders",
                       description="Convert an omnidit checkpoint (or run folder) into a diffusers transformer folder "
                                   "(FluxTransformer2DModel, SD3Transformer2DModel or DiTTransformer2DModel, "
                                   "loadable with from_pretrained), or a diffusers transformer folder into an omnidit "
                                   "checkpoint. Round trips are bit-exact.")
    p.add_argument("src", help="omnidit checkpoint or run folder, or diffusers transformer (or pipeline) folder")
    p.add_argument("dst", help="new folder to write (must not exist, or be empty)")
    p.add_argument("--to", default=None, choices=["diffusers", "omnidit"],
                   help="target format (default: the format SRC is not in)")
    p.add_argument("--family", default="auto", choices=["auto", "flux", "sd3", "dit"],
                   help="diffusers model family (default: auto, the first of flux, sd3, dit that fits)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")

    add_serve_parser(sub)
    add_calibrate_parser(sub)
    add_distill_parser(sub)
    p = sub.add_parser("quantize",
                       help="write a quantized copy of a model (int8, int4, fp8 or bf16) that loads directly",
                       description="Write MODEL as a quantized model folder at OUT (safetensors and JSON): w8a8 runs "
                                   "the transformer blocks' linear layers as dynamic int8 on x86 CPUs; bf16 stores "
                                   "bfloat16 weights and samples under bfloat16 autocast; fp8 runs those linear layers "
                                   "in float8 e4m3 (fp8 tensor cores on GPUs; torch's slower kernel on CPUs); w8 and "
                                   "w4 keep those weights int8 per row or int4 per group for memory, on any device, "
                                   "and dequantize them at each call. generate, eval, serve and load_pipeline read OUT "
                                   "like any model. Speed and quality against float32: benchmarks/quantize.py.")
    p.add_argument("model", help="a shipped model's name, a checkpoint or run folder")
    p.add_argument("out", help="the folder to write (must not exist)")
    p.add_argument("--scheme", required=True, choices=["w8a8", "bf16", "fp8", "w8", "w4"],
                   help="w8a8 (CPU int8 compute), bf16, fp8 (float8 compute: GPUs of compute capability 8.9+; "
                        "runs, slower, on CPUs), w8 (int8 weights only) or w4 (int4 weights only)")
    p.add_argument("--group-size", type=int, default=None,
                   help="w4: inputs sharing one scale, a power of 2 dividing every layer's inputs; also the block "
                        "of --rotate (default: 64)")
    p.add_argument("--rotate", action="store_true",
                   help="w8 / w4: rotate each group of inputs by a Hadamard matrix before quantizing, so outlier "
                        "weights do not set their group's scale (docs/sampling.md)")
    p.add_argument("--smooth", type=float, default=None, metavar="ALPHA",
                   help="w8a8: balance each input channel between activations and weights (SmoothQuant, alpha in "
                        "(0, 1), e.g. 0.5) from a short calibration run of the model (docs/sampling.md)")
    p.add_argument("--no-ema", action="store_true", help="quantize the raw weights instead of the EMA weights")
    add_inpaint_parser(sub)
    add_edit_parser(sub)

    p = sub.add_parser("info", help="describe a checkpoint folder")
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint folder or training run folder (default: the shipped shapes model)")
    return parser


def cmd_train(args: argparse.Namespace) -> None:
    from omnidit.config import load_config
    from omnidit.train import train

    config = load_config(args.config, args.overrides)
    final = train(config, progress=not args.no_progress)
    print(f"saved {final}")


def cmd_precompute(args: argparse.Namespace) -> None:
    from omnidit.config import load_config
    from omnidit.precompute import precompute_for_config

    path = precompute_for_config(load_config(args.config, args.overrides), progress=not args.no_progress)
    print(f"cached in {path}")


# omnidit eval's flags that only apply when it samples a model (not when it scores a folder of images).
FOLDER_IGNORED = ("n_per_prompt", "limit", "steps", "cfg", "sampler", "shift", "cfg_interval", "skip_scale",
                  "skip_blocks", "skip_interval", "candidates", "speed", "compile", "cache", "cache_threshold",
                  "cache_forecast", "cache_interval", "no_ema")


def _is_image_folder(target: str | None) -> bool:
    """Whether omnidit eval's target is a folder of images to score (it holds a manifest.json), not a model."""
    return target is not None and (Path(target) / "manifest.json").is_file()


def cmd_eval(args: argparse.Namespace) -> None:
    from omnidit.evaluate.runner import SUITES, evaluate_folder, evaluate_model

    if (args.n_per_prompt is not None and args.n_per_prompt < 1) or (args.limit is not None and args.limit < 1) \
            or args.batch_size < 1:
        raise OmniditError("--n-per-prompt, --limit and --batch-size must be at least 1")
    if args.n_per_prompt is not None:
        check_number("--n-per-prompt", args.n_per_prompt, low=1, high=MAX_PER_PROMPT, integer=True,
                     hint="every image is kept in memory for the Fréchet distance; run seeds apart and merge")
    check_number("--batch-size", args.batch_size, low=1, high=4096, integer=True)
    folder = _is_image_folder(args.target)
    seed_given = args.seed != 0
    if not folder:  # a folder's images are made: no seed to draw (and a given one is refused below)
        args.seed = resolve_seed(args.seed)
    check_sampling_numbers(args)
    for flag, path, example in (("--json", args.json, "eval.json"), ("--grid", args.grid, "eval.png")):
        if path is not None:  # before the minutes of work, not after
            check_output_path(flag, path, example)
    if args.grid is not None and not args.grid.lower().endswith(".png"):
        raise OmniditError(f"--grid must end in .png, got {args.grid}", hint="e.g. --grid eval.png")
    target = Path(model_or_shipped(args.target))
    if folder:
        if args.lora:
            raise OmniditError("--lora applies to a model, not to a folder of images", hint="drop --lora")
        if args.suite in ("edit", "layout", "new_shape"):
            raise OmniditError(f"the {args.suite} suite draws its own scenes, so it needs a model, not a folder of "
                               "images", hint="pass a model folder or name")
        # The folder's images are already made: flags that say how to make them would be silently ignored.
        given = [f"--{name.replace('_', '-')}" for name in FOLDER_IGNORED
                 if getattr(args, name, None) is not None and getattr(args, name) is not False]
        given += ["--seed"] if seed_given else []
        if given:
            raise OmniditError(f"{', '.join(given)} {'says' if len(given) == 1 else 'say'} how to sample, and a "
                               "folder of images is scored as it is", hint=f"drop {', '.join(given)}")
        report = evaluate_folder(target, args.suite or "shapes", progress=not args.no_progress,
                                 frechet=not args.no_fd)
    else:
        from omnidit.lora import apply_lora_specs
        from omnidit.pipeline import load_pipeline

        pipe = load_pipeline(target, device=args.device, use_ema=not args.no_ema)
        apply_lora_specs(pipe.model, args.lora)
        name = pipe.config.data.name
        suite = args.suite or {"bounce": "av", "tones": "audio"}.get(name, "video" if pipe.config.data.frames > 1
                                                                      else name)
        if suite not in SUITES:
            raise OmniditError(f"no suite for data '{suite}'", hint=f"pass --suite {', '.join(SUITES)}")
        n_per_prompt = args.n_per_prompt or (4 if suite in ("shapes", "digits", "new_shape") else 1)
        extra = {"inpaint_mode": args.inpaint_mode, "inpaint_prompt": args.inpaint_prompt} if suite == "edit" else {}
        report = evaluate_model(pipe, suite, n_per_prompt=n_per_prompt, seed=args.seed, limit=args.limit,
                                batch_size=args.batch_size, progress=not args.no_progress, frechet=not args.no_fd,
                                **sampling_args(args, pipe), **extra)
        if pipe.scorer is not None:  # a fast preset's twin drew the images and the model itself ranked them
            report.settings.update(twin=str(pipe.model_dir), ranked_by=str(target))
    if args.lora:
        report.settings["lora"] = args.lora
    if args.speed:
        report.settings["speed"] = args.speed
    grid = args.grid or (str(Path(args.json).with_name(f"eval_{report.suite}.png")) if args.json else None)
    report.save(args.json, grid)
    print(report.table())
    for path in (args.json, grid):
        if path:
            print(f"wrote {path}")


def cmd_compare(args: argparse.Namespace) -> None:
    from omnidit.evaluate.compare import comparison_table, paired_comparison, read_report

    comparison = paired_comparison(read_report(args.report_a), read_report(args.report_b))
    print(comparison_table(comparison, (args.report_a, args.report_b)))


def cmd_demo(args: argparse.Namespace) -> None:
    from omnidit.checkpoint import shipped_model_dir
    from omnidit.demo import run_demo, run_demo_av

    check_counts(args.num_images, args.steps)
    check_number("-n", args.num_images, low=1, high=16, integer=True, hint="the demo draws six prompts a row each")
    check_output_path("-o", args.output, "demo.png")  # before the sampling, not after it
    if not args.output.lower().endswith(".png"):
        raise OmniditError(f"-o must end in .png (the demo writes a PNG grid), got {args.output}",
                           hint="e.g. -o demo.png")
    args.seed = resolve_seed(args.seed)
    path, seconds, drawn = run_demo(args.output, args.model, n_per_prompt=args.num_images, seed=args.seed,
                                    steps=args.steps, device=args.device, progress=not args.no_progress,
                                    speed=args.speed)
    count, kind = drawn.split()
    print(f"wrote {path} ({drawn} in {seconds:.1f} s of sampling: {int(count) / seconds:.2f} {kind}/s)")
    if args.model is not None:
        return
    try:
        video_dir = shipped_model_dir("shapes-video")
    except OmniditError:
        print("(the shapes-video model is not in this installation: docs/video_model.md)")
    else:
        out = Path(args.output).with_name(Path(args.output).stem + "_video.png")
        path, seconds, drawn = run_demo(out, video_dir, seed=args.seed, steps=args.steps, device=args.device,
                                        progress=not args.no_progress)
        print(f"wrote {path} ({drawn} in {seconds:.1f} s of sampling)")
    try:
        av_dir = shipped_model_dir("shapes-av")
    except OmniditError:
        print("(the shapes-av model, clips with sound, is not in this installation: docs/av_model.md)")
        return
    out = Path(args.output).with_name(Path(args.output).stem + "_av.mp4")
    path, seconds = run_demo_av(out, av_dir, seed=args.seed, steps=args.steps, device=args.device,
                                progress=not args.no_progress)
    print(f"wrote {path} (a clip with sound in {seconds:.1f} s of sampling)")


def cmd_eval_prompts(args: argparse.Namespace) -> None:
    from omnidit.evaluate.runner import write_suite_prompts

    if args.n_per_prompt < 1 or (args.limit is not None and args.limit < 1):
        raise OmniditError("--n-per-prompt and --limit must be at least 1")
    check_number("--n-per-prompt", args.n_per_prompt, low=1, high=MAX_PER_PROMPT, integer=True)
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise OmniditError(f"{out} is a file, and eval-prompts writes a folder", hint="name a folder (new or not)")
    if not out.is_dir():
        check_output_path("OUT_DIR", out)  # its parent folder exists: a typo creates nothing
    manifest, prompts = write_suite_prompts(out, args.n_per_prompt, args.limit)
    print(f"wrote {manifest} and {prompts}")


def cmd_convert(args: argparse.Namespace) -> None:
    from omnidit.convert.export import convert

    dst, class_name = convert(args.src, args.dst, to=args.to, family=args.family, use_ema=not args.no_ema)
    print(f"wrote {dst} ({class_name})")


def _ema_description(directory: Path) -> str:
    from omnidit.checkpoint import PROVENANCE_FILE
    from omnidit.config import read_json

    if (directory / "ema.safetensors").is_file():
        return "yes"
    if (directory / PROVENANCE_FILE).is_file():  # an export_for_inference folder
        meta = read_json(directory / PROVENANCE_FILE, "provenance")
        if meta.get("weights") == "ema.safetensors":
            return f"yes (exported as model.safetensors, {meta.get('dtype')})"
    return "no"


def cmd_quantize(args: argparse.Namespace) -> None:
    from omnidit.quantize import quantize_folder

    if Path(args.out).exists():
        raise OmniditError(f"{args.out} already exists", hint="pick a new folder name")
    check_output_path("OUT", args.out, "quantized/shapes-w8")  # its parent folder exists
    if args.group_size is not None and args.scheme != "w4" and not args.rotate:
        raise OmniditError(f"--group-size applies to w4 and to --rotate, not to {args.scheme} alone",
                           hint="drop --group-size, or use --scheme w4")
    group = 64 if args.group_size is None else args.group_size  # 0 is a mistake to report, not the default
    out = quantize_folder(model_or_shipped(args.model), args.out, args.scheme, use_ema=not args.no_ema,
                          group=group, rotate=args.rotate, smooth=args.smooth)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({args.scheme}, {size / 2**20:.1f} MiB)")


def cmd_info(args: argparse.Namespace) -> None:
    from omnidit.checkpoint import (
        check_state_matches,
        list_checkpoints,
        read_config,
        read_safetensors,
        resolve_model_dir,
        training_provenance,
    )
    from omnidit.data import caption_vocabulary
    from omnidit.quantize import read_scheme

    directory = resolve_model_dir(model_or_shipped(args.model))
    config = read_config(directory)
    weights = read_safetensors(directory / "model.safetensors")
    n_params = sum(t.numel() for k, t in weights.items() if not k.endswith(".weight_scale"))
    scheme = read_scheme(directory)
    if scheme is None and not (config.train.lora_rank or config.train.layout_boxes):
        import torch

        from omnidit.model.mmdit import MMDiT

        with torch.device("meta"):  # shapes only: a config that does not describe its weights is an error here too
            check_state_matches(MMDiT(config.model), weights, directory / "model.safetensors")
    history = training_provenance(directory)
    step, seen, source = history.get("step"), history.get("images_seen"), history.get("init_from")
    mc = config.model
    tc = config.train
    adapter = f"a LoRA adapter of rank {tc.lora_rank}" if tc.lora_rank else \
        f"a layout adapter for up to {tc.layout_boxes} boxes" if tc.layout_boxes else None
    lines = [
        f"checkpoint    {directory}",
        f"parameters    {n_params:,} ({n_params / 1e6:.2f}M)"
        + (f", quantized {scheme} (omnidit quantize)" if scheme else "") if adapter is None else
        f"parameters    {adapter}: {n_params:,} ({n_params / 1e6:.2f}M), on the weights of {tc.init_from}",
        f"step          {step if step is not None else 'unknown'}"
        + (f" ({'distilled' if config.distill.method else 'fine-tuned'} from {source.get('folder')}, step "
           f"{source.get('step') or 'unknown'})" if source else ""),
        f"images seen   {f'{seen:,}' if seen is not None else 'unknown'}",
        f"ema weights   {_ema_description(directory)}",
        f"architecture  width {mc.hidden_size}, {mc.num_heads} heads, {mc.depth} double + {mc.depth_single} single "
        f"blocks, patch {mc.patch_size}, {mc.in_channels} channels",
        f"conditioning  text={config.text.encoder} (context {mc.context_dim}, pooled {mc.pooled_dim}), "
        f"classes={mc.num_classes}, guidance_embed={mc.guidance_embed}"
        + (" (the cfg scale is an input: one pass per step)" if mc.guidance_embed else ""),
        *([f"distillation  {config.distill.method} from {config.distill.teacher} (omnidit distill; "
           f"docs/distillation.md)"] if config.distill.method else []),
        f"data          {config.data.name} {config.data.width}x{config.data.height}"
        + (f", {config.data.frames} frames at {config.data.fps:g} fps (tubelets of {mc.temporal_patch} "
           f"frame{'s' if mc.temporal_patch > 1 else ''})"
           if config.data.frames > 1 else ""),
        f"sampling      {config.sample.sampler}, {config.sample.steps} steps, cfg {config.sample.cfg}, "
        f"shift {config.sample.shift}" + ("" if config.sample.cfg_interval == [0.0, 1.0] else
                                         ", guidance at t in [{}, {}]".format(*config.sample.cfg_interval))
        + (f", skip-layer guidance {config.sample.skip_scale} without single blocks {config.sample.skip_blocks} "
           f"at t in {config.sample.skip_interval}" if config.sample.skip_scale else "")
        + (f", best of {config.sample.candidates} by the model's own denoising error"
           if config.sample.candidates > 1 else ""),
    ]
    if "audio" in mc.extra_streams:
        from omnidit.codecs import load_audio_codec
        from omnidit.tokens import audio_frame_size

        dc, codec = config.data, load_audio_codec(config.data)
        frame = audio_frame_size(mc, codec)
        lines.insert(-1, f"sound         {dc.sample_rate} Hz through the {codec.name} codec, {frame} samples "
                         f"({1000 * frame / dc.sample_rate:g} ms) per token of {mc.extra_streams['audio']} features"
                         + (f"; one batch in {dc.mix_every} from {dc.mix_name}" if dc.mix_name else ""))
    vocabulary = caption_vocabulary(config.data.name, config.data.mix_name) if config.text.encoder != "none" else None
    if vocabulary:
        lines.append(f"vocabulary    the {len(vocabulary)} words of its training captions: "
                     + ", ".join(sorted(vocabulary)))
    others = list_checkpoints(directory.parent)
    if len(others) > 1:
        lines.append(f"run           {len(others)} checkpoints in {directory.parent}")
    print("\n".join(lines))


COMMANDS = {"train": cmd_train, "precompute": cmd_precompute, "generate": cmd_generate, "demo": cmd_demo,
            "eval": cmd_eval, "eval-prompts": cmd_eval_prompts, "convert": cmd_convert, "info": cmd_info,
            "serve": cmd_serve, "calibrate": cmd_calibrate, "inpaint": cmd_inpaint,
            "edit": cmd_edit, "quantize": cmd_quantize, "distill": cmd_distill,
            "compare": cmd_compare}


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings on the command line: one line each, without the Python source line."""
    from tqdm import tqdm

    tqdm.write(f"omnidit: warning: {message}", file=sys.stderr)


# Loggers of optional packages that transformers imports when they are installed (torchao, from the bench extra):
# they warn about kernels for other Pythons and GPUs, and deprecations in torch, on every command that loads the
# text encoder, which has nothing to do with what the user asked. Errors still show.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _print_warning
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        # Overrides after an option (omnidit distill T OUT --method m train.steps=9) land here: take them as such.
        if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        COMMANDS[args.command](args)
    except OmniditError as e:
        print(f"omnidit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("omnidit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (omnidit info | head): not an error, and no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's final flush must not fail
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
