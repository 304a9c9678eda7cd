"""The web page of ``maskrcnn serve`` in a real headless Chromium (selenium + chromedriver):
pick an image, see the masks drawn where the API says they are, switch a class off.

Chromium comes from ``.ci/install-browser``; without it this test fails (it is never skipped).
"""

from __future__ import annotations

import io
import shutil
import time

import numpy as np
import pytest
import requests
from PIL import Image
from pycocotools import mask as mask_util

from maskrcnn.serve.app import ServeOptions, create_app
from maskrcnn.weights.checkpoint import load

from .helpers import RunningServer

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
DRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = next((p for p in CHROMIUM if shutil.which(p)), None)
    assert binary is not None and shutil.which(DRIVER), "Chromium and chromedriver are needed: run .ci/install-browser"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--force-device-scale-factor=1",
        "--window-size=1200,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _canvas_pixels(driver, canvas) -> np.ndarray:
    """The canvas as the screen shows it: a screenshot of the element less its 1-px CSS border, (h, w, 3)."""
    return np.asarray(Image.open(io.BytesIO(canvas.screenshot_as_png)).convert("RGB")).astype(int)[1:-1, 1:-1]


def test_the_page_draws_the_masks_and_hides_a_class(browser, tiny_ckpt, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    h, w = 120, 160
    picture = np.full((h, w, 3), 200, np.uint8)  # flat grey: any tint is the overlay's
    path = tmp_path / "grey.png"
    Image.fromarray(picture).save(path)
    app = create_app(load(tiny_ckpt), ServeOptions(), weights="tiny.pth")
    with RunningServer(app) as url:
        reference = requests.post(
            f"{url}/predict", data=path.read_bytes(), headers={"Content-Type": "image/png"}
        ).json()
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1"
        )
        browser.find_element(By.ID, "pick").send_keys(str(path))
        canvas = WebDriverWait(browser, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "canvas[data-done='1']"))
        shot = _canvas_pixels(browser, canvas)
        assert shot.shape[:2] == (h, w)
        # Where the API's masks are (decoded by pycocotools), the page tints; away from every
        # mask and box (labels sit on the boxes), it shows the picture untouched.
        masks = [mask_util.decode(e["segmentation"]).astype(bool) for e in reference["results"]]
        assert masks and any(m.any() for m in masks)
        covered = np.any(masks, axis=0)
        boxes = np.zeros((h, w), bool)
        for e in reference["results"]:
            x, y, bw, bh = e["bbox"]
            boxes[max(0, int(y) - 20) : int(y + bh) + 3, max(0, int(x) - 3) : int(x + bw) + 100] = True
        changed = np.abs(shot - 200).sum(-1) > 6
        assert changed[covered].mean() > 0.95
        assert not changed[~covered & ~boxes].any()

        # Every class switched off: the picture comes back as it was.
        for box in browser.find_elements(By.CSS_SELECTOR, "#classes input[type=checkbox]"):
            box.click()
        time.sleep(0.3)
        plain = _canvas_pixels(browser, canvas)
        assert np.abs(plain - 200).max() <= 2
        caption = canvas.find_element(By.XPATH, "preceding-sibling::div").text
        assert f"0 of {len(masks)} detections shown" in caption
        assert browser.find_element(By.ID, "download").is_enabled()
