"""Tensor <-> PIL conversion, image grids, and PNGs that carry their generation settings."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from omnidit.errors import OmniditError


def check_image_batch(images: Tensor, channels: tuple[int, ...], who: str) -> None:
    """Raise a one-line error unless ``images`` is a finite, non-empty (B, C, H, W) batch with C in ``channels``."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in channels:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        allowed = " or ".join(map(str, channels))
        raise OmniditError(f"{who} expects images of shape (B, {allowed}, H, W), got {shape}",
                           hint=f"pass a batch of {allowed}-channel images in [-1, 1]")
    if images.shape[0] == 0 or images.shape[2] < 1 or images.shape[3] < 1:
        raise OmniditError(f"{who} got an empty batch or image: {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()):
        raise OmniditError("images contain NaN or inf", hint="the sampler diverged; check the checkpoint and cfg")


def to_pil(image: Tensor) -> Image.Image:
    """(C, H, W) in [-1, 1] with C = 1 or 3 -> PIL image (L or RGB)."""
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = array.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0], "L") if array.shape[-1] == 1 else Image.fromarray(array, "RGB")


def make_grid(images: list[Image.Image], columns: int | None = None, padding: int = 2,
              background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Tile same-sized images into one RGB image, ``columns`` per row (default: near-square)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w + (columns + 1) * padding, rows * h + (rows + 1) * padding), background)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid.paste(img.convert("RGB"), (padding + c * (w + padding), padding + r * (h + padding)))
    return grid


def labelled_grid(rows: list[tuple[str, list[Image.Image]]], scale: int = 1,
                  frames: list[list[tuple[int, int, int]]] | None = None) -> Image.Image:
    """A row per (label, images): the label on the left, then the images enlarged ``scale`` times
    (nearest neighbour, so pixels stay crisp). ``frames[r][c]``, if given, is the colour of a 3-px
    frame around image c of row r (the eval grid marks pass / fail this way)."""
    if not rows or not any(images for _, images in rows):
        raise ValueError("labelled_grid needs at least one image")
    w, h = next(images for _, images in rows if images)[0].size
    border = 3 if frames is not None else 1
    cell_w, cell_h = w * scale + 2 * border + 2, h * scale + 2 * border + 2
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 8 + max(int(measure.textlength(label)) for label, _ in rows)
    columns = max(len(images) for _, images in rows)
    out = Image.new("RGB", (label_w + columns * cell_w, len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(out)
    for r, (label, images) in enumerate(rows):
        y = r * cell_h
        draw.text((4, y + cell_h // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            x = label_w + c * cell_w
            if frames is not None:
                draw.rectangle([x + 1, y + 1, x + cell_w - 2, y + cell_h - 2], fill=frames[r][c])
            tile = image.convert("RGB").resize((w * scale, h * scale), Image.NEAREST)
            out.paste(tile, (x + 1 + border, y + 1 + border))
    return out


def a1111_parameters(metadata: dict[str, object]) -> str:
    """The ``parameters`` text that AUTOMATIC1111's web UI writes and other tools (ComfyUI, Civitai, image
    viewers) read: the prompt, an optional "Negative prompt:" line, then "Key: value" pairs."""
    lines = [str(metadata.get("prompt", ""))]
    if metadata.get("negative_prompt"):
        lines.append(f"Negative prompt: {metadata['negative_prompt']}")
    pairs = [("Steps", "steps"), ("Sampler", "sampler"), ("CFG scale", "cfg"), ("Seed", "seed"), ("Size", "size"),
             ("Model", "model")]
    lines.append(", ".join(f"{name}: {metadata[key]}" for name, key in pairs if metadata.get(key) is not None))
    return "\n".join(lines)


def _png_info(metadata: dict[str, object]) -> PngInfo:
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(str(key), str(value))
    if "prompt" in metadata and "parameters" not in metadata:
        info.add_text("parameters", a1111_parameters(metadata))
    return info


def save_png(image: Image.Image, path: str | Path, metadata: dict[str, object]) -> Path:
    """Save a PNG whose text chunks hold ``metadata`` (prompt, seed, settings) for reproduction, and the same
    in AUTOMATIC1111's ``parameters`` chunk when there is a prompt."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise OmniditError(f"output file must end in .png, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=_png_info(metadata))
    return path


def image_bytes(image: Image.Image, image_format: str = "png", metadata: dict[str, object] | None = None,
                quality: int | None = None) -> bytes:
    """``image`` encoded as PNG (with ``metadata`` as in ``save_png``), JPEG or WebP (``quality`` 0-100)."""
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG", pnginfo=_png_info(metadata or {}))
    elif image_format in ("jpeg", "webp"):
        image.convert("RGB").save(buffer, format=image_format.upper(), quality=85 if quality is None else quality)
    else:
        raise OmniditError(f"unknown image format '{image_format}'", hint="choose png, jpeg or webp")
    return buffer.getvalue()


def read_image_file(path: str | Path, mode: str = "RGB", what: str = "the image",
                    hint: str = "pass a PNG or JPEG file that exists"):
    """An image file as a uint8 array ((H, W, 3) for RGB, (H, W) for L), or a one-line error naming ``what``."""
    import numpy as np
    from PIL import UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode)).copy()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise OmniditError(f"cannot read {what} {path}: {type(e).__name__}", hint=hint) from None


def read_rgb_tensor(path: str | Path) -> Tensor:
    """An image file as (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(read_image_file(path)).permute(2, 0, 1).float() / 127.5 - 1
