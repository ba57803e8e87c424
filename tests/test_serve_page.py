"""The web page end to end in headless Chromium (Playwright with Debian's ``chromium``): type a prompt, see
the progress events arrive, the image appear, and download it with its PNG metadata. Skipped where
Playwright or a chromium binary is missing (``.ci/run`` installs both where it can)."""

from __future__ import annotations

import contextlib
import shutil

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")

import numpy as np  # noqa: E402
from helpers import Live  # noqa: E402
from PIL import Image  # noqa: E402

from omnidit.pipeline import load_pipeline  # noqa: E402
from omnidit.serve.app import build_app  # noqa: E402


@contextlib.contextmanager
def _page(name: str, model: str, api_key: str | None = None, **more: str):
    """The page of a server that serves the shipped ``model`` as ``name`` (and ``more`` as their keys), open in
    headless Chromium; with ``api_key`` the server asks for that key and the page is yielded before it has one."""
    models = {name: model, **more}
    app = build_app({k: load_pipeline(v, device="cpu") for k, v in models.items()}, api_key=api_key)
    with Live(app) as server, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(accept_downloads=True)
            page.goto(server.url + "/")
            if api_key is None:
                page.wait_for_selector(f"#model option[value={name}]", state="attached")
            yield page
        finally:
            browser.close()


def _download(page, selector: str, folder):
    """Click the download link ``selector`` and save the file in ``folder`` under the name the page gives it."""
    folder.mkdir(exist_ok=True)
    with page.expect_download() as download:
        page.click(selector)
    target = folder / download.value.suggested_filename
    download.value.save_as(target)
    return target


def test_the_page_draws_an_image_with_progress_and_downloads_it_with_metadata(tmp_path):
    with _page("shapes", "shapes") as page:
        page.fill("#prompt", "a green triangle")
        page.fill("#steps", "4")
        page.fill("#seed", "7")
        page.click("#go")
        page.wait_for_selector("img.result", timeout=60_000)
        assert page.text_content("#status").startswith("done")
        assert page.eval_on_selector("#bar", "bar => [bar.value, bar.max]") == [4, 4]  # progress reached step 4
        assert page.get_attribute("img.result", "alt") == "a green triangle"
        path = _download(page, "a.download", tmp_path)
    image = Image.open(path)
    assert path.name == "omnidit-7.png" and image.size == (32, 32)
    assert image.text["prompt"] == "a green triangle" and image.text["seed"] == "7"
    assert "Steps: 4" in image.text["parameters"]


def _drag(page, selector: str, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Drag the mouse across the element from one point to another, each in fractions of its content box."""
    box = page.locator(selector).bounding_box()  # border box: the canvases have a 1-pixel border
    x, y, w, h = box["x"] + 1, box["y"] + 1, box["width"] - 2, box["height"] - 2
    page.mouse.move(x + start[0] * w, y + start[1] * h)
    page.mouse.down()
    page.mouse.move(x + (start[0] + end[0]) / 2 * w, y + (start[1] + end[1]) / 2 * h)
    page.mouse.move(x + end[0] * w, y + end[1] * h)
    page.mouse.up()


def test_the_page_inpaints_a_result_with_a_dragged_mask_and_keeps_every_other_pixel(tmp_path):
    with _page("shapes", "shapes") as page:
        assert page.is_hidden("#inpaint-fields") and page.is_hidden("#layout-fields")  # no layout adapter
        page.fill("#prompt", "a red circle above a blue square")
        page.fill("#steps", "4")
        page.fill("#seed", "3")
        page.click("#go")
        page.wait_for_selector("img.result", timeout=60_000)
        before = Image.open(_download(page, "a.download", tmp_path / "first"))
        page.click("button.inpaint-this")
        page.wait_for_selector("#inpaint-fields", state="visible")
        assert page.text_content("#go") == "Inpaint"
        page.click("#go")  # no mask yet: the page says so and sends nothing
        assert page.text_content("#status") == "drag on the image to mark what to regenerate"
        _drag(page, "#mask-canvas", (0.01, 0.01), (0.5, 0.99))  # the left half, snapped to whole pixels
        page.fill("#prompt", "a green triangle above a blue square")
        page.click("#go")
        page.wait_for_selector("figure:nth-child(1) img.result[alt^='a green']", timeout=60_000)
        assert page.text_content("#status").startswith("done")
        after = Image.open(_download(page, "figure:nth-child(1) a.download", tmp_path / "second"))
    old, new = np.asarray(before.convert("RGB")), np.asarray(after.convert("RGB"))
    assert new.shape == old.shape == (32, 32, 3)
    assert np.array_equal(new[:, 16:], old[:, 16:])  # outside the mask: exactly the input
    assert not np.array_equal(new[:, :16], old[:, :16])
    assert after.text["prompt"] == "a green triangle above a blue square"


def test_the_page_draws_layout_boxes_for_a_layout_model_and_sends_them(tmp_path):
    with _page("layout", "shapes-layout", shapes="shapes") as page:
        page.wait_for_selector("#layout-fields", state="visible")
        box = page.locator("#box-canvas").bounding_box()
        page.mouse.click(box["x"] + 100, box["y"] + 100)  # a click is no box
        assert page.locator("#boxes li").count() == 0
        _drag(page, "#box-canvas", (0.5, 0.5), (0.945, 0.945))  # snapped outward to hundredths
        assert page.text_content("#boxes .coords").strip() == "0.50 0.50 0.95 0.95"
        page.fill("#steps", "4")
        page.fill("#seed", "5")
        page.click("#go")  # the box has no phrase yet: the browser holds the form back
        assert page.eval_on_selector("#boxes .phrase", "phrase => phrase.validity.valueMissing")
        page.fill("#boxes .phrase", "  ")
        page.click("#go")
        assert page.text_content("#status") == "say what goes in every box (or remove it)"
        assert page.locator("img.result").count() == 0
        page.fill("#boxes .phrase", "a red circle")
        page.fill("#prompt", "a red circle")
        page.click("#go")
        page.wait_for_selector("img.result", timeout=60_000)
        drawn = _download(page, "a.download", tmp_path / "drawn")
        page.set_input_files("#source", str(drawn))  # a file to inpaint, with the same box: a move's request
        page.wait_for_selector("#inpaint-fields", state="visible")
        assert page.text_content("#status").startswith(f"inpainting {drawn.name} (32x32)")
        _drag(page, "#mask-canvas", (0.01, 0.01), (0.99, 0.4))
        page.click("#go")
        page.wait_for_selector("figure:nth-child(2) img.result", timeout=60_000)
        inpainted = Image.open(_download(page, "figure:nth-child(1) a.download", tmp_path / "inpainted"))
        _drag(page, "#box-canvas", (0.1, 0.1), (0.3, 0.3))  # a box without its phrase, then a model without boxes
        page.select_option("#model", "shapes")
        page.select_option("#task", "generate")
        assert page.is_hidden("#layout-fields")
        page.click("#go")  # the hidden box's empty phrase does not hold the form back
        page.wait_for_selector("figure:nth-child(3) img.result", timeout=60_000)
    for image in (Image.open(drawn), inpainted):
        assert image.text["boxes"] == "[['a red circle', 0.5, 0.5, 0.95, 0.95]]"
    kept = slice(13, 32)  # below the rows the dragged mask covers (0.4 of 32, rounded up to whole pixels)
    before, after = (np.asarray(Image.open(path).convert("RGB")) for path in (drawn, inpainted.filename))
    assert np.array_equal(after[kept], before[kept])


def test_the_page_asks_for_the_api_key_of_a_server_that_needs_one_and_sends_it(tmp_path):
    with _page("shapes", "shapes", api_key="s3cret") as page:
        page.wait_for_selector("#key-form", state="visible")
        assert page.text_content("#status") == "this server asks for an API key"
        assert page.locator("#model option").count() == 0
        page.click("#go")  # nothing to draw with yet: the page says what is missing and sends nothing
        assert page.text_content("#status") == "enter the server's API key first"
        page.fill("#api-key", "wrong")
        page.click("#key-go")
        page.wait_for_function("document.querySelector('#status').textContent.startsWith('that API key')")
        assert page.locator("#model option").count() == 0
        page.fill("#api-key", "s3cret")
        page.click("#key-go")
        page.wait_for_selector("#model option[value=shapes]", state="attached")
        assert page.text_content("#status") == "" and page.is_hidden("#key-form")
        page.fill("#prompt", "a blue square")
        page.fill("#steps", "2")
        page.fill("#seed", "1")
        page.click("#go")  # the generation request carries the key too
        page.wait_for_selector("img.result", timeout=60_000)
        assert page.text_content("#status").startswith("done")
        page.reload()  # the key stays for this tab's session
        page.wait_for_selector("#model option[value=shapes]", state="attached")
        assert page.is_hidden("#key-form")
