"""Steady /predict traffic for the tests that kill things under load: a few client threads, each
posting digits one at a time until stopped, bounded in time and count, every outcome recorded."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import requests


@dataclass(frozen=True)
class Outcome:
    at: float  # time.time() when the answer (or the error) came
    status: int | str  # the HTTP status, or the exception's name when no HTTP answer came
    version: str  # model_version of a 200; otherwise the body or the exception
    upstream: str  # the replica nginx finally used (its x-upstream header); "" without nginx


class Load:
    """``clients`` threads posting ``pngs`` (in turn) to ``url``/predict, pausing ``pause``
    seconds between requests, until the ``with`` block ends, ``max_requests`` were sent or
    ``max_seconds`` passed."""

    def __init__(self, url: str, pngs: Sequence[bytes], clients: int = 4, pause: float = 0.0,
                 max_requests: int = 60_000, max_seconds: float = 120.0) -> None:
        self.url, self.pngs, self.pause = url, pngs, pause
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k, clients), daemon=True) for k in range(clients)]

    def _run(self, first: int, step: int) -> None:
        session, deadline, i = requests.Session(), time.monotonic() + self.max_seconds, first
        while not self._stop.is_set() and time.monotonic() < deadline and len(self.outcomes) < self.max_requests:
            png = self.pngs[i % len(self.pngs)]
            try:
                response = session.post(f"{self.url}/predict", files={"file": ("d.png", png, "image/png")},
                                        timeout=10)
                ok = response.status_code == 200
                outcome = Outcome(time.time(), response.status_code,
                                  response.json()["model_version"] if ok else response.text,
                                  response.headers.get("x-upstream", "").split(",")[-1].strip())
            except requests.RequestException as exc:
                outcome = Outcome(time.time(), type(exc).__name__, repr(exc), "")
            self.outcomes.append(outcome)
            i += step
            self._stop.wait(self.pause)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]

    def since(self, at: float) -> list[Outcome]:
        return [o for o in self.outcomes if o.at >= at]
