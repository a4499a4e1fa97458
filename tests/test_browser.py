"""The drawing page in a real headless Chromium: draw with the mouse or give it a photo (file input, drag and
drop), predict, see the 28x28 digit the model was given, send feedback."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from model.photoset import photo_set

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

if not Path(CHROMIUM).exists():  # .ci/run installs it; say so loudly anywhere else
    pytest.fail(f"Chromium not found at {CHROMIUM}: `apt-get install chromium` (.ci/run does)", pytrace=False)


def stroke(page, points: list[tuple[int, int]]) -> None:
    box = page.locator("#pad").bounding_box()
    page.mouse.move(box["x"] + points[0][0], box["y"] + points[0][1])
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(box["x"] + x, box["y"] + y, steps=8)
    page.mouse.up()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_FLAGS)
        yield browser
        browser.close()


def test_draw_predict_and_correct(browser, start_server, registry_copy, tmp_path: Path) -> None:
    server = start_server(registry_copy.root, trainer_enabled="false")
    page = browser.new_page()
    page.goto(server.url + "/")
    assert page.title() == "digit-service"

    stroke(page, [(140, 40), (140, 240)])  # a plain vertical stroke: a one
    page.click("#predict")
    page.wait_for_function("document.getElementById('digit').textContent !== '?'", timeout=30_000)
    assert page.text_content("#digit") == "1"
    assert "model v0001" in page.text_content("#meta")
    assert page.locator("#bars .bar").count() == 10
    page.screenshot(path=str(tmp_path / "browser-one.png"))

    page.click("#clear")
    stroke(page, [(80, 50), (200, 50), (110, 240)])  # a seven: top bar, then down to the left
    page.click("#predict")
    page.wait_for_function("document.getElementById('digit').textContent !== '?'", timeout=30_000)
    assert page.text_content("#digit") == "7"

    page.click("#labels button[data-label='7']")  # the same digit: a confirmation, stored, correcting nothing
    page.wait_for_function("document.getElementById('status').textContent.startsWith('thanks')", timeout=30_000)
    page.click("#labels button[data-label='1']")  # another digit: a correction of v0001's answer
    page.wait_for_function("document.getElementById('status').textContent.includes('(2 corrections')",
                           timeout=30_000)
    assert len(list((registry_copy.root / "feedback").glob("*.safetensors"))) == 2
    exposition = requests.get(f"{server.url}/metrics", timeout=10).text
    assert 'digits_feedback_corrections_total{version="v0001"} 1.0' in exposition

    page.click("#clear")
    page.click("#predict")  # nothing drawn: the service says there is no ink
    page.wait_for_function("document.getElementById('status').textContent.includes('no visible ink')",
                           timeout=30_000)


def seen_digit(page) -> np.ndarray:
    """The 28x28 image the page shows as what the model saw."""
    src = page.get_attribute("#seen", "src")
    assert src.startswith("data:image/png;base64,") and page.is_visible("#seen")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))


def test_photo_by_file_and_by_drop_shows_what_the_model_saw(browser, start_server, registry_copy, mnist_test,
                                                          tmp_path: Path) -> None:
    images, labels = (t.numpy() for t in mnist_test)
    photos = photo_set(images, labels, 1, seed=4, conditions=("ruled", "shadow"))  # a 5 and an 8
    server = start_server(registry_copy.root, trainer_enabled="false")
    page = browser.new_page()
    page.goto(server.url + "/")

    stroke(page, [(140, 40), (140, 240)])  # a drawing first: the answer comes with its 28x28 input
    page.click("#predict")
    page.wait_for_function("document.getElementById('digit').textContent !== '?'", timeout=30_000)
    drawn = seen_digit(page)
    assert drawn.shape == (28, 28) and drawn.max() > 200 and drawn[0].max() == 0  # white on black, centred

    chosen = tmp_path / "photo.jpg"
    chosen.write_bytes(photos[0].jpeg)
    page.set_input_files("#file", str(chosen))
    page.wait_for_function(f"document.getElementById('digit').textContent === '{photos[0].label}'", timeout=30_000)
    assert not np.array_equal(seen_digit(page), drawn)

    dropped = photos[1]
    page.evaluate("""([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], name, {type: "image/jpeg"}));
        document.getElementById("drop").dispatchEvent(
            new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
    }""", [base64.b64encode(dropped.jpeg).decode(), "dropped.jpg"])
    page.wait_for_function(f"document.getElementById('digit').textContent === '{dropped.label}'", timeout=30_000)
    page.screenshot(path=str(tmp_path / "browser-photo.png"))

    page.click(f"#labels button[data-label='{dropped.label}']")  # feedback sends the photo itself
    page.wait_for_function("document.getElementById('status').textContent.startsWith('thanks')", timeout=30_000)
    assert len(list((registry_copy.root / "feedback").glob("*.safetensors"))) == 1
