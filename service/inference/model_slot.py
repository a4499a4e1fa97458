"""The one model a process serves, and how it changes: hot swaps and the ONNX fallback.

A process (an API server on CPU, an inference worker otherwise) holds one :class:`Serving`
state, replaced whole under a lock: a prediction always sees one runtime, version and reason.
A watcher thread polls the registry's ACTIVE pointer (one small read, which an NFS client
revalidates) and swaps in newly activated versions between predictions. It follows the CANARY
pointer too: a canary version is served beside the live one to its share of requests
(service/loop/canary.py).

A version that cannot be served here (no model.onnx, and no torch to export one) leaves the
slot without a model and with a :attr:`ModelSlot.problem` that /ready reports; the watcher
retries until the file appears or another version is activated.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from model.onnx_serving import OnnxUnavailable
from model.registry import Registry
from service import metrics
from service.inference.runtimes import (
    RuntimeOptions,
    Serving,
    build_runtime,
    choose_runtime,
    fallback_to_onnx,
    is_compiled,
)
from service.loop.canary import CanaryArm

log = logging.getLogger("digits.model")
SWAP_POLL_SECONDS = 0.25


class ModelUnavailable(RuntimeError):
    """The slot has no model to serve (its ``problem`` says why)."""


class ModelSlot:
    def __init__(self, registry: Registry, mode: str, options: RuntimeOptions, measure_runs: int = 20,
                 on_change: Callable[[Serving], None] | None = None,
                 on_problem: Callable[[str], None] | None = None,
                 on_swap_problem: Callable[[str | None], None] | None = None) -> None:
        """``on_change``: after every swap or fallback; ``on_problem``: whenever the reason the
        slot has no model changes (also at start); ``on_swap_problem``: why the newly activated
        version cannot be swapped in (the slot serves the one it has), None once that is over."""
        self.registry, self.mode, self.options, self.measure_runs = registry, mode, options, measure_runs
        self.on_change = on_change or (lambda serving: None)
        self.on_problem = on_problem or (lambda problem: None)
        self.on_swap_problem = on_swap_problem or (lambda problem: None)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.serving: Serving | None = None
        self.problem: str | None = None
        self.marker = registry.active_marker()
        self.canary = CanaryArm(registry, self._canary_serving)
        version = registry.active_version()
        if version is None:
            raise RuntimeError(f"registry {registry.root} has no active version; run `make train` first")
        try:
            self._start(version)
        except OnnxUnavailable as exc:
            self._wait(str(exc))

    def _start(self, version: str) -> Serving:
        serving = choose_runtime(self.registry, version, self.mode, self.options, self.measure_runs)
        with self.lock:
            self.serving, self.problem = serving, None
        metrics.set_model_info(version, serving.runtime.name)
        metrics.set_runtime_info(serving.runtime.name, serving.code)
        log.info("serving %s on %s with %s (%s)", version, self.options.device, serving.runtime.name, serving.reason)
        return self.serving

    def _wait(self, problem: str) -> None:
        """No model yet: say why (once per reason); the watcher retries."""
        if problem != self.problem:
            log.error("not serving (not ready): %s", problem)
            self.problem = problem
            self.on_problem(problem)

    def predict(self, pixels: np.ndarray, pin: str | None = None) -> tuple[np.ndarray, Serving]:
        """Probabilities for uint8 [n,28,28], and the state that computed them: the live version,
        or the canary for its share of calls (``pin``: a version asked for by name)."""
        with self.lock:
            live = self.serving
            if live is None:
                raise ModelUnavailable(self.problem)
            serving = self.canary.pick(live, pin)
            started = time.perf_counter()
            try:
                probabilities = serving.runtime.probabilities(pixels)
            except Exception as exc:
                if serving is not live:  # the canary failed: the live version answers
                    self.canary.failed(serving, exc)
                    self.on_change(live)
                    serving = live
                elif is_compiled(serving.runtime):
                    serving = self._fall_back(f"while serving: {exc}")
                else:
                    raise
                probabilities = serving.runtime.probabilities(pixels)
            metrics.batch_size.observe(len(pixels))
            metrics.inference_latency.labels(serving.runtime.name).observe(time.perf_counter() - started)
            return probabilities, serving

    @property
    def canary_version(self) -> str | None:
        """The canary this holder serves beside its live version (None: none, or it could not load)."""
        state = self.canary.state
        return state.version if state is not None else None

    def _fall_back(self, why: str) -> Serving:
        """Called with the lock held."""
        previous = self.serving
        self.serving = fallback_to_onnx(self.registry, previous.version, self.options, why)
        runtime = self.serving.runtime
        metrics.set_runtime_info(runtime.name, "fallback", (previous.runtime.name, previous.code))
        metrics.set_model_info(runtime.version, runtime.name, (previous.version, previous.runtime.name))
        self.on_change(self.serving)
        return self.serving

    # ------------------------------------------------------------ hot swap

    def start_watching(self) -> None:
        threading.Thread(target=self._watch, name="model-watcher", daemon=True).start()

    def stop_watching(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        failure = None
        while not self._stop.wait(SWAP_POLL_SECONDS):
            try:
                self.refresh()
            except Exception as exc:
                if str(exc) != failure:  # once per reason, not every poll
                    log.exception("could not swap to the newly activated version; retrying")
                    failure = str(exc)
                    self.on_swap_problem(f"cannot swap to the active version: {exc}")
            else:
                if failure is not None:  # swapped after all, or the active version changed back
                    failure = None
                    self.on_swap_problem(None)
            live = self.serving
            if self.canary.refresh(live.version if live is not None else None) and live is not None:  # never raises
                self.on_change(live)  # the holder's announcement names its canary too

    def refresh(self) -> bool:
        """Swap to the registry's active version if it changed (or, without a model, try again
        to load one); True when a swap happened. A failure leaves the marker unchanged, so the
        next poll tries again."""
        marker = self.registry.active_marker()
        if self.serving is None:  # no model yet: try again, the file may have appeared
            return self._retry_start(marker)
        if marker == self.marker:
            return False
        version = self.registry.active_version()
        with self.lock:
            current = self.serving
        if version is None or version == current.version:
            self.marker = marker
            return False
        started = time.perf_counter()
        swapped = self._swap(current, version)
        if swapped is None:
            return False  # the state changed meanwhile (a fallback): the next poll starts over
        self.marker = marker
        metrics.model_swaps.labels(swapped.runtime.name).inc()
        metrics.set_model_info(version, swapped.runtime.name, (current.version, current.runtime.name))
        self.on_change(swapped)
        log.info("swapped %s -> %s (%s) in %.3f s", current.version, version, swapped.runtime.name,
                 time.perf_counter() - started)
        return True

    def _retry_start(self, marker: tuple[int, int] | None) -> bool:
        version = self.registry.active_version()
        if version is None:
            return False
        try:
            serving = self._start(version)
        except OnnxUnavailable as exc:
            self._wait(str(exc))
            return False
        self.marker = marker
        self.on_change(serving)
        return True

    def _canary_serving(self, version: str) -> Serving:
        """A canary is built like the live version's replacement in a swap, never in place."""
        with self.lock:
            live = self.serving
        if live is None:
            raise ModelUnavailable(self.problem)
        runtime = build_runtime("torch" if is_compiled(live.runtime) else "onnx", self.registry, version, self.options)
        if is_compiled(runtime):
            runtime.warm_up()
        return Serving(runtime, f"canary beside {live.version}", live.code)

    def _swap(self, current: Serving, version: str) -> Serving | None:
        runtime = current.runtime
        if is_compiled(runtime) and self.registry.get(version).arch == runtime.arch:
            state_dict = self.registry.load_state_dict(version)
            with self.lock:
                if self.serving is not current:
                    return None
                runtime.load_weights(state_dict, version)  # same compiled graph, new weights
                self.serving = replace(current)  # a new state object: the same runtime at its new version
                return self.serving
        kind = "torch" if is_compiled(runtime) else "onnx"
        replacement = build_runtime(kind, self.registry, version, self.options)
        if is_compiled(replacement):
            replacement.warm_up()
        with self.lock:
            if self.serving is not current:
                return None
            self.serving = Serving(replacement, current.reason, current.code)
            return self.serving
