"""The admin console in a real headless Chromium: captured traffic -> labelled with the keyboard ->
fine-tune on the reviewed items -> promoted -> /predict answers with the new version; a canary
started, compared and aborted from the console."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import requests
from PIL import Image

from devtools.demo_loop import fingerprint, struck
from model.preprocess import prepare_digit
from tests.conftest import post_png, serves_everywhere, wait_until
from tests.test_browser import browser  # noqa: F401 - the Chromium fixture

TOKEN = "console-admin-token"
LABELLED = 30  # with a 20 % hold-out, 6 held-out samples: enough for min_holdout_samples 5
FAST = {"epochs": 1, "min_holdout_samples": 5, "guard_slices": False}  # the journey, not the gate, is tested


def selected(page) -> tuple[str, np.ndarray]:
    cell = page.locator(".item.selected")
    src = cell.locator("img").get_attribute("src")
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))
    return cell.get_attribute("data-id"), pixels


def test_label_in_the_console_fine_tune_and_promote(browser, start_server, registry_copy,  # noqa: F811
                                                    mnist_test) -> None:
    server = start_server(registry_copy.root, admin_token=TOKEN, review_sample="0",
                          review_max_per_second="100000")
    images, labels = (t.numpy() for t in mnist_test)
    sent = [(struck(images[i]), int(labels[i])) for i in range(100)]
    truth = {fingerprint(prepare_digit(png)): label for png, label in sent}
    unsure = sum(post_png(server.url, png).json()["confidence"] < 0.8 for png, _ in sent)
    assert unsure >= LABELLED + 5

    page = browser.new_page()
    page.goto(server.url + "/admin")
    page.fill("#token", TOKEN)
    page.click("#signin")
    page.wait_for_selector(".item.selected", timeout=30_000)
    for _ in range(LABELLED):
        item_id, pixels = selected(page)
        page.keyboard.press(str(truth[fingerprint(pixels)]))
        page.wait_for_function(f"document.querySelector('.item.selected')?.dataset.id !== '{item_id}'",
                               timeout=15_000)
    item_id, _ = selected(page)
    page.keyboard.press("s")  # skip one, discard the next
    page.wait_for_function(f"document.querySelector('.item.selected')?.dataset.id !== '{item_id}'", timeout=15_000)
    page.keyboard.press("x")
    page.wait_for_function("document.getElementById('status').textContent.includes('discarded')", timeout=15_000)

    auth = {"Authorization": f"Bearer {TOKEN}"}
    stored = requests.get(f"{server.url}/admin/review/items", params={"status": "labelled", "limit": 1000},
                          headers=auth, timeout=10).json()
    assert len(stored) == LABELLED
    assert all(truth[fingerprint(np.asarray(Image.open(io.BytesIO(base64.b64decode(i["image_png"])))))]
               == i["state"]["label"] for i in stored)

    page.reload()  # the token is kept for the tab: no second sign-in
    page.wait_for_selector("#app:not([hidden])", timeout=15_000)
    page.fill("#ft-options", json.dumps(FAST))
    page.click("#finetune")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('job ')", timeout=15_000)
    page.wait_for_function("[...document.querySelectorAll('#jobs td.state')].some("
                           "(td) => td.textContent.startsWith('succeeded'))", timeout=240_000)
    assert "v0002" in page.text_content("#jobs")
    page.wait_for_function("document.querySelector('#versions tr[data-version=\"v0002\"]')?.textContent"
                           ".includes('active')", timeout=15_000)
    assert serves_everywhere(server.url, "v0002")
    assert post_png(server.url, sent[0][0]).json()["model_version"] == "v0002"
    assert wait_until(lambda: page.locator("#counts").text_content().count(f"({LABELLED} trained on)") == 1, 10)

    # a canary of the previous version from the console: compared there, then aborted
    page.fill("#canary-percent", "50")
    page.click('#versions button[data-canary="v0001"]')
    page.wait_for_function("document.getElementById('canary-state').textContent.startsWith('v0001 serves 50')",
                           timeout=15_000)
    def everyone_has_it() -> bool:
        state = requests.get(f"{server.url}/admin/canary", headers=auth, timeout=10).json()
        return state["holders_with_canary"] == state["holders"]

    assert wait_until(everyone_has_it, 15)
    answered = {post_png(server.url, png).json()["model_version"] for png, _ in sent[:60]}
    assert answered == {"v0001", "v0002"}  # half of 60 to each, give or take
    page.wait_for_function("document.querySelector('#canary-compare tbody').textContent.includes('canary')",
                           timeout=15_000)
    page.click("#canary-abort")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('aborted')", timeout=15_000)
    assert requests.get(f"{server.url}/admin/canary", headers=auth, timeout=10).json()["canary"] is None
