"""POST /v1/images/edits: OpenAI's edit request served by inpainting. The official client's images.edit gets the
inpainted image with every pixel outside the mask exact, the same as Pipeline.inpaint; the mask follows OpenAI's
convention (transparent = edit) or omnidit's (white = edit); every malformed upload names its field."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
from fastapi.testclient import TestClient  # noqa: E402
from helpers import Live  # noqa: E402
from PIL import Image  # noqa: E402

from omnidit.images import to_pil  # noqa: E402
from omnidit.pipeline import load_pipeline  # noqa: E402
from omnidit.serve.app import build_app  # noqa: E402

SOURCE = "a red circle above a blue square"
TARGET = "a green triangle above a blue square"


@pytest.fixture(scope="module")
def shapes():
    return load_pipeline("shapes", device="cpu")


@pytest.fixture(scope="module")
def scene(shapes):
    return shapes.generate([SOURCE], seed=3, steps=8)  # (1, 3, 32, 32)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def top_half_transparent() -> np.ndarray:
    mask = np.full((32, 32, 4), 255, np.uint8)
    mask[:16, :, 3] = 0
    return mask


def inpainted_directly(pipe, image: np.ndarray, seed: int):
    """``Pipeline.inpaint`` of the top half of ``image`` (H, W, 3) uint8 under TARGET at 4 steps: what the server
    must return for the same request."""
    import torch

    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[:16] = True
    given = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    return pipe.inpaint([TARGET], given, mask, seed=[seed], steps=4)


def test_the_openai_client_edits_by_inpainting_and_keeps_every_other_pixel(shapes, scene):
    openai = pytest.importorskip("openai")
    image = np.asarray(to_pil(scene[0]))
    with Live(build_app({"shapes": shapes})) as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        result = client.images.edit(image=("scene.png", png(image), "image/png"),
                                    mask=("mask.png", png(top_half_transparent()), "image/png"), prompt=TARGET,
                                    n=2, extra_body={"seed": 7, "steps": 4})
    assert len(result.data) == 2 and result.data[0].revised_prompt == TARGET
    edited = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in result.data]
    assert all(im.size == (32, 32) and im.text["seed"] == str(7 + i) for i, im in enumerate(edited))
    pixels = [np.asarray(im.convert("RGB")) for im in edited]
    for p in pixels:
        assert np.array_equal(p[16:], image[16:]) and not np.array_equal(p[:16], image[:16])
    direct = inpainted_directly(shapes, image, seed=8)
    assert np.array_equal(np.asarray(to_pil(direct[0])), pixels[1])  # the same as Pipeline.inpaint


def test_an_image_with_transparent_pixels_is_its_own_mask_and_a_white_mask_works_too(shapes, scene):
    image = np.asarray(to_pil(scene[0]))
    rgba = np.concatenate([image, np.full((32, 32, 1), 255, np.uint8)], axis=2)
    rgba[:16, :, 3] = 0
    white = np.zeros((32, 32), np.uint8)
    white[:16] = 255
    with TestClient(build_app({"shapes": shapes})) as client:
        own = client.post("/v1/images/edits", files={"image": ("s.png", png(rgba), "image/png")},
                          data={"prompt": TARGET, "seed": "7", "steps": "4"})
        grey = client.post("/v1/images/edits", files={"image": ("s.png", png(image), "image/png"),
                                                      "mask": ("m.png", png(white), "image/png")},
                           data={"prompt": TARGET, "seed": "7", "steps": "4"})
    assert own.status_code == 200 and grey.status_code == 200, (own.text, grey.text)
    assert own.json()["data"][0]["b64_json"] == grey.json()["data"][0]["b64_json"]


@pytest.mark.parametrize("files, data, status, param", [
    ({}, {"prompt": TARGET}, 422, "image"),
    ({"image": b"not an image"}, {"prompt": TARGET}, 400, "image"),
    ({"image": "scene", "mask": np.zeros((16, 16, 4), np.uint8)}, {"prompt": TARGET}, 422, "mask"),
    ({"image": "scene", "mask": np.full((32, 32, 4), 255, np.uint8)}, {"prompt": TARGET}, 422, "mask"),
    ({"image": "scene"}, {"prompt": TARGET}, 422, "mask"),  # no mask and nothing transparent
    ({"image": np.zeros((1024, 1024, 3), np.uint8)}, {"prompt": TARGET}, 422, "image"),  # above --max-size
    ({"image": "scene", "mask": "half"}, {"prompt": TARGET, "size": "64x64"}, 422, "size"),
    ({"image": "scene", "mask": "half"}, {"prompt": TARGET, "n": "11"}, 422, "n"),
    ({"image": "scene", "mask": "half"}, {"prompt": TARGET, "strength": "0.5"}, 422, "strength"),
    ({"image": "scene", "mask": "half"}, {}, 422, "prompt"),
    ({"image": "scene", "mask": "half", "other": "half"}, {"prompt": TARGET}, 422, "other"),
])
def test_malformed_edit_requests_name_their_field(shapes, scene, files, data, status, param):
    image = np.asarray(to_pil(scene[0]))
    named = {"scene": png(image), "half": png(top_half_transparent())}
    uploads = {k: (f"{k}.png", v if isinstance(v, bytes) else named[v] if isinstance(v, str) else png(v), "image/png")
               for k, v in files.items()}
    with TestClient(build_app({"shapes": shapes})) as client:
        reply = client.post("/v1/images/edits", files=uploads or None, data=data)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"] == param and reply.json()["error"]["message"]


def test_an_edit_request_must_be_a_form(shapes):
    with TestClient(build_app({"shapes": shapes})) as client:
        reply = client.post("/v1/images/edits", json={"prompt": TARGET})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_content_type"


def test_edits_to_the_shipped_inpainting_adapter_use_it(shapes, scene):

    inpainter = load_pipeline("shapes-inpaint", device="cpu")
    image = np.asarray(to_pil(scene[0]))
    form = {"image": ("s.png", png(image), "image/png"), "mask": ("m.png", png(top_half_transparent()), "image/png")}
    with TestClient(build_app({"shapes": shapes, "shapes-inpaint": inpainter})) as client:
        served = {name: client.post("/v1/images/edits", files=form, data={"model": name, "prompt": TARGET,
                                                                         "seed": "7", "steps": "4"})
                  for name in ("shapes", "shapes-inpaint")}
    assert all(reply.status_code == 200 for reply in served.values()), {k: r.text for k, r in served.items()}
    pixels = {name: np.asarray(Image.open(io.BytesIO(base64.b64decode(reply.json()["data"][0]["b64_json"])))
                               .convert("RGB")) for name, reply in served.items()}
    direct = inpainted_directly(inpainter, image, seed=7)
    assert np.array_equal(np.asarray(to_pil(direct[0])), pixels["shapes-inpaint"])
    assert not np.array_equal(pixels["shapes-inpaint"], pixels["shapes"])
