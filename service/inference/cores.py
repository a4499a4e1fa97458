"""Idle cores for large batches: a batch of ``DIGITS_SPLIT_BATCH`` images or more is split over
helper threads of this API server when the other API servers leave cores idle.

On CPU every API server runs ONNX Runtime on its event loop with one thread, and the kernel
hands each connection to one API server (SO_REUSEPORT). One connection, or one gRPC channel,
therefore keeps one core busy however large its batches are (measured: 64-image V2 requests at 1
connection made 41 % of the 2-core bound; docs/benchmarks.md). Splitting a large batch into parts
computed at once, each by the same one-thread session on its own thread (``Session.run`` releases
the GIL and is thread-safe), uses the idle cores without a second session, and gives the answers
of the single-thread path exactly (each image is computed alone either way). The parts are small
chunks taken in turn. The calling thread waits for a chunk a helper has in hand only about as
long as a chunk takes (twice its own slowest, at least ``MIN_PATIENCE_SECONDS``), then computes it
itself: a helper that other jobs keep off the cores (a shared machine) costs one chunk computed
twice, not a batch held back. (Not waiting at all computed the last chunk twice on every batch:
64 images split over 2 threads took 4.0 ms instead of 3.4; one thread takes 6.6.)

To keep away from oversubscription (two API servers each running two threads on two cores) the
API servers publish when they compute on a board: one 8-byte slot per API server in a file in
the run directory, mapped into each of them, holding the monotonic time until which that server
counts as busy (while it computes, and ``LINGER_SECONDS`` after, which covers the parsing between
requests of a server under load). A batch is split into 1 + the cores that neither this server nor
a busy one takes; under load on every server that is 1, today's path.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from service import metrics

SLOTS = 64  # API servers a board holds (DIGITS_API_SERVERS is at most 16)
SLOT = struct.Struct("<d")
LINGER_SECONDS = 0.02  # a server counts as busy this long after its last computation
COMPUTE_HOLD_SECONDS = 1.0  # while computing; a server that died mid-batch stops counting after this
BOARD_FILE = "cores.board"
CHUNKS_PER_PART = 4  # a split batch is cut into this many chunks per thread, taken in turn
MIN_PATIENCE_SECONDS = 0.002  # the least the caller waits for a chunk a helper is computing


def available_cores() -> int:
    """The CPUs this process may run on (cgroup/affinity aware)."""
    return max(1, len(os.sched_getaffinity(0)))


class CoreShare:
    """This API server's view of the board, and the helper threads it splits large batches over."""

    def __init__(self, run_dir: Path, index: int, split_min: int, cores: int | None = None) -> None:
        if not 0 <= index < SLOTS:
            raise ValueError(f"API server index {index} outside the board's {SLOTS} slots")
        self.index, self.split_min = index, split_min
        self.cores = cores or available_cores()
        path = Path(run_dir) / BOARD_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < SLOTS * SLOT.size:
                os.ftruncate(fd, SLOTS * SLOT.size)  # zeros: nobody busy
            self.board = mmap.mmap(fd, SLOTS * SLOT.size)
        finally:
            os.close(fd)
        self._pool: ThreadPoolExecutor | None = None  # made at the first split: no threads until then

    def _mark(self, until: float) -> None:
        SLOT.pack_into(self.board, self.index * SLOT.size, until)

    def busy_others(self, now: float) -> int:
        """API servers other than this one that compute now or did within LINGER_SECONDS."""
        return sum(1 for slot, (until,) in enumerate(SLOT.iter_unpack(self.board))
                   if slot != self.index and until > now)

    def parts_for(self, images: int, now: float | None = None) -> int:
        """How many threads a batch of ``images`` is computed on: 1 below ``split_min``; above,
        1 + the cores nobody is busy on, at most one part per ``split_min // 2`` images."""
        if self.split_min <= 0 or images < self.split_min or self.cores < 2:
            return 1
        idle = self.cores - 1 - self.busy_others(time.monotonic() if now is None else now)
        return max(1, min(1 + idle, images // max(1, self.split_min // 2)))

    def compute(self, pixels: np.ndarray, run: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """``run(pixels)``, on as many threads as ``parts_for`` says; the board says this server is busy meanwhile."""
        now = time.monotonic()
        parts = self.parts_for(len(pixels), now)
        self._mark(now + COMPUTE_HOLD_SECONDS)
        try:
            result = run(pixels) if parts == 1 else self._spread(pixels, run, parts)
        finally:
            self._mark(time.monotonic() + LINGER_SECONDS)
        if len(pixels) >= self.split_min > 0:
            metrics.split_batches.labels(str(parts)).inc()
        return result

    def _spread(self, pixels: np.ndarray, run: Callable[[np.ndarray], np.ndarray], parts: int) -> np.ndarray:
        """``run`` over chunks that this thread and ``parts - 1`` helpers take in turn. What a helper
        has not finished when this thread runs out of chunks, it waits for (a chunk's time, see the
        module doc), then computes itself: a helper kept off the cores never holds a batch back."""
        size = max(1, self.split_min // 2, -(-len(pixels) // (parts * CHUNKS_PER_PART)))
        chunks = [pixels[start:start + size] for start in range(0, len(pixels), size)]
        results: list[np.ndarray | None] = [None] * len(chunks)
        finished = [threading.Event() for _ in chunks]
        claim = itertools.count()  # next() is atomic: each chunk is taken once

        def work(helper: bool) -> float:
            """Chunks until none is left; the seconds the slowest took."""
            slowest = 0.0
            while (index := next(claim)) < len(chunks):
                started = time.perf_counter()
                try:
                    results[index] = run(chunks[index])
                except Exception:
                    if not helper:
                        raise
                    # the caller computes this chunk again below, and raises there if it fails again
                finally:
                    finished[index].set()
                slowest = max(slowest, time.perf_counter() - started)
            return slowest

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.cores - 1, thread_name_prefix="digits-split")
        for _ in range(parts - 1):
            self._pool.submit(work, True)
        patience = max(MIN_PATIENCE_SECONDS, 2 * work(False))
        answers = []
        for index, chunk in enumerate(chunks):
            if results[index] is None:
                finished[index].wait(patience)  # a helper computing it: about a chunk's time
            answer = results[index]
            answers.append(run(chunk) if answer is None else answer)  # a helper off the cores, or one that failed
        return np.concatenate(answers)
