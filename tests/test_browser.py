"""The drawing page in a real headless Chromium: draw with the mouse, predict, send feedback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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

    page.click("#labels button[data-label='7']")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('thanks')", timeout=30_000)
    assert len(list((registry_copy.root / "feedback").glob("*.safetensors"))) == 1

    page.click("#clear")
    page.click("#predict")  # nothing drawn: the service says there is no ink
    page.wait_for_function("document.getElementById('status').textContent.includes('no visible ink')",
                           timeout=30_000)
