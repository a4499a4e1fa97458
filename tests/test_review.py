"""The review queue, the traffic ring and the capture tap, on a real registry directory."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from model.finetune_options import FinetuneOptions
from model.registry import Registry
from service.finetune.feedback_store import FeedbackStore
from service.finetune.jobs import JobState
from service.loop.capture import Rules, Tap
from service.loop.review import Capture, ReviewError, ReviewQueue, new_item_id
from service.loop.traffic import TrafficRing


def digit(value: int) -> np.ndarray:
    return np.full((28, 28), value, dtype=np.uint8)


def capture(value: int, confidence: float = 0.5) -> Capture:
    return Capture(digit(value), prediction=value % 10, confidence=confidence, version="v0001", time=time.time())


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


def queued_job(queue: ReviewQueue):
    """A ``create_job`` for ``take_for_job`` that queues a real job record."""
    def create(job_id: str, images: np.ndarray, labels: np.ndarray) -> None:
        queue.jobs.create(images, labels, FinetuneOptions(epochs=1), "review", max_pending=100, job_id=job_id)
    return create


def labelled(queue: ReviewQueue, values: list[int]) -> None:
    queue.add([capture(v) for v in values])
    token, _, items = queue.lease("a", len(values))
    for item in items:
        queue.label(item.item_id, token, item.prediction)


def test_items_keep_what_the_model_saw(registry: Registry) -> None:
    queue = ReviewQueue(registry)
    assert queue.add([capture(3, 0.41)]) == 1
    [item] = queue.items()
    assert np.array_equal(item.image, digit(3)) and item.prediction == 3 and item.confidence == pytest.approx(0.41)
    assert item.version == "v0001" and item.source == "capture" and item.state.label is None


def test_two_reviewers_never_get_the_same_item_and_a_label_is_given_once(registry: Registry) -> None:
    queue = ReviewQueue(registry)
    queue.add([capture(v) for v in range(6)])
    token_a, _, first = queue.lease("a", 4)
    token_b, _, second = queue.lease("b", 4)
    assert len(first) == 4 and len(second) == 2
    assert not {i.item_id for i in first} & {i.item_id for i in second}
    with pytest.raises(ReviewError) as lost:
        queue.label(first[0].item_id, token_b, 7)  # b does not hold a's item
    assert lost.value.code == "lease_lost"
    queue.label(first[0].item_id, token_a, 7)
    with pytest.raises(ReviewError) as twice:
        queue.label(first[0].item_id, token_a, 8)
    assert twice.value.code == "already_labelled"
    [item] = ReviewQueue(registry).labelled_items()
    assert item.image.dtype == np.uint8 and item.image.shape == (28, 28) and item.state.label == 7


def test_an_expired_lease_goes_to_the_next_reviewer(registry: Registry) -> None:
    queue = ReviewQueue(registry, lease_seconds=0.2)
    queue.add([capture(1)])
    token_a, _, [item] = queue.lease("a", 1)
    assert queue.lease("b", 1)[2] == []
    time.sleep(0.3)
    token_b, _, [again] = queue.lease("b", 1)
    assert again.item_id == item.item_id
    with pytest.raises(ReviewError):
        queue.label(item.item_id, token_a, 1)
    queue.label(item.item_id, token_b, 1)


def test_skipped_items_come_after_the_others_and_discarded_ones_go(registry: Registry) -> None:
    queue = ReviewQueue(registry)
    queue.add([capture(1)])
    queue.add([capture(2)])
    token, _, [oldest, newer] = queue.lease("a", 2)
    queue.skip(oldest.item_id, token)
    queue.discard(newer.item_id, token)
    queue.add([capture(3)])
    _, _, items = queue.lease("a", 5)
    assert [i.image[0, 0] for i in items] == [3, 1]
    assert queue.counts()["items"] == 2


def test_full_queue_evicts_the_oldest_unlabelled_never_a_label(registry: Registry) -> None:
    queue = ReviewQueue(registry, max_items=3)
    queue.add([capture(v) for v in (1, 2, 3)])
    token, _, items = queue.lease("a", 3)
    queue.label(items[0].item_id, token, 1)
    queue.skip(items[1].item_id, token)
    queue.skip(items[2].item_id, token)
    assert queue.add([capture(4)]) == 1  # the oldest unlabelled one (2) makes room
    assert sorted(int(i.image[0, 0]) for i in queue.items()) == [1, 3, 4]
    token, _, rest = queue.lease("a", 3)
    for item in rest:
        queue.label(item.item_id, token, 0)
    assert queue.add([capture(5)]) == 0  # only labels left: refused, none lost
    assert queue.counts() == {**queue.counts(), "items": 3, "labelled": 3}


def test_bytes_bound_counts_kept_uploads(registry: Registry) -> None:
    queue = ReviewQueue(registry, max_bytes=64 * 1024)
    big = Capture(digit(1), 1, 0.5, "v0001", time.time(), original=b"x" * 40_000)
    assert queue.add([big]) == 1 and queue.original(queue.items()[0].item_id) == b"x" * 40_000
    assert queue.add([Capture(digit(2), 2, 0.5, "v0001", time.time(), original=b"y" * 40_000)]) == 1
    assert len(queue.items()) == 1 and queue.counts()["bytes"] <= 64 * 1024


def test_feedback_corrections_are_reviewed_like_captures(registry: Registry) -> None:
    FeedbackStore(registry, 100, 1 << 20).add(digit(9), 9)
    queue = ReviewQueue(registry)
    token, _, [item] = queue.lease("a", 5)
    assert item.source == "feedback" and item.suggested == 9 and item.prediction is None
    queue.discard(item.item_id, token)
    assert queue.lease("a", 5)[2] == []  # a discarded correction is not imported again
    for path in registry.feedback_paths():
        path.unlink()  # the operator empties feedback/: the tombstone goes with the next import
    queue.import_feedback()
    assert registry.review_state_ids() == set()


def test_take_for_job_uses_each_label_once(registry: Registry) -> None:
    queue = ReviewQueue(registry)
    queue.add([capture(v) for v in range(3)])
    token, _, items = queue.lease("a", 3)
    for item in items[:2]:
        queue.label(item.item_id, token, 4)
    seen = []

    def create(job: str, images: np.ndarray, labels: np.ndarray) -> None:
        seen.append((job, images.shape, labels.tolist()))
        queued_job(queue)(job, images, labels)

    job_id, n = queue.take_for_job(create, limit=100)
    assert n == 2 and seen == [(job_id, (2, 28, 28), [4, 4])]
    with pytest.raises(ReviewError) as none_left:
        queue.take_for_job(queued_job(queue), limit=100)
    assert none_left.value.code == "nothing_reviewed"
    assert len(queue.labelled_items()) == 2  # used labels stay


def test_a_job_takes_at_most_its_limit_and_the_rest_wait(registry: Registry) -> None:
    queue = ReviewQueue(registry)
    labelled(queue, [1, 2, 3])
    assert queue.take_for_job(queued_job(queue), limit=2)[1] == 2
    assert queue.take_for_job(queued_job(queue), limit=2)[1] == 1


def test_a_full_queue_makes_room_with_labels_a_finished_job_trained_on_never_others(registry: Registry) -> None:
    queue = ReviewQueue(registry, max_items=2)
    labelled(queue, [1, 2])
    assert queue.add([capture(3)]) == 0  # only labels no job has used: the capture is dropped
    job_id, _ = queue.take_for_job(queued_job(queue), limit=100)
    assert queue.add([capture(3)]) == 0  # a queued job holds them
    record = queue.jobs.get(job_id)
    record.state = JobState.SUCCEEDED
    queue.jobs.save(record)
    assert queue.add([capture(3), capture(4)]) == 2  # done with: they make room, oldest first
    assert sorted(item.prediction for item in queue.items()) == [3, 4]


def test_ids_follow_arrival_even_when_the_clock_steps_back(monkeypatch: pytest.MonkeyPatch) -> None:
    first = new_item_id()
    an_hour_ago = time.time_ns() - 3600 * 10**9
    monkeypatch.setattr(time, "time_ns", lambda: an_hour_ago)
    second, third = new_item_id(), new_item_id()  # at once: no waiting for the clock to catch up
    assert first < second < third


def test_traffic_ring_is_bounded_and_returns_the_newest(registry: Registry) -> None:
    ring = TrafficRing(registry, size=10)
    for start in range(0, 30, 3):
        ring.append(np.stack([digit(v) for v in range(start, start + 3)]))
    recent = TrafficRing(registry).recent(5)
    assert recent.dtype == np.uint8 and recent.shape == (5, 28, 28)
    assert recent[:, 0, 0].tolist() == [25, 26, 27, 28, 29]
    assert 10 <= len(ring) < 13


def probabilities(confidences: list[float]) -> np.ndarray:
    rows = np.full((len(confidences), 10), 0.0, dtype=np.float32)
    for row, confidence in zip(rows, confidences, strict=True):
        row[:] = (1 - confidence) / 9
        row[3] = confidence
    return rows


def test_tap_captures_the_unsure_and_a_sample_and_feeds_the_ring(registry: Registry) -> None:
    review, ring = ReviewQueue(registry), TrafficRing(registry, 100)
    tap = Tap(review, ring, Rules(threshold=0.8, sample=0.5, traffic_every=2), seed=0).start()
    pixels = np.stack([digit(v) for v in range(40)])
    tap.observe(pixels, probabilities([0.5] * 10 + [0.99] * 30), "v0007")
    tap.close()
    reasons = [item.reason for item in review.items(limit=100)]
    assert reasons.count("low_confidence") == 10 and 5 <= reasons.count("sample") <= 25
    assert len(ring) == 20 and ring.recent(100)[:, 0, 0].tolist() == list(range(1, 40, 2))


def test_tap_off_keeps_nothing_and_a_full_tap_drops_without_waiting(registry: Registry) -> None:
    review, ring = ReviewQueue(registry), TrafficRing(registry)
    tap = Tap(review, ring, Rules(enabled=False)).start()
    tap.observe(np.stack([digit(1)]), probabilities([0.1]), "v0001")
    tap.close()
    assert review.items() == [] and len(ring) == 0

    stalled = Tap(review, ring, Rules(), queue_size=2)  # not started: nothing drains it
    started = time.monotonic()
    for _ in range(100):
        stalled.observe(np.stack([digit(1)]), probabilities([0.1]), "v0001")
    assert time.monotonic() - started < 0.5 and len(stalled.pending) == 2


def test_labels_of_a_job_that_ended_without_training_are_offered_again(registry: Registry) -> None:
    queue = ReviewQueue(registry)
    queue.add([capture(1)])
    token, _, [item] = queue.lease("a", 1)
    queue.label(item.item_id, token, 1)
    queue.take_for_job(lambda *_: None, limit=100)  # marked, then killed before the job was made
    _, n = queue.take_for_job(queued_job(queue), limit=100)
    assert n == 1
    record = queue.jobs.all()[0]
    record.state = JobState.FAILED
    queue.jobs.save(record)
    assert queue.take_for_job(queued_job(queue), limit=100)[1] == 1  # a failed job gives them back


def test_a_job_that_could_not_be_made_leaves_its_labels_unused(registry: Registry) -> None:
    queue = ReviewQueue(registry)
    queue.add([capture(1)])
    token, _, [item] = queue.lease("a", 1)
    queue.label(item.item_id, token, 1)

    def full(*_) -> None:
        raise RuntimeError("queue full")

    with pytest.raises(RuntimeError):
        queue.take_for_job(full, limit=100)
    assert queue.labelled_items()[0].state.job_id is None


def _lease_in_a_process(root: str, reviewer: str, out) -> None:
    queue = ReviewQueue(Registry(root))
    got = []
    for _ in range(10):
        token, _, items = queue.lease(reviewer, 3)
        for item in items:
            queue.label(item.item_id, token, 1)
            got.append(item.item_id)
    out.put(got)


def test_processes_sharing_the_registry_never_get_the_same_item(registry: Registry) -> None:
    import multiprocessing

    ReviewQueue(registry).add([capture(v) for v in range(60)])
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    workers = [context.Process(target=_lease_in_a_process, args=(str(registry.root), f"r{i}", out)) for i in range(4)]
    for worker in workers:
        worker.start()
    got = [out.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(30)
    every = [item_id for ids in got for item_id in ids]
    assert len(every) == len(set(every)) == 60
    assert len(ReviewQueue(registry).labelled_items()) == 60


def test_a_flood_of_unsure_predictions_writes_at_most_the_rate(registry: Registry) -> None:
    review, ring = ReviewQueue(registry), TrafficRing(registry)
    tap = Tap(review, ring, Rules(threshold=0.8, sample=0, max_per_second=5)).start()
    started = time.monotonic()
    tap.observe(np.stack([digit(v) for v in range(200)]), probabilities([0.5] * 200), "v0001")
    tap.close()
    allowed = 5 + 5 * (time.monotonic() - started)  # a second's worth, then the refill
    assert 1 <= len(review.items(limit=1000)) <= allowed < 200


def test_the_same_digit_again_is_captured_once_and_the_ring_gets_a_chunk_a_second(registry: Registry) -> None:
    review, ring = ReviewQueue(registry), TrafficRing(registry)
    tap = Tap(review, ring, Rules(threshold=0.8, sample=0, traffic_every=1, max_per_second=1000)).start()
    repeated = np.stack([digit(v % 4) for v in range(64)])  # a load test: 4 unsure digits, 16 times each
    for _ in range(12):  # 3 s of requests, 4 a second: one chunk a second reaches the ring, not 12
        tap.observe(repeated, probabilities([0.5] * 64), "v0001")
        time.sleep(0.25)
    tap.close()
    assert len(review.items(limit=1000)) == 4
    chunks = registry.traffic_chunks()
    assert 2 <= len(chunks) <= 5 and len(ring) <= 5 * 256, (len(chunks), len(ring))
