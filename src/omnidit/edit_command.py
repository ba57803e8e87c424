"""``omnidit inpaint IMAGE MASK PROMPT``: regenerate the masked part of an image (or grow it: --outpaint), keeping
every other pixel exactly (omnidit.inpaint); ``omnidit edit IMAGE --from A --to B``: change an image by prompt
through flow inversion (omnidit.editing)."""

from __future__ import annotations

import argparse
from pathlib import Path

from omnidit.errors import OmniditError

MAX_PAD = 1024  # --outpaint pixels per side


def add_inpaint_parser(sub) -> None:
    from omnidit.generate_command import add_box_flag, add_sampler_flags

    p = sub.add_parser("inpaint", help="regenerate the masked part of an image or clip, or grow an image (--outpaint)",
                       description="Generate the pixels of IMAGE that MASK marks from PROMPT (for a hole round "
                                   "one object, the default model (shapes-inpaint) and any model trained with "
                                   "train.region_caption take the new object alone, e.g. 'a red circle'; larger "
                                   "regions, --move, --outpaint and other models take a description of the whole "
                                   "image, e.g. the caption with the new object in it); every pixel "
                                   "outside the mask stays exactly as it was. The mask is rounded up to the model's "
                                   "tokens (4-pixel squares for the shapes model) for sampling, and only the mask's "
                                   "own pixels are replaced. With a video model IMAGE is a clip, the mask applies to "
                                   "every frame and the output is a clip. docs/editing.md")
    p.add_argument("image", help="the image to edit (PNG or JPEG), or for a video model the clip (MP4, GIF or "
                                 "WebP; its frame count a multiple of the model's temporal patch)")
    p.add_argument("mask", help="what to regenerate (in every frame of a clip): a mask image of the same size "
                                "(white = generate, black = keep), 'box:X0,Y0,X1,Y1' (fractions of the width and "
                                "height, e.g. box:0,0,0.5,1 = the left half), or 'none' with --outpaint")
    p.add_argument("prompt", help='what the hole gets, e.g. "a yellow diamond" for a hole round one object '
                                  '(shapes-inpaint), or the whole result, e.g. "a yellow diamond above a blue '
                                  'square" (larger regions, moves, outpainting, other models)')
    p.add_argument("-o", "--output", default="out.png",
                   help="output PNG, or for a clip .mp4, .gif, .webp or a .png strip (default: out.png)")
    p.add_argument("--outpaint", type=int, nargs=4, default=None, metavar=("LEFT", "TOP", "RIGHT", "BOTTOM"),
                   help="grow the canvas by these many pixels on each side and generate them (with the mask's "
                        "pixels, if any)")
    p.add_argument("--move", type=int, nargs=2, default=None, metavar=("DX", "DY"),
                   help="move what the mask marks by DX pixels right and DY down (negative: left, up) and generate "
                        "only the hole it leaves; the moved pixels stay exactly the input's (images; any model)")
    p.add_argument("--mode", default="auto", choices=["auto", "tokens", "blend"],
                   help="how the kept pixels take part: tokens (clean context at t = 0; for models trained with "
                        "given frames), blend (they follow their noised path, so the model sees one t; any model); "
                        "auto picks by the model's training (default: auto)")
    p.add_argument("--model", default=None, help="a shipped model's name, a checkpoint folder or a run folder "
                                                  "(default: shapes-inpaint, the shipped shapes model with its "
                                                  "inpainting adapter)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's sample.steps)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: sample.cfg)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; result i uses SEED+i; -1 = random (default: 0)")
    p.add_argument("-n", "--num-images", type=int, default=1, help="results, tiled into one grid (default: 1)")
    p.add_argument("--scale", type=int, default=1, help="enlarge the output N times for viewing (default: 1)")
    add_sampler_flags(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:WEIGHT]",
                   help="apply a LoRA adapter file at WEIGHT (default 1); repeatable (docs/lora.md)")
    add_box_flag(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_edit_parser(sub) -> None:
    from omnidit.editing import EDIT_CANDIDATES

    p = sub.add_parser("edit", help="change an image by prompt: invert it under --from, sample back under --to",
                       description="Take IMAGE back to noise with the model's own ODE under its caption (--from), "
                                   "then sample it back under the changed caption (--to), with the inversion's "
                                   "attention values injected over the noisier steps so that what the captions "
                                   "share stays in place. docs/editing.md")
    p.add_argument("image", help="the image to change (PNG or JPEG), or for a video model the clip (MP4, GIF or "
                                 "WebP; the mask applies to every frame and the output is a clip)")
    p.add_argument("--from", dest="source", required=True, help='what the image shows, e.g. "a red circle above a '
                                                                'blue square"')
    p.add_argument("--to", dest="target", required=True, help='what it should show, e.g. "a green circle above a '
                                                              'blue square"')
    p.add_argument("-o", "--output", default="out.png", help="output PNG, or for a clip .mp4, .gif, .webp or a .png "
                                                             "strip (default: out.png)")
    p.add_argument("--model", default=None, help="a shipped model's name, a checkpoint folder or a run folder "
                                                  "(default: the shipped shapes model)")
    p.add_argument("--steps", type=int, default=None, help="inversion and sampling steps (default: sample.steps)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale toward --to (default: sample.cfg)")
    p.add_argument("--invert-cfg", type=float, default=1.0, help="guidance scale of the inversion under --from; 1 "
                                                                 "(none) inverts most faithfully (default: 1)")
    p.add_argument("--inject-until", type=float, default=None, metavar="T",
                   help="inject the inversion's values at times t >= T (1 = noise): 1 turns injection off, 0 "
                        "keeps everything; lower keeps more of the input (default: 0.9)")
    p.add_argument("--inject-blocks", type=int, nargs="+", default=None, metavar="I",
                   help="the single-stream blocks (from 0) that take the injected values (default: all)")
    p.add_argument("--mask", default="auto",
                   help="where the image may change: auto (the tokens where the model's velocities under --from and "
                        "--to differ most), none (everywhere), a mask image of the same size (white = may change) or "
                        "'box:X0,Y0,X1,Y1' in fractions; pixels outside it stay exactly as they were (default: auto)")
    p.add_argument("--candidates", type=int, default=None, metavar="N",
                   help="with a mask: sample N edits (the first from the inverted noise, the others from fresh noise "
                        f"inside the mask) and keep the one the model finds likeliest under --to (default: "
                        f"{EDIT_CANDIDATES})")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the extra candidates (default: 0)")
    p.add_argument("--scale", type=int, default=1, help="enlarge the output N times for viewing (default: 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:WEIGHT]",
                   help="apply a LoRA adapter file at WEIGHT (default 1); repeatable (docs/lora.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_edit(args: argparse.Namespace) -> None:
    from omnidit.editing import DEFAULT_INJECT_UNTIL, edit, edit_candidates
    from omnidit.generate_command import _scaled, model_or_shipped, recorded_model
    from omnidit.images import save_png, to_pil
    from omnidit.lora import apply_lora_specs
    from omnidit.pipeline import load_pipeline
    from omnidit.validate import check_number, check_output_path
    from omnidit.video_io import save_video

    for flag, text in (("--from", args.source), ("--to", args.target)):
        if not text.strip():
            raise OmniditError(f"{flag} is empty", hint='describe the image, e.g. "a red circle"')
    if args.steps is not None:
        check_number("--steps", args.steps, low=1, high=10_000, integer=True)
    if args.cfg is not None:
        check_number("--cfg", args.cfg, low=0, high=100)
    check_number("--invert-cfg", args.invert_cfg, low=0, high=100)
    until = check_number("--inject-until", DEFAULT_INJECT_UNTIL if args.inject_until is None else args.inject_until,
                         low=0, high=1, hint="1 turns injection off, 0 keeps everything")
    check_number("--scale", args.scale, low=1, high=64, integer=True)
    mask_spec = args.mask
    if args.candidates is not None:
        check_number("--candidates", args.candidates, low=1, high=64, integer=True)
    candidates = edit_candidates(args.candidates, mask_spec != "none")
    check_output_path("-o", args.output)
    model = model_or_shipped(args.model)
    pipe = load_pipeline(model, device=args.device, use_ema=not args.no_ema)
    image, fps = _read_image_or_clip(args.image, args.output, pipe)
    mask = None if mask_spec == "none" else mask_spec if mask_spec == "auto" else \
        read_mask(mask_spec, image.shape[-1], image.shape[-2])
    apply_lora_specs(pipe.model, args.lora)
    s = pipe.config.sample
    steps, cfg = args.steps or s.steps, s.cfg if args.cfg is None else args.cfg
    result = edit(pipe, image, args.source, args.target, steps, cfg, args.invert_cfg, args.inject_blocks, until,
                  progress=not args.no_progress, mask=mask, candidates=candidates, seed=args.seed, fps=fps)[0]
    settings = {"prompt": args.target, "edit_from": args.source, "image": str(Path(args.image).resolve()),
                "mask": mask_spec, "candidates": candidates, "seed": args.seed,
                "steps": steps, "cfg": cfg, "invert_cfg": args.invert_cfg, "inject_until": until,
                "inject_blocks": args.inject_blocks or "all", "sampler": "midpoint",
                "model": recorded_model(model), "software": "omnidit",
                **({"lora": args.lora} if args.lora else {})}
    if fps is not None:
        print(f"wrote {save_video(result, args.output, fps, {**settings, 'fps': fps}, scale=args.scale)}")
        return
    print(f"wrote {save_png(_scaled(to_pil(result), args.scale), args.output, settings)}")


def _read_image_or_clip(path: str, output: str, pipe):
    """What ``omnidit edit`` and ``inpaint`` change: for an image model an image (3, H, W) and fps None (the
    output a PNG); for a video model a clip (1, 3, T, H, W) at its file's frame rate (the output a clip file)."""
    from omnidit.generate_command import MAX_EXTEND_FRAMES
    from omnidit.images import read_rgb_tensor
    from omnidit.video_io import check_clip_output, load_video

    if pipe.config.data.frames > 1:
        check_clip_output(output, pipe.config.data.fps)  # the suffix, before anything is read
        if str(path).lower().endswith(".png"):  # a still image, or our PNG frame strip: neither is a clip here
            raise OmniditError(f"{path} is a PNG, and this video model changes clips",
                               hint="pass an .mp4, .gif or .webp clip, or use an image model (--model shapes)")
        clip, fps, _ = load_video(path, max_frames=MAX_EXTEND_FRAMES)
        check_clip_output(output, fps)  # the output keeps the input's frame rate: e.g. no 60 fps GIF
        return clip[None], fps
    if not output.lower().endswith(".png"):
        raise OmniditError(f"output file must end in .png, got {output}")
    return read_rgb_tensor(path), None


def read_mask(spec: str, width: int, height: int):
    """--mask as (H, W) bool (True = generate): 'none', 'box:X0,Y0,X1,Y1' in fractions, or an image file."""
    import torch

    from omnidit.images import read_image_file

    if spec == "none":
        return torch.zeros(height, width, dtype=torch.bool)
    if spec.startswith("box:"):
        try:
            x0, y0, x1, y1 = (float(v) for v in spec[4:].split(","))
        except ValueError:
            raise OmniditError(f"cannot read the box '{spec}'", hint="write box:X0,Y0,X1,Y1 with fractions, "
                                                                     "e.g. box:0.25,0.25,0.75,0.75") from None
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise OmniditError(f"the box '{spec}' is not inside the image",
                               hint="0 <= X0 < X1 <= 1 and 0 <= Y0 < Y1 <= 1, fractions of the width and height")
        mask = torch.zeros(height, width, dtype=torch.bool)
        mask[round(y0 * height):round(y1 * height), round(x0 * width):round(x1 * width)] = True
        return mask
    grey = read_image_file(spec, "L", "the mask", hint="pass a PNG mask (white = generate), box:X0,Y0,X1,Y1 or none")
    if grey.shape != (height, width):
        raise OmniditError(f"the mask {spec} is {grey.shape[1]}x{grey.shape[0]} but the image is {width}x{height}",
                           hint="give a mask of the image's size")
    return torch.from_numpy(grey > 127)


def cmd_inpaint(args: argparse.Namespace) -> None:
    from omnidit.generate_command import (
        _scaled,
        check_counts,
        check_sampling_numbers,
        model_or_shipped,
        recorded_model,
        resolve_seed,
        sampling_args,
    )
    from omnidit.images import make_grid, save_png, to_pil
    from omnidit.inpaint import move_region, pad_for_outpainting, resolve_mode
    from omnidit.layout import box_metadata, check_layout, parse_boxes
    from omnidit.lora import apply_lora_specs
    from omnidit.pipeline import load_pipeline
    from omnidit.validate import check_number, check_output_path
    from omnidit.video_io import save_video

    if not args.prompt.strip():
        raise OmniditError("the prompt is empty", hint='describe the result, e.g. "a red circle"')
    check_counts(args.num_images, args.steps)
    check_number("-n", args.num_images, low=1, high=64, integer=True, hint="at most 64 results are tiled")
    check_number("--scale", args.scale, low=1, high=64, integer=True)
    check_sampling_numbers(args)
    check_output_path("-o", args.output)
    for value in args.outpaint or ():
        check_number("--outpaint", value, low=0, high=MAX_PAD, integer=True)
    if args.mask == "none" and not any(args.outpaint or ()):
        raise OmniditError("the mask is 'none' and nothing is outpainted, so there is nothing to generate",
                           hint="give a mask, a box:X0,Y0,X1,Y1, or --outpaint LEFT TOP RIGHT BOTTOM")
    boxes = parse_boxes(args.box)
    args.seed = resolve_seed(args.seed, args.num_images)
    model = model_or_shipped(args.model, "shapes-inpaint")
    pipe = load_pipeline(model, device=args.device, use_ema=not args.no_ema)
    clip = pipe.config.data.frames > 1
    if pipe.model.config.extra_streams:
        raise OmniditError("inpaint works on images and silent clips; this model makes clips with sound",
                           hint="use an image model (shapes) or a video model (shapes-video)")
    if clip and (args.outpaint or args.num_images > 1 or args.move):
        flag = "--outpaint" if args.outpaint else "--move" if args.move else "-n"
        raise OmniditError(f"{flag} works on images; a clip is inpainted once",
                           hint="drop it (run again with another --seed for another result)")
    if args.move and args.outpaint:
        raise OmniditError("--move and --outpaint do not go together", hint="move first, then outpaint the result")
    image, fps = _read_image_or_clip(args.image, args.output, pipe)  # a clip: (1, 3, T, H, W) at its frame rate
    mask = read_mask(args.mask, image.shape[-1], image.shape[-2])
    if args.outpaint:
        left, top, right, bottom = args.outpaint
        cell = pipe.model.config.patch_size * (pipe.codec.downsample if pipe.codec is not None else 1)
        width, height = image.shape[-1] + left + right, image.shape[-2] + top + bottom
        if width % cell or height % cell:
            raise OmniditError(f"--outpaint {left} {top} {right} {bottom} makes the {image.shape[-1]}x"
                               f"{image.shape[-2]} image {width}x{height}, which this model's {cell}-pixel tokens "
                               "do not divide", hint=f"grow each side by a multiple of {cell} pixels")
        canvas, mask = pad_for_outpainting(image[None], mask, args.outpaint)
        image = canvas[0]
    if args.move:  # the marked pixels pasted at their new place; the hole they leave is what gets generated
        canvas, mask = move_region(image[None], mask, args.move)
        image = canvas[0]
    apply_lora_specs(pipe.model, args.lora)
    if boxes:
        check_layout(pipe.model, 1, boxes)
    sampling = sampling_args(args, pipe)
    n = args.num_images
    results = pipe.inpaint([args.prompt] * n, image, mask, mode=args.mode, progress=not args.no_progress,
                           seed=[args.seed + i for i in range(n)], boxes=boxes or None, fps=fps, **sampling)
    settings = {"prompt": args.prompt, "seed": args.seed, "inpaint": str(Path(args.image).resolve()),
                "mask": args.mask, "mode": resolve_mode(args.mode, pipe.config),
                **({"outpaint": args.outpaint} if args.outpaint else {}),
                **({"move": args.move} if args.move else {}),
                **pipe.sampling_settings(**sampling),
                "model": recorded_model(model), "software": "omnidit",
                **({"lora": args.lora} if args.lora else {}),
                **box_metadata(boxes)}
    if clip:
        print(f"wrote {save_video(results[0], args.output, fps, {**settings, 'fps': fps}, scale=args.scale)}")
        return
    pil = [_scaled(to_pil(img), args.scale) for img in results]
    print(f"wrote {save_png(pil[0] if n == 1 else make_grid(pil), args.output, settings)}")
