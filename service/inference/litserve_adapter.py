"""Every touch of LitServe's insides, in one module, for exactly the pinned LitServe version.

What we rely on (each has a contract test in tests/test_litserve_contract.py):

* ``LitServer._init_manager`` builds the request and response queues: we replace them with
  pipe-backed queues (LitServe's manager queues cost a round trip through the manager process
  per put and get, and its ZMQ option is silently ignored in 0.2.19, upstream #751). There is
  one request queue per inference worker, so each queue has one reader and a dead reader's
  lock can be released safely when it is replaced.
* ``LitServer._start_server`` forks one uvicorn server per API server with a shared socket; we
  keep its arguments to restart a dead API server the same way.
* ``LitServer._start_worker_monitoring`` and ``_perform_graceful_shutdown``: our supervisor
  replaces LitServe's monitor (which answers a dead worker's requests only in the main
  process, where no request waits, upstream behaviour in 0.2.19).
* ``run`` waits on ``_shutdown_event`` and catches ``KeyboardInterrupt`` to shut down
  gracefully: SIGTERM and SIGINT in the main process raise it (:func:`interrupt_on_signals`).
* Requests are ``(response_queue_id, uid, enqueued_at, payload)`` tuples on the request queue;
  responses arrive in ``LitServer.response_buffer[uid]`` (``ResponseBufferItem``), filled by the
  task LitServe's lifespan starts; with ``restart_workers=True`` a worker first reports which
  request it took (``LitAPIStatus.START`` with its worker id).
* With ``max_batch_size == 1`` LitServe's loop skips ``batch`` and ``unbatch`` (:class:`BatchedAPI`
  hides that). ``run`` starts the workers through ``launch_inference_worker``: for an idle API (the
  model is in the API servers) :class:`DigitServer` starts none.
* A worker answers ``LitAPIStatus.ERROR`` with ``HTTPException(504)`` for a request that waited
  past the timeout and with a pickled exception when the LitAPI raised; :func:`submit` turns
  them into :class:`QueueTimeout` and :class:`WorkerFailed`.
* ``run`` meets ``EOFError``/``ConnectionError`` when LitServe's manager process (it holds the
  shutdown event) died: :meth:`DigitServer.run` raises :class:`ManagerGone`.
* Inference workers are stopped with SIGTERM once the API servers have drained.
* ``LITSERVE_WORKER_ID`` holds the index of the API server (in API servers) and of the worker
  (in inference workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import enum
import logging
import multiprocessing as mp
import multiprocessing.queues
import os
import pickle
import signal
import sys
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from queue import Empty
from typing import Any, Generic, TypeVar

import litserve as ls
import uvicorn
from fastapi import FastAPI
from litserve.server import _Server
from litserve.transport.base import MessageTransport
from litserve.utils import LitAPIStatus, ResponseBufferItem

PINNED_VERSION = "0.2.19"
if ls.__version__ != PINNED_VERSION:
    raise ImportError(
        f"digit-service adapts LitServe {PINNED_VERSION}'s internals (service/inference/litserve_adapter.py) but "
        f"LitServe {ls.__version__} is installed: pin litserve=={PINNED_VERSION} or port the adapter"
    )

log = logging.getLogger("digits.supervisor")

# Queues must come from the spawn context: LitServe spawns inference workers, and semaphores made
# in a fork context are unlinked at once, so a spawned child could not open them.
SPAWN = mp.get_context("spawn")
CRASH_LOOP_DEATHS = 5  # more deaths than this of one kind of process ...
CRASH_LOOP_WINDOW = 60.0  # ... within this many seconds stop the server
SUPERVISE_SECONDS = 0.2


def process_index() -> int:
    """This API server's or inference worker's index (0 in the main process)."""
    return int(os.environ.get("LITSERVE_WORKER_ID", "0"))


# ---------------------------------------------------------------------------------- what callers see


class WorkerGone(RuntimeError):
    """The inference worker holding a request died before answering it."""


class QueueTimeout(RuntimeError):
    """The request waited in the queue past the server's request timeout; no worker ran it."""


class WorkerFailed(RuntimeError):
    """The LitAPI raised while handling the request (the message says what)."""


class ManagerGone(RuntimeError):
    """LitServe's manager process died: nothing can be supervised any more."""


class ProcessKind(enum.Enum):
    """What kind of child died (the supervisor's :class:`Death`)."""

    INFERENCE_WORKER = "inference worker"
    API_SERVER = "API server"
    EXTRA = "extra process"  # one of ``extra_processes``


@dataclass(frozen=True)
class Death:
    """A child the supervisor found dead (it is being replaced)."""

    kind: ProcessKind
    index: int  # the worker's or API server's index; 0 for an extra process


# ---------------------------------------------------------------------------------- the LitAPI

Item = TypeVar("Item")
Result = TypeVar("Result")


class BatchedAPI(ls.LitAPI, Generic[Item, Result]):
    """A LitAPI whose subclass sees batches only, whatever ``max_batch_size`` is: it implements
    ``setup_model(device)``, ``decode_request(request) -> Item`` and ``predict_batch(items) ->
    results`` (one per item, in order).

    ``idle=True``: no inference worker is needed (the model runs in the API servers), so
    :class:`DigitServer` starts none; were one started, it would load nothing.
    """

    def __init__(self, *, max_batch_size: int, batch_timeout: float, api_path: str, idle: bool = False) -> None:
        batch_size = 1 if idle else max_batch_size  # idle: the simplest loop, no batching window
        with warnings.catch_warnings():  # LitServe warns that batch() is unused with batch size 1: by design
            warnings.filterwarnings("ignore", "The LitServer has both batch and unbatch", UserWarning)
            super().__init__(max_batch_size=batch_size, batch_timeout=0.0 if idle else batch_timeout,
                             api_path=api_path)
        self.idle = idle

    def setup(self, device: str) -> None:
        # LitServe stops workers with SIGTERM once the API servers have drained. Exiting through
        # Python (not the default kill) lets multiprocessing clean up after the model's own
        # worker pools (torch.compile's) instead of leaving semaphores behind.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        if not self.idle:
            self.setup_model(device)

    def setup_model(self, device: str) -> None:
        raise NotImplementedError

    def predict_batch(self, items: list[Item]) -> list[Result]:
        raise NotImplementedError

    # LitServe calls batch/predict/unbatch/encode_response with max_batch_size > 1 and only
    # predict/encode_response (one request at a time) with max_batch_size == 1.
    def batch(self, inputs: list[Item]) -> list[Item]:
        return list(inputs)

    def predict(self, x: list[Item] | Item) -> list[Result] | Result:
        if self.max_batch_size > 1:
            return self.predict_batch(x)
        return self.predict_batch([x])[0]

    def unbatch(self, output: list[Result]) -> list[Result]:
        return output

    def encode_response(self, output: Result) -> Result:
        return output


# ---------------------------------------------------------------------------------- queues


class GreedyBatchQueue(mp.queues.Queue):
    """A worker's request queue for greedy batching: a batch is whatever waited while the worker
    was busy, so an idle worker answers a lone request at once and a busy one batches.

    LitServe (batch_timeout=0) drains the queue with ``get_nowait`` until it is empty and would
    spin when there is nothing; here the first call of each drain waits (without CPU) for up to a
    second until a request arrives, and later calls never wait.
    """

    IDLE_WAIT = 1.0
    _drain_started = False  # per process; not part of the pickled state

    def __init__(self) -> None:
        super().__init__(ctx=SPAWN)

    def get_nowait(self) -> Any:
        if not self._drain_started:
            item = self.get(timeout=self.IDLE_WAIT)  # Empty after a second: LitServe simply asks again
            self._drain_started = True
            return item
        try:
            return super().get_nowait()
        except Empty:
            self._drain_started = False
            raise


def release_if_held_by_the_dead(lock: Any, wait: float = 0.2) -> None:
    """A process killed inside ``Queue.get``/``put`` leaves the queue's lock taken for ever. Once
    nobody alive can hold it for longer than ``wait`` (locks are held for microseconds, or by the
    dead), a lock we cannot take is released."""
    if lock is None:
        return
    if lock.acquire(timeout=wait):
        lock.release()
        return
    with contextlib.suppress(ValueError):
        lock.release()


class PipeQueueTransport(MessageTransport):
    """Responses: one pipe-backed queue per API server, read in that server's event loop when
    the pipe's descriptor becomes readable (no thread hop per message)."""

    def __init__(self, queues: list[mp.Queue]) -> None:
        self.queues = queues
        self._inbox: asyncio.Queue | None = None
        self._closed = False

    def send(self, item: Any, consumer_id: int) -> None:
        self.queues[consumer_id].put(item)

    def _attach(self, consumer_id: int) -> asyncio.Queue:
        inbox: asyncio.Queue = asyncio.Queue()
        source = self.queues[consumer_id]

        def drain() -> None:
            while True:
                try:
                    inbox.put_nowait(source.get_nowait())
                except Empty:
                    return

        asyncio.get_running_loop().add_reader(source._reader.fileno(), drain)
        self._inbox = inbox
        return inbox

    async def areceive(self, consumer_id: int, timeout: float | None = None, block: bool = True) -> Any:
        if self._closed:
            raise asyncio.CancelledError("transport closed")
        return await (self._inbox or self._attach(consumer_id)).get()

    def close(self, send_sentinel: bool = True) -> None:
        self._closed = True
        if send_sentinel:
            for queue in self.queues:
                with contextlib.suppress(Exception):
                    queue.put(None)

    def __reduce__(self):
        return PipeQueueTransport, (self.queues,)


# ---------------------------------------------------------------------------------- server


class DigitServer(ls.LitServer):
    """LitServer with our queues, a start that does not wait for warm-up (``/ready`` tells), and
    a supervisor that replaces dead processes."""

    def __init__(self, lit_api: ls.LitAPI, *, greedy_batching: bool, on_death: Callable[[Death], None],
                 edge: Callable[[FastAPI], Any], extra_processes: dict[str, Callable[[], Any]] | None = None,
                 **kwargs: Any) -> None:
        """``edge(app)`` wraps the app that uvicorn runs in each API server (our outermost ASGI layers);
        ``on_death`` is called in the main process for every dead child, before it is replaced."""
        super().__init__(lit_api, restart_workers=True, healthcheck_path="/litserve/health",
                         info_path="/litserve/info", **kwargs)
        self.edge = edge
        self.greedy_batching = greedy_batching
        self.on_death = on_death
        self.extra_starters = extra_processes or {}
        self.extra_processes: dict[str, Any] = {}
        self.worker_queues: list[mp.Queue] = []
        self._stopping = threading.Event()
        self._deaths: dict[str, deque[float]] = {}
        remove_routes(self.app, {"/", lit_api.api_path, "/litserve/health", "/litserve/info"})

    def worker_count(self) -> int:
        return len(self._inference_workers_config_for_api(self.lit_api.api_path))

    def run(self, **kwargs: Any) -> None:
        """LitServer.run until a graceful shutdown; :class:`ManagerGone` if LitServe's manager died."""
        try:
            super().run(**kwargs)
        except (EOFError, ConnectionError) as exc:  # a proxy to the dead manager (BrokenPipeError included)
            raise ManagerGone("LitServe's manager process died") from exc

    def _init_manager(self, num_api_servers: int):
        manager = super()._init_manager(num_api_servers)
        make = GreedyBatchQueue if self.greedy_batching else (lambda: SPAWN.Queue())
        self.worker_queues = [make() for _ in range(self.worker_count())]
        self._transport = PipeQueueTransport([SPAWN.Queue() for _ in range(num_api_servers)])
        return manager

    def _get_request_queue(self, api_path: str):
        """LitServe hands a worker "the" request queue as it launches it: the one of the worker
        being launched (see launch_worker)."""
        return self.worker_queues[self._launching]

    def launch_inference_worker(self, lit_api: ls.LitAPI) -> list:
        """None for an idle API (the model is in the API servers): a spawned interpreter that
        nothing calls would only take CPU from the start and memory from the pod."""
        if getattr(lit_api, "idle", False):
            return []
        return [self.launch_worker(index) for index in range(self.worker_count())]

    def launch_worker(self, index: int):
        self._launching = index
        return self.launch_single_inference_worker(self.lit_api, index)

    def verify_worker_status(self) -> None:
        """Open the port at once: /health answers and /ready says 503 while the models warm up."""

    def _start_server(self, port, num_uvicorn_servers, log_level, sockets, uvicorn_worker_type, **kwargs):
        self._api_server_args = (port, log_level, sockets, kwargs)
        self.api_servers = {index: self.start_api_server(index) for index in range(num_uvicorn_servers)}
        return self.api_servers

    def start_api_server(self, index: int) -> mp.Process:
        """One uvicorn server process, forked with the shared socket (as LitServe's _start_server)."""
        port, log_level, sockets, kwargs = self._api_server_args
        self.app.response_queue_id = index
        app: FastAPI = copy.copy(self.app)
        self._prepare_app_run(app)
        config = uvicorn.Config(app=self.edge(app), host="0.0.0.0", port=port, log_level=log_level,
                                timeout_graceful_shutdown=self.uvicorn_graceful_timeout, **kwargs)
        process = mp.get_context("fork").Process(
            target=_Server(config=config).run, args=(index, sockets), name=f"LitServer-{index}"
        )
        process.start()
        log.info("API server %d started (pid %d)", index, process.pid, extra={"pid": process.pid})
        return process

    def _start_worker_monitoring(self, manager, uvicorn_workers) -> None:
        self.extra_processes = {name: start() for name, start in self.extra_starters.items()}
        threading.Thread(target=self._supervise, name="digits-supervisor", daemon=True).start()

    def _supervise(self) -> None:
        kinds = ProcessKind
        while not self._stopping.wait(SUPERVISE_SECONDS):
            try:
                for index, process in enumerate(self.inference_workers):
                    if not process.is_alive():
                        self._replace(kinds.INFERENCE_WORKER, kinds.INFERENCE_WORKER.value, index, process,
                                      lambda i=index: self._restart_worker(i))
                for index, process in list(self.api_servers.items()):
                    if not process.is_alive() and not self._stopping.is_set():
                        self._replace(kinds.API_SERVER, kinds.API_SERVER.value, index, process,
                                      lambda i=index: self.api_servers.__setitem__(i, self.start_api_server(i)))
                for name, process in list(self.extra_processes.items()):
                    if not process.is_alive() and not self._stopping.is_set():
                        self._replace(kinds.EXTRA, name, 0, process,
                                      lambda n=name: self.extra_processes.__setitem__(n, self.extra_starters[n]()))
            except Exception:
                log.exception("the supervisor failed; retrying")

    def _replace(self, kind: ProcessKind, name: str, index: int, process: Any, restart: Callable[[], None]) -> None:
        if self._stopping.is_set():
            return
        code = process.exitcode
        log.error("%s %d (pid %s) died with exit code %s; replacing it", name, index, process.pid, code)
        self.on_death(Death(kind, index))
        deaths = self._deaths.setdefault(name, deque())
        now = time.monotonic()
        deaths.append(now)
        while deaths and now - deaths[0] > CRASH_LOOP_WINDOW:
            deaths.popleft()
        if len(deaths) > CRASH_LOOP_DEATHS:
            log.critical("%s crash loop: %d deaths within %.0f s; stopping the server", name, len(deaths),
                         CRASH_LOOP_WINDOW)
            self._stopping.set()
            os.kill(os.getpid(), signal.SIGTERM)
            return
        restart()

    def _restart_worker(self, index: int) -> None:
        queue = self.worker_queues[index]
        release_if_held_by_the_dead(queue._rlock)  # the dead worker was most likely waiting in get()
        for response_queue in self._transport.queues:
            release_if_held_by_the_dead(response_queue._wlock)
        self.inference_workers[index] = self.launch_worker(index)

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason: str = "normal") -> None:
        self._stopping.set()
        super()._perform_graceful_shutdown(manager, self.api_servers, shutdown_reason)


# ---------------------------------------------------------------------------------- app


def remove_routes(app: FastAPI, paths: set[str]) -> None:
    """Drop routes LitServe registered that we replace (its plain-text index, its LitAPI route
    that serves the internal queue payloads, its own health/info)."""
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in paths]


def add_lifespan(app: FastAPI, inner: Callable[[FastAPI], contextlib.AbstractAsyncContextManager]) -> None:
    """Run ``inner`` inside LitServe's lifespan (which starts the response reader) in every API server."""
    outer = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def combined(application: FastAPI) -> AsyncIterator[None]:
        async with outer(application), inner(application):
            yield

    app.router.lifespan_context = combined


async def submit(server: DigitServer, worker: int, payload: Any) -> Any:
    """Queue one payload for inference worker ``worker`` and wait for what its LitAPI returned.

    Raises :class:`WorkerGone`, :class:`QueueTimeout` or :class:`WorkerFailed`."""
    uid = uuid.uuid4().hex
    item = ResponseBufferItem(event=asyncio.Event())
    item.worker_id = worker  # before the worker takes it: a death fails what sits in its queue too
    server.response_buffer[uid] = item
    try:
        server.worker_queues[worker].put((server.app.response_queue_id, uid, time.monotonic(), payload))
        await item.event.wait()
        if item.response is None:
            raise WorkerGone(f"inference worker {item.worker_id} died while holding this request (queued or taken)")
        response, status = item.response[0], item.response[1]
    finally:
        server.response_buffer.pop(uid, None)
    if status == LitAPIStatus.ERROR:
        raise error_of(response)
    return response


def error_of(response: Any) -> QueueTimeout | WorkerFailed:
    """A worker's error answer: LitServe's queue timeout (``HTTPException(504)``) or a pickled exception."""
    with contextlib.suppress(Exception):
        response = pickle.loads(response) if isinstance(response, bytes) else response
    if getattr(response, "status_code", None) == 504:
        return QueueTimeout("the request waited too long for an inference worker")
    return WorkerFailed(str(response))


def fail_requests_held_by(server: DigitServer, worker: int) -> int:
    """Answer (with WorkerGone) every waiting request queued to worker ``worker`` or taken by it.
    A request queued but not yet taken would otherwise wait in the dead worker's queue until the
    replacement (seconds, many under load) reads it: a client timeout, seen once in CI."""
    failed = 0
    for item in list(server.response_buffer.values()):
        if item.worker_id == worker and not item.event.is_set():
            item.response = None
            item.event.set()
            failed += 1
    return failed


def interrupt_on_signals(main_pid: int) -> None:
    """SIGTERM and SIGINT in the main process raise KeyboardInterrupt, which LitServe's ``run``
    turns into its graceful shutdown (uvicorn drains, then the workers stop). Forked API servers
    inherit the handler; there uvicorn has shut down already when it re-raises, so it does nothing."""

    def handler(signum: int, frame: object) -> None:
        if os.getpid() == main_pid:
            raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def ignore_signals() -> None:
    """While shutting down: a second SIGTERM or Ctrl+C must not interrupt the cleanup."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
