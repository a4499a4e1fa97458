"""What service/inference/litserve_adapter.py relies on in LitServe's insides, checked against the installed
LitServe (pinned). A LitServe upgrade that changes any of it fails here, not in production."""

from __future__ import annotations

import inspect
import signal
import subprocess
import sys
import threading
import time

import litserve as ls
import numpy as np
from litserve.callbacks.base import CallbackRunner
from litserve.loops.base import _SENTINEL_VALUE, collate_requests
from litserve.loops.simple_loops import BatchedLoop, SingleLoop
from litserve.server import LitServer, _Server
from litserve.utils import LitAPIStatus, ResponseBufferItem

from service.inference import litserve_adapter as adapter


def test_the_adapter_refuses_any_other_litserve_version() -> None:
    code = "import litserve; litserve.__version__ = '0.3.0'; import service.inference.litserve_adapter"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "LitServe 0.3.0 is installed" in result.stderr


def test_the_methods_we_override_have_the_signatures_we_override() -> None:
    expected = {
        "_init_manager": ["self", "num_api_servers"],
        "_start_server": ["self", "port", "num_uvicorn_servers", "log_level", "sockets", "uvicorn_worker_type",
                          "kwargs"],
        "_start_worker_monitoring": ["self", "manager", "uvicorn_workers"],
        "_perform_graceful_shutdown": ["self", "manager", "uvicorn_workers", "shutdown_reason"],
        "verify_worker_status": ["self"],
        "_get_request_queue": ["self", "api_path"],
        "launch_inference_worker": ["self", "lit_api"],
        "launch_single_inference_worker": ["self", "lit_api", "worker_id"],
    }
    for name, parameters in expected.items():
        assert list(inspect.signature(getattr(LitServer, name)).parameters) == parameters, name


def test_run_shuts_down_gracefully_on_keyboard_interrupt_and_the_shutdown_event() -> None:
    source = inspect.getsource(LitServer.run)
    assert "self._shutdown_event.wait()" in source
    assert "except KeyboardInterrupt" in source and "self._perform_graceful_shutdown(" in source
    assert "self._start_worker_monitoring(manager, uvicorn_workers)" in source
    assert "self.verify_worker_status()" in source


def test_workers_and_api_servers_learn_their_index_from_litserve_worker_id() -> None:
    assert 'os.environ["LITSERVE_WORKER_ID"] = str(worker_id)' in inspect.getsource(_Server.run)
    from litserve.loops import loops

    assert 'os.environ["LITSERVE_WORKER_ID"] = str(worker_id)' in inspect.getsource(loops.inference_worker)


class EchoAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        pass

    def predict(self, x):
        return x


def test_a_request_is_a_four_tuple_and_a_worker_first_reports_which_request_it_took() -> None:
    api = EchoAPI(max_batch_size=4, batch_timeout=0.05)
    api.request_timeout = 30
    queue = adapter.SPAWN.Queue()
    transport = adapter.PipeQueueTransport([adapter.SPAWN.Queue()])
    loop = BatchedLoop()
    loop._restart_workers = True  # as DigitServer sets restart_workers=True
    loop._worker_id = 3
    queue.put((0, "uid-1", time.monotonic(), "payload"))
    payloads, timed_out = collate_requests(loop, api, queue, transport)
    assert payloads == [(0, "uid-1", "payload")] and timed_out == []
    uid, (data, status, _kind, worker_id) = transport.queues[0].get(timeout=5)
    assert (uid, data, status, worker_id) == ("uid-1", (), LitAPIStatus.START, 3)


def test_batch_size_one_skips_batch_and_unbatch() -> None:
    class NoBatching(EchoAPI):
        def batch(self, inputs):
            raise AssertionError("batch called")

        def unbatch(self, output):
            raise AssertionError("unbatch called")

    api = NoBatching(max_batch_size=1)
    api.request_timeout = 30
    queue = adapter.SPAWN.Queue()
    transport = adapter.PipeQueueTransport([adapter.SPAWN.Queue()])
    queue.put((0, "uid-2", time.monotonic(), np.arange(3)))
    queue.put(_SENTINEL_VALUE)
    loop = SingleLoop()
    loop._restart_workers = False
    loop.run_single_loop(api, queue, transport, CallbackRunner())
    uid, (data, status, _kind, _worker) = transport.queues[0].get(timeout=5)
    assert uid == "uid-2" and status == LitAPIStatus.OK and list(data) == [0, 1, 2]


def test_the_response_buffer_item_has_the_fields_submit_uses() -> None:
    import asyncio

    item = ResponseBufferItem(event=asyncio.Event())
    assert item.response is None and item.worker_id is None


class Doubler(adapter.BatchedAPI[int, int]):
    """Records the batches it is given; fails on 13."""

    def __init__(self, max_batch_size: int) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=0.05, api_path="/test")
        self.request_timeout = 30
        self.seen: list[list[int]] = []

    def decode_request(self, request: int) -> int:
        return request

    def predict_batch(self, items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("thirteen")
        self.seen.append(list(items))
        return [2 * item for item in items]


def run_loop(api: ls.LitAPI, requests: list[tuple[str, float, object]]) -> dict[str, tuple[object, LitAPIStatus]]:
    """Run LitServe's own loop for ``api`` (the one its workers run) over ``requests`` (uid,
    enqueued at, payload); what it answered per uid."""
    queue = adapter.SPAWN.Queue()
    transport = adapter.PipeQueueTransport([adapter.SPAWN.Queue()])
    loop = BatchedLoop() if api.max_batch_size > 1 else SingleLoop()
    loop._restart_workers = False
    run = loop.run_batched_loop if api.max_batch_size > 1 else loop.run_single_loop
    for uid, enqueued_at, payload in requests:
        queue.put((0, uid, enqueued_at, payload))
    thread = threading.Thread(target=run, args=(api, queue, transport, CallbackRunner()), daemon=True)
    thread.start()
    answers = {}
    try:
        while len(answers) < len(requests):
            uid, (data, status, _kind, _worker) = transport.queues[0].get(timeout=10)
            answers[uid] = (data, status)
    finally:
        queue.put(_SENTINEL_VALUE)  # stops the loop
        thread.join(10)
    return answers


def test_a_batched_api_is_given_lists_with_and_without_batching() -> None:
    now = time.monotonic()
    for max_batch_size in (1, 4):
        api = Doubler(max_batch_size)
        answers = run_loop(api, [("a", now, 1), ("b", now, 2), ("c", now, 3)])
        assert {uid: data for uid, (data, _) in answers.items()} == {"a": 2, "b": 4, "c": 6}
        assert all(status == LitAPIStatus.OK for _, status in answers.values())
        assert all(isinstance(batch, list) for batch in api.seen)
        assert [item for batch in api.seen for item in batch] == [1, 2, 3]
    assert len(api.seen) == 1  # max_batch_size=4: one batch of three


def test_a_worker_failure_and_a_queue_timeout_become_typed_errors() -> None:
    now = time.monotonic()
    for max_batch_size in (1, 4):
        answers = run_loop(Doubler(max_batch_size), [("late", now - 60, 1), ("bad", now, 13)])
        late, bad = answers["late"], answers["bad"]
        assert late[1] == bad[1] == LitAPIStatus.ERROR
        assert isinstance(adapter.error_of(late[0]), adapter.QueueTimeout)
        failed = adapter.error_of(bad[0])
        assert isinstance(failed, adapter.WorkerFailed) and "thirteen" in str(failed)


def test_an_idle_api_loads_nothing_and_runs_without_a_batching_window() -> None:
    api = adapter.BatchedAPI(max_batch_size=8, batch_timeout=0.1, api_path="/test", idle=True)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        api.setup("cpu")  # would raise NotImplementedError if it tried to load a model
    finally:
        signal.signal(signal.SIGTERM, handler)  # setup installs the worker's own SIGTERM handler
    assert api.max_batch_size == 1
