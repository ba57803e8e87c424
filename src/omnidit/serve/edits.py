"""``POST /v1/images/edits``: OpenAI's image edit request, a multipart form with ``image``, ``mask``, ``prompt`` and
the generation request's other fields, served by inpainting (omnidit.inpaint). The pixels that the mask leaves
transparent (alpha 0) in a mask with an alpha channel (OpenAI's convention), or white in one without (omnidit
inpaint's), are generated and every other pixel comes back exactly. Without a mask the image's own transparent
pixels are the mask, as in OpenAI's API. The result has the image's size."""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from torch import Tensor

from omnidit.serve.app import ApiError, ImageRequest

MAX_UPLOAD_BYTES = 16 * 2**20  # per file
FILE_FIELDS = ("image", "mask")


async def read_edit_request(request: Request, max_pixels: int) -> tuple[ImageRequest, tuple[Tensor, Tensor]]:
    """The request's fields as an ImageRequest (its size set to the image's) and (image (1, 3, H, W) in [-1, 1],
    mask (H, W) bool, True = generate); a 4xx ApiError naming the field otherwise."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise ApiError(400, "an edit request is a multipart form (image, mask, prompt, ...), as OpenAI's images.edit "
                            "sends", code="invalid_content_type")
    form = await request.form(max_files=8, max_fields=64)  # bounded; beyond the two, a 422 names the extra one
    files: dict[str, UploadFile] = {}
    fields: dict[str, object] = {}
    for key, value in form.multi_items():
        name = key.removesuffix("[]")  # the openai client names a list of images "image[]"
        if isinstance(value, UploadFile):
            if name not in FILE_FIELDS:
                raise ApiError(422, f"unknown file field '{key}'", param=key)
            if name in files:
                raise ApiError(422, f"one {name} per request", param=name)
            files[name] = value
        else:
            fields[name] = value
    if "image" not in files:
        raise ApiError(422, "the field 'image' is required (a PNG, JPEG or WebP file)", param="image")
    if isinstance(fields.get("boxes"), str):
        try:
            fields["boxes"] = json.loads(fields["boxes"])
        except json.JSONDecodeError:
            raise ApiError(422, "boxes: not JSON (a list of {\"phrase\", \"box\"})", param="boxes") from None
    try:
        body = ImageRequest(**fields)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None
    rgba, image_alpha = await _read_image(files["image"], "image", max_pixels)
    h, w = rgba.shape[:2]
    if body.size not in (None, "auto", f"{w}x{h}"):
        raise ApiError(422, f"size {body.size} differs from the image's {w}x{h}: an edit keeps the image's size",
                       param="size")
    if "mask" in files:
        pixels, alpha = await _read_image(files["mask"], "mask", max_pixels)
        if pixels.shape[:2] != (h, w):
            raise ApiError(422, f"the mask is {pixels.shape[1]}x{pixels.shape[0]} but the image is {w}x{h}",
                           param="mask")
        mask = pixels[..., 3] == 0 if alpha else pixels[..., :3].mean(axis=2) > 127
    elif image_alpha:
        mask = rgba[..., 3] == 0
    else:
        raise ApiError(422, "give a mask (transparent where to edit) or an image with transparent pixels",
                       param="mask")
    if not mask.any():
        raise ApiError(422, "the mask marks no pixels to edit (transparent, or white in a mask without alpha)",
                       param="mask")
    body.size = f"{w}x{h}"
    image = torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    return body, (image, torch.from_numpy(mask))


async def _read_image(upload: UploadFile, name: str, max_pixels: int) -> tuple[np.ndarray, bool]:
    """(H, W, 4) uint8 RGBA of an uploaded image (alpha 255 where the file has none) and whether the file has an
    alpha channel, or a 4xx ApiError. The size is checked from the header, before any pixel is decoded."""
    data = await upload.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise ApiError(413, f"{name} is larger than {MAX_UPLOAD_BYTES // 2**20} MiB", param=name)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise ApiError(422, f"the {name} is {img.width}x{img.height}, above this server's limit of "
                                    f"{max_pixels} pixels", param=name)
            has_alpha = "A" in img.getbands() or "transparency" in img.info
            return np.asarray(img.convert("RGBA")), has_alpha
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        raise ApiError(400, f"{name} is not a PNG, JPEG or WebP image", param=name) from None
