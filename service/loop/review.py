"""The review queue: captured predictions (and /feedback corrections) waiting for a person's label.

Each item is two files in the registry (``model/registry.py`` knows where): the immutable
capture (the 28x28 digit the model saw, its prediction, confidence, version, time, source;
the upload too when kept) and, once a reviewer touched it, a small state record (lease,
label, skips, the fine-tune job that used it). Every change happens under one file lock
shared by all processes and replicas on the registry, and every write is an atomic rename,
so a process killed at any instant leaves each item either as it was or as it became: a
label is never lost, and an item is never labelled twice (a second label is refused).

Bounded in items and bytes: a capture that would pass a bound evicts the oldest items no one
has labelled or holds a lease on; labelled items are never evicted. When nothing can be
evicted the capture is refused (the caller counts it as dropped).

Leases: a reviewer leases items for ``lease_seconds``; nobody else gets them meanwhile. A
label, skip or discard needs the lease's token. An expired lease may be taken by another
reviewer (the first one's token then no longer works).

/feedback corrections are imported as items with the user's label as a suggestion: public
input is reviewed before it trains the model. A discarded correction leaves a tombstone so
it is not imported again.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
from filelock import FileLock
from safetensors import safe_open
from safetensors.numpy import save

from model.atomic import atomic_write_bytes, remove_stale_temporaries
from model.registry import RECORD_ID_PATTERN, Registry, new_record_id
from service.finetune.feedback_store import read_sample
from service.finetune.jobs import JobState, JobStore
from service.settings import default_of

DEFAULT_MAX_ITEMS: int = default_of("review_max_items")
DEFAULT_MAX_BYTES: int = default_of("review_max_bytes")
DEFAULT_LEASE_SECONDS: float = default_of("review_lease_seconds")


class Source(StrEnum):
    CAPTURE = "capture"  # a served prediction: low confidence or sampled
    FEEDBACK = "feedback"  # a /feedback correction: its label is the user's suggestion


@dataclass(frozen=True)
class Capture:
    """One prediction to keep for review."""

    image: np.ndarray  # uint8 [28,28], what the model saw
    prediction: int
    confidence: float
    version: str
    time: float
    reason: str = "low_confidence"  # or "sample"
    original: bytes | None = None  # the upload, when DIGITS_REVIEW_KEEP_ORIGINAL


@dataclass
class State:
    """What reviewers did with an item (absent: nothing yet)."""

    label: int | None = None
    labelled_at: float | None = None
    reviewer: str | None = None
    lease_token: str | None = None
    lease_reviewer: str | None = None
    lease_expires: float = 0.0
    skips: int = 0
    discarded: bool = False
    job_id: str | None = None  # the fine-tune job that trained on this label

    def leased(self, now: float) -> bool:
        return self.lease_token is not None and self.lease_expires > now


@dataclass
class ReviewItem:
    item_id: str
    image: np.ndarray
    source: str
    prediction: int | None
    confidence: float | None
    version: str | None
    time: float
    reason: str
    suggested: int | None
    has_original: bool
    state: State = field(default_factory=State)


class ReviewError(Exception):
    """A refused change: ``code`` (unknown_item, lease_lost, already_labelled) and what happened."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


_last_id = ""


def new_item_id() -> str:
    """A record id (creation second in UTC + 8 hex digits) whose hex part is the nanosecond
    within that second, so that the queue's order by id is its order of arrival. Never waits for
    the clock: an id not after this process's last one (the clock stepped back) follows it."""
    global _last_id
    now = time.time_ns()
    item_id = time.strftime("%Y%m%d%H%M%S", time.gmtime(now // 1_000_000_000)) + f"{now % 1_000_000_000:08x}"
    if item_id <= _last_id:
        item_id = _last_id[:14] + f"{int(_last_id[14:], 16) + 1:08x}"
    _last_id = item_id
    return item_id


def encode_item(image: np.ndarray, meta: dict[str, object], original: bytes | None) -> bytes:
    tensors = {"image": np.ascontiguousarray(image, dtype=np.uint8).reshape(28, 28)}
    if original is not None:
        tensors["original"] = np.frombuffer(original, dtype=np.uint8)
    return save(tensors, metadata={key: json.dumps(value) for key, value in meta.items()})


class ReviewQueue:
    def __init__(self, registry: Registry, max_items: int = DEFAULT_MAX_ITEMS, max_bytes: int = DEFAULT_MAX_BYTES,
                 lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self.registry, self.jobs = registry, JobStore(registry)
        self.max_items, self.max_bytes, self.lease_seconds = max_items, max_bytes, lease_seconds
        self._sizes: dict[str, int] = {}  # item files never change: their sizes are read once

    def remove_stale_temporaries(self) -> None:
        """What a writer killed mid-write left (once per process start is enough)."""
        for directory in (self.registry.review_item_path("x").parent, self.registry.review_state_path("x").parent):
            remove_stale_temporaries(directory)

    def _job_state(self, job_id: str, known: dict[str, JobState | None]) -> JobState | None:
        """The state of the job that took a label (None: its record is gone), read once per call."""
        if job_id not in known:
            try:
                known[job_id] = self.jobs.get(job_id).state
            except KeyError:
                known[job_id] = None
        return known[job_id]

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with FileLock(str(self.registry.review_lock_path)):  # a lock object per call: none crosses a fork
            yield

    # ---------------------------------------------------------------- writing items

    def add(self, captures: list[Capture]) -> int:
        """Store captures, evicting the oldest unlabelled, unleased items for room; how many were
        stored (the rest found only labelled or leased items in the way)."""
        if not captures:
            return 0
        with self._locked():
            return self._add_locked([(new_item_id(), self._capture_bytes(c)) for c in captures])

    def _capture_bytes(self, capture: Capture) -> bytes:
        meta = {"source": Source.CAPTURE.value, "prediction": capture.prediction,
                "confidence": round(float(capture.confidence), 6), "version": capture.version,
                "time": capture.time, "reason": capture.reason, "suggested": None}
        return encode_item(capture.image, meta, capture.original)

    def _add_locked(self, encoded: list[tuple[str, bytes]]) -> int:
        ids = self.registry.review_item_ids()
        sizes = self._sizes = {item_id: self._size(item_id) for item_id in ids}  # forgets the gone ones
        count, used = len(ids), sum(sizes.values())
        evictable = self._evictable(ids, self.registry.review_state_ids())
        stored = 0
        for item_id, data in encoded:
            while count + 1 > self.max_items or used + len(data) > self.max_bytes:
                victim = next(evictable, None)
                if victim is None:
                    return stored
                self._remove(victim, tombstone=False)
                count, used = count - 1, used - sizes[victim]
            atomic_write_bytes(self.registry.review_item_path(item_id), data, durable=False)
            sizes[item_id] = len(data)
            count, used, stored = count + 1, used + len(data), stored + 1
        return stored

    def _evictable(self, ids: list[str], states: set[str]) -> Iterator[str]:
        """Items that may make room, in this order: the oldest nobody has labelled or leased, then
        the oldest labels a job has trained on (it succeeded or was rejected: done with them).
        A label no job has used, or one a queued or running job holds, is never evicted."""
        now, known = time.time(), {}
        labelled = []
        for item_id in ids:
            state = self._state(item_id) if item_id in states else State()
            if state.label is None and not state.leased(now):
                yield item_id
            elif state.label is not None and state.job_id is not None:
                labelled.append((item_id, state.job_id))
        for item_id, job_id in labelled:
            if self._job_state(job_id, known) in (JobState.SUCCEEDED, JobState.REJECTED):
                yield item_id

    def _size(self, item_id: str) -> int:
        if item_id not in self._sizes:
            try:
                self._sizes[item_id] = self.registry.review_item_path(item_id).stat().st_size
            except FileNotFoundError:
                return 0
        return self._sizes[item_id]

    def import_feedback(self) -> int:
        """Bring /feedback corrections not seen yet into the queue; how many came."""
        with self._locked():
            items, states = set(self.registry.review_item_ids()), self.registry.review_state_ids()
            feedback = self.registry.feedback_paths()
            for gone in states - items - {p.stem for p in feedback}:  # tombstones of corrections no longer stored
                self.registry.review_state_path(gone).unlink(missing_ok=True)
            known = items | states
            fresh = [p for p in feedback if p.stem not in known]
            encoded = []
            for path in fresh:
                try:
                    pixels, label = read_sample(path)
                    created = path.stat().st_mtime
                except (OSError, ValueError, KeyError):
                    continue  # being written, or removed meanwhile
                meta = {"source": Source.FEEDBACK.value, "prediction": None, "confidence": None, "version": None,
                        "time": created, "reason": "feedback", "suggested": label}
                encoded.append((path.stem, encode_item(pixels, meta, None)))
            return self._add_locked(encoded)

    # ---------------------------------------------------------------- reading

    def _state(self, item_id: str) -> State:
        try:
            return State(**json.loads(self.registry.review_state_path(item_id).read_bytes()))
        except FileNotFoundError:
            return State()

    def _write_state(self, item_id: str, state: State, durable: bool = True) -> None:
        """Labels and job marks are fsynced; a lease (``durable=False``) costs nothing to lose."""
        atomic_write_bytes(self.registry.review_state_path(item_id), json.dumps(state.__dict__).encode(), durable)

    def _load(self, item_id: str, state: State | None = None) -> ReviewItem | None:
        try:
            tensors, meta = load_item(self.registry.review_item_path(item_id))
        except FileNotFoundError:
            return None
        return ReviewItem(item_id=item_id, image=tensors["image"], source=meta["source"],
                          prediction=meta["prediction"], confidence=meta["confidence"], version=meta["version"],
                          time=meta["time"], reason=meta["reason"], suggested=meta["suggested"],
                          has_original="original" in tensors, state=state or self._state(item_id))

    def get(self, item_id: str) -> ReviewItem:
        item = self._load(self._check_id(item_id))
        if item is None:
            raise ReviewError("unknown_item", f"no review item {item_id!r}")
        return item

    def original(self, item_id: str) -> bytes | None:
        try:
            tensors, _ = load_item(self.registry.review_item_path(self._check_id(item_id)))
        except FileNotFoundError:
            raise ReviewError("unknown_item", f"no review item {item_id!r}") from None
        return tensors["original"].tobytes() if "original" in tensors else None

    def items(self, status: str = "all", limit: int = 100) -> list[ReviewItem]:
        """Newest first: ``status`` all, pending (no label), labelled, leased."""
        now, found = time.time(), []
        for item_id in reversed(self.registry.review_item_ids()):
            state = self._state(item_id)
            if (status == "pending" and state.label is not None) or (status == "labelled" and state.label is None) \
                    or (status == "leased" and not state.leased(now)):
                continue
            item = self._load(item_id, state)
            if item is not None:
                found.append(item)
                if len(found) >= limit:
                    break
        return found

    def counts(self) -> dict[str, int]:
        now, counts = time.time(), {"items": 0, "pending": 0, "leased": 0, "labelled": 0, "used": 0, "bytes": 0}
        states = self.registry.review_state_ids()
        for item_id in self.registry.review_item_ids():
            state = self._state(item_id) if item_id in states else State()
            counts["items"] += 1
            counts["bytes"] += self._size(item_id)
            counts["labelled" if state.label is not None else "pending"] += 1
            counts["leased"] += state.leased(now)
            counts["used"] += state.job_id is not None
        return counts

    def labelled_items(self) -> list[ReviewItem]:
        """Reviewed items with their labels, oldest first."""
        items = []
        for item_id in sorted(self.registry.review_state_ids()):
            state = self._state(item_id)
            if state.label is None:
                continue
            item = self._load(item_id, state)
            if item is not None:
                items.append(item)
        return items

    # ---------------------------------------------------------------- reviewing

    def lease(self, reviewer: str, count: int) -> tuple[str, float, list[ReviewItem]]:
        """Up to ``count`` unlabelled items no one else holds, never-skipped and oldest first:
        (token, expiry time, items). The token is needed to label, skip or discard them."""
        self.import_feedback()
        token, now = secrets.token_hex(8), time.time()
        expires = now + self.lease_seconds
        with self._locked():
            states = self.registry.review_state_ids()
            candidates = []
            for item_id in self.registry.review_item_ids():
                state = self._state(item_id) if item_id in states else State()
                if state.label is None and not state.discarded and not state.leased(now):
                    candidates.append((state.skips, item_id, state))
            chosen = []
            for _, item_id, state in sorted(candidates)[:count]:
                state.lease_token, state.lease_reviewer, state.lease_expires = token, reviewer, expires
                self._write_state(item_id, state, durable=False)
                item = self._load(item_id, state)
                if item is not None:
                    chosen.append(item)
        return token, expires, chosen

    def _held(self, item_id: str, token: str) -> State:
        """The state of an item this token leases (under the lock); ReviewError otherwise."""
        self._check_id(item_id)
        if not self.registry.review_item_path(item_id).exists():
            raise ReviewError("unknown_item", f"no review item {item_id!r} (discarded or evicted)")
        state = self._state(item_id)
        if state.label is not None:
            raise ReviewError("already_labelled", f"item {item_id} is labelled already ({state.label})")
        if state.lease_token != token:
            raise ReviewError("lease_lost", f"item {item_id} is not leased with this token (expired and taken by "
                              "another reviewer, or never leased): lease it again")
        return state

    def label(self, item_id: str, token: str, label: int) -> State:
        with self._locked():
            state = self._held(item_id, token)
            state.label, state.labelled_at, state.reviewer = int(label), time.time(), state.lease_reviewer
            state.lease_token, state.lease_expires = None, 0.0
            self._write_state(item_id, state)
            return state

    def skip(self, item_id: str, token: str) -> State:
        """Give the item back; it comes again after every item not skipped as often."""
        with self._locked():
            state = self._held(item_id, token)
            state.skips += 1
            state.lease_token, state.lease_reviewer, state.lease_expires = None, None, 0.0
            self._write_state(item_id, state)
            return state

    def discard(self, item_id: str, token: str) -> None:
        """Not a digit, or not to be kept: gone (a correction's tombstone stays, so it is not re-imported)."""
        with self._locked():
            self._held(item_id, token)
            source = self._load(item_id).source
            self._remove(item_id, tombstone=source == Source.FEEDBACK)

    def _remove(self, item_id: str, tombstone: bool) -> None:
        if tombstone:
            self._write_state(item_id, State(discarded=True))
        else:
            self.registry.review_state_path(item_id).unlink(missing_ok=True)
        self.registry.review_item_path(item_id).unlink(missing_ok=True)

    def take_for_job(self, create_job: Callable[[str, np.ndarray, np.ndarray], None], limit: int) -> tuple[str, int]:
        """Hand the oldest ``limit`` labelled items no job has trained on to ``create_job(job id,
        images, labels)`` (the rest wait for the next job), in one step under the lock (two
        operators pressing "fine-tune" at once cannot train on the same labels twice): (job id,
        items). The items are marked with the new job's id first, then the job is made: a process
        killed between the two leaves marks of a job that does not exist, which (like the marks of
        a failed or cancelled job) are offered again, so no label is lost and none is trained on
        twice. ReviewError when there is none."""
        with self._locked():
            known: dict[str, JobState | None] = {}
            items = [item for item in self.labelled_items()
                     if item.state.job_id is None
                     or self._job_state(item.state.job_id, known) in (None, JobState.FAILED, JobState.CANCELLED)]
            items = items[:limit]
            if not items:
                raise ReviewError("nothing_reviewed", "no labelled review item is left that no job has trained on")
            job_id, previous = new_record_id(), [item.state.job_id for item in items]
            for item in items:
                item.state.job_id = job_id
                self._write_state(item.item_id, item.state)
            try:
                create_job(job_id, np.asarray([item.image for item in items], dtype=np.uint8),
                           np.asarray([item.state.label for item in items], dtype=np.int64))
            except BaseException:
                for item, job in zip(items, previous, strict=True):
                    item.state.job_id = job
                    self._write_state(item.item_id, item.state)
                raise
            return job_id, len(items)

    @staticmethod
    def _check_id(item_id: str) -> str:
        if not RECORD_ID_PATTERN.match(item_id):
            raise ReviewError("unknown_item", f"{item_id[:40]!r} is not a review item id")
        return item_id


def load_item(path: Path) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """(tensors, header fields) of one item file."""
    with safe_open(str(path), "np") as handle:
        meta = {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}
        return {key: handle.get_tensor(key) for key in handle.keys()}, meta  # noqa: SIM118 - not a dict
