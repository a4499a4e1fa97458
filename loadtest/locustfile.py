"""Locust load test for digit-service: real MNIST test digits, every answer checked.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000      # web UI
    make loadtest                                                       # headless, with pass/fail

Environment:
    LOADTEST_WEIGHTS        user mix, default "multipart=8,json=4,feedback=1,admin=1"
    LOADTEST_MAX_P99_MS     p99 bound over all requests (default 1000)
    LOADTEST_MAX_WRONG      largest wrong-digit rate (default 0.02)
    DIGITS_ADMIN_TOKEN      enables the (rare) admin fine-tune user
    DIGITS_DATA_DIR         prepared MNIST (default data)
"""

from __future__ import annotations

import base64
import os
import random

from locust import FastHttpUser, between, constant, events, task

from model.data import IDX_FILES, raw_dir, read_idx
from model.preprocess import encode_png
from service.settings import Settings

WEIGHTS = dict(
    (name, int(value))
    for name, value in (item.split("=") for item in os.environ.get(
        "LOADTEST_WEIGHTS", "multipart=8,json=4,feedback=1,admin=1").split(","))
)
ADMIN_TOKEN = Settings().admin_token_value() or ""
MAX_P99_MS = float(os.environ.get("LOADTEST_MAX_P99_MS", "1000"))
MAX_WRONG = float(os.environ.get("LOADTEST_MAX_WRONG", "0.02"))


def load_digits(count: int = 500) -> list[tuple[bytes, int]]:
    directory = raw_dir(Settings().data_dir)
    images = read_idx(directory / IDX_FILES["test_images"])[:count]
    labels = read_idx(directory / IDX_FILES["test_labels"])[:count]
    return [(encode_png(image), int(label)) for image, label in zip(images, labels, strict=True)]


DIGITS = load_digits()
answers = {"checked": 0, "wrong": 0}


def check_digit(response, label: int) -> None:
    if response.status_code != 200:
        response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
        return
    try:
        digit = response.json()["digit"]
    except (ValueError, KeyError):
        response.failure(f"not a prediction: {response.text[:200]}")
        return
    answers["checked"] += 1
    answers["wrong"] += digit != label
    response.success()


class PredictMultipartUser(FastHttpUser):
    """A client uploading PNG files, the common case."""

    weight = WEIGHTS.get("multipart", 0)
    wait_time = constant(0)

    @task
    def predict_file(self) -> None:
        png, label = random.choice(DIGITS)
        with self.client.post("/predict", files={"file": ("digit.png", png, "image/png")}, name="/predict [file]",
                              catch_response=True) as response:
            check_digit(response, label)


class PredictJsonUser(FastHttpUser):
    """A browser canvas sending a data URL."""

    weight = WEIGHTS.get("json", 0)
    wait_time = constant(0)

    @task
    def predict_json(self) -> None:
        png, label = random.choice(DIGITS)
        body = {"image": "data:image/png;base64," + base64.b64encode(png).decode()}
        with self.client.post("/predict", json=body, name="/predict [json]", catch_response=True) as response:
            check_digit(response, label)


class FeedbackUser(FastHttpUser):
    """Users correcting predictions now and then."""

    weight = WEIGHTS.get("feedback", 0)
    wait_time = between(0.5, 2)

    @task
    def feedback(self) -> None:
        png, label = random.choice(DIGITS)
        with self.client.post("/feedback", json={"image": base64.b64encode(png).decode(), "label": label},
                              catch_response=True) as response:
            if response.status_code != 201:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")


class AdminUser(FastHttpUser):
    """An operator launching a small fine-tune, rarely."""

    weight = WEIGHTS.get("admin", 0) if ADMIN_TOKEN else 0
    fixed_count = 1 if weight else 0
    wait_time = between(20, 40)

    @task
    def finetune(self) -> None:
        picked = random.sample(DIGITS, 40)
        samples = [{"image": base64.b64encode(png).decode(), "label": label} for png, label in picked]
        with self.client.post("/admin/finetune", json={"samples": samples, "epochs": 1},
                              headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, catch_response=True) as response:
            if response.status_code != 202:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")


@events.quitting.add_listener
def verdict(environment, **_kwargs) -> None:
    """Non-zero exit when a request failed, too many digits were wrong, or p99 is over the bound."""
    total = environment.stats.total
    p99 = total.get_response_time_percentile(0.99) or 0.0
    wrong_rate = answers["wrong"] / answers["checked"] if answers["checked"] else 1.0
    problems = []
    if total.num_failures:
        problems.append(f"{total.num_failures} failed requests")
    if wrong_rate > MAX_WRONG:
        problems.append(f"wrong-digit rate {wrong_rate:.2%} > {MAX_WRONG:.0%}")
    if p99 > MAX_P99_MS:
        problems.append(f"p99 {p99:.0f} ms > {MAX_P99_MS:.0f} ms")
    print(f"\nverdict: {total.num_requests} requests, {total.num_failures} failed, "
          f"{answers['checked']} answers checked, wrong-digit rate {wrong_rate:.2%}, p99 {p99:.0f} ms "
          f"-> {'FAIL: ' + '; '.join(problems) if problems else 'PASS'}")
    environment.process_exit_code = 1 if problems else 0
