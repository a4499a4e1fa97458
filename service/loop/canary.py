"""Canary rollout in a model holder: the second version it serves beside the live one, and the split.

The registry's CANARY pointer (``Registry.canary``) names a version and a percent. Every model
holder (an API server on CPU, an inference worker otherwise) polls it with the ACTIVE pointer,
loads that version beside its live one, and sends that share of requests to it, chosen per
request at random, so every replica on the registry honours the same split. A client may pin
either version (``X-Model-Version``, or the V2 protocol's model version).

A canary that cannot be loaded, or that fails while serving, is dropped in this holder (its
requests go to the live version, none fails) until the CANARY pointer changes.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from model.registry import Registry
from service.http.errors import ClientError

if TYPE_CHECKING:
    from service.inference.model_slot import Serving

log = logging.getLogger("digits.canary")
PIN_HEADER = "x-model-version"
UNREAD = (-1, -1)  # a marker no file has: the first poll reads the pointer


@dataclass(frozen=True)
class CanaryState:
    serving: Serving  # the slot's Serving of the canary version
    percent: float

    @property
    def version(self) -> str:
        return self.serving.version


class CanaryArm:
    """The canary this holder serves, if any. ``state`` is replaced whole (one attribute
    assignment), so a prediction reads one consistent canary without a lock."""

    def __init__(self, registry: Registry, build: Callable[[str], Serving]) -> None:
        """``build(version)``: the slot's Serving of that version (raises when it cannot load)."""
        self.registry, self.build = registry, build
        self.marker: tuple[int, int] | None = UNREAD
        self.state: CanaryState | None = None

    def refresh(self, live_version: str | None) -> bool:
        """Follow the CANARY pointer; True when it changed. Never raises: a load failure is
        logged and kept (the canary is not served here) until the pointer changes again; an
        unreadable pointer is retried at the next poll."""
        if self.state is not None and self.state.version == live_version:
            self.state = None  # promoted (or activated): it is the live version now, served once
            return True
        try:
            marker = self.registry.canary_marker()
            if marker == self.marker:
                return False
            canary = self.registry.canary()
        except Exception as exc:  # e.g. the shared volume unreachable: keep what is served, retry
            log.warning("cannot read the canary pointer (%s); retrying", exc)
            return False
        self.marker = marker
        if canary is None or canary.version == live_version:
            self.state = None
            return True
        current = self.state
        if current is not None and current.version == canary.version:
            self.state = CanaryState(current.serving, canary.percent)
            return True
        try:
            serving = self.build(canary.version)
        except Exception:  # any load failure: the live version serves everything
            log.exception("cannot load canary %s; serving the live version only", canary.version)
            self.state = None
            return True
        if not self._still(marker):  # aborted (or replaced) while it loaded: not served; the next poll reads anew
            self.marker, self.state = UNREAD, None
            return True
        self.state = CanaryState(serving, canary.percent)
        log.info("serving canary %s to %s%% of requests", canary.version, canary.percent)
        return True

    def _still(self, marker: tuple[int, int] | None) -> bool:
        """The pointer is still the one read as ``marker`` (an abort answers once no holder announces
        the canary: one that finished loading it after the abort must not start serving it)."""
        try:
            return self.registry.canary_marker() == marker
        except Exception:
            return False

    def pick(self, live: Serving, pin: str | None) -> Serving:
        """The Serving for one request: the canary for its share (or when pinned to it), else ``live``."""
        state = self.state
        if state is None:
            return live
        if pin is not None:
            return state.serving if pin == state.version else live
        return state.serving if random.random() * 100 < state.percent else live

    def failed(self, serving: Serving, exc: Exception) -> None:
        """The canary raised while serving: drop it here (the caller answers with the live version)."""
        log.error("canary %s failed while serving (%s); serving the live version only", serving.version, exc)
        if self.state is not None and self.state.serving is serving:
            self.state = None


def check_pin(registry: Registry, pin: str | None) -> str | None:
    """A pinned version must be the active or the canary version (else 422); '' means no pin."""
    if not pin:
        return None
    active, canary = registry.active_version(), registry.canary()
    served = [v for v in (active, canary.version if canary else None) if v]
    if pin not in served:
        raise ClientError(422, "version_not_served",
                          f"{PIN_HEADER} {pin[:20]!r} is not served; pin one of {served} "
                          "(the active or the canary version)")
    return pin


def check_pinned_answer(pin: str | None, served: str) -> None:
    """A pinned request answered by another version (its canary is still loading or was just
    dropped, or ACTIVE moved meanwhile) is a 503 to retry, never a silent substitute."""
    if pin is not None and served != pin:
        raise ClientError(503, "version_unavailable",
                          f"version {pin} is not loaded by the model holder that took the request "
                          f"(it served {served}); retry", headers={"Retry-After": "1"})
