"""The web page end to end in headless Chromium (Playwright with Debian's ``chromium``): type a prompt, see
the progress events arrive, the image appear, and download it with its PNG metadata. Skipped where
Playwright or a chromium binary is missing (``.ci/run`` installs both where it can)."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")

from helpers import Live  # noqa: E402
from PIL import Image  # noqa: E402

from omnidit.pipeline import load_pipeline  # noqa: E402
from omnidit.serve.app import build_app  # noqa: E402


def test_the_page_draws_an_image_with_progress_and_downloads_it_with_metadata(tmp_path):
    with Live(build_app({"shapes": load_pipeline("shapes", device="cpu")})) as server, \
            sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(accept_downloads=True)
            page.goto(server.url + "/")
            page.wait_for_selector("#model option[value=shapes]", state="attached")
            page.fill("#prompt", "a green triangle")
            page.fill("#steps", "4")
            page.fill("#seed", "7")
            page.click("#go")
            page.wait_for_selector("img.result", timeout=60_000)
            assert page.text_content("#status").startswith("done")
            assert page.eval_on_selector("#bar", "bar => [bar.value, bar.max]") == [4, 4]  # progress reached step 4
            assert page.get_attribute("img.result", "alt") == "a green triangle"
            with page.expect_download() as download:
                page.click("a.download")
            path = tmp_path / download.value.suggested_filename
            download.value.save_as(path)
        finally:
            browser.close()
    image = Image.open(path)
    assert path.name == "omnidit-7.png" and image.size == (32, 32)
    assert image.text["prompt"] == "a green triangle" and image.text["seed"] == "7"
    assert "Steps: 4" in image.text["parameters"]
