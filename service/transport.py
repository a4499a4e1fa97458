"""The inter-process path between LitServe's API servers and inference workers.

LitServe 0.2.19 passes every request and response through ``multiprocessing.Manager``
queues: each put and get is a round trip through the manager process. Its ZMQ option is
silently ignored (and, forced on, swaps the broker addresses and hangs). We replace both
directions with plain pipe-backed ``multiprocessing.Queue``s:

* requests: one queue per API path, written by every API server, read by the workers;
* responses: one queue per API server, read in that server's event loop, woken by the
  pipe's file descriptor instead of a thread hop per message.

Only small items cross: a request is 784 pixel bytes plus an id and a timestamp.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import multiprocessing.queues
from queue import Empty
from typing import Any

from litserve.transport.base import MessageTransport

# Queues must be created from the spawn context: LitServe spawns inference workers, and
# semaphores made in a fork context are unlinked at once, so a spawned child cannot open them.
SPAWN = mp.get_context("spawn")


def new_queue() -> mp.Queue:
    return SPAWN.Queue()


class GreedyBatchQueue(mp.queues.Queue):
    """The request queue, for greedy batching: a batch is whatever waited while the worker
    was busy, so an idle worker answers a lone request at once and a busy one batches.

    LitServe (batch_timeout=0) drains the queue with ``get_nowait`` until it is empty and
    would spin when there is nothing; here the first call of each drain blocks (no CPU) until
    a request arrives, and later calls never wait.
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


class PipeQueueTransport(MessageTransport):
    def __init__(self, queues: list) -> None:
        self._queues = queues
        self._inbox: asyncio.Queue | None = None
        self._closed = False

    def send(self, item: Any, consumer_id: int) -> None:
        self._queues[consumer_id].put(item)

    def _attach(self, consumer_id: int) -> asyncio.Queue:
        """In the consuming API server: move items from the pipe into an asyncio queue
        whenever the pipe's descriptor becomes readable."""
        inbox: asyncio.Queue = asyncio.Queue()
        source = self._queues[consumer_id]
        loop = asyncio.get_running_loop()

        def drain() -> None:
            while True:
                try:
                    inbox.put_nowait(source.get_nowait())
                except Empty:
                    return

        loop.add_reader(source._reader.fileno(), drain)
        self._inbox = inbox
        return inbox

    async def areceive(self, consumer_id: int, timeout: float | None = None, block: bool = True) -> Any:
        if self._closed:
            raise asyncio.CancelledError("transport closed")
        inbox = self._inbox or self._attach(consumer_id)
        return await inbox.get()

    def close(self, send_sentinel: bool = True) -> None:
        self._closed = True
        if send_sentinel:
            for queue in self._queues:
                with contextlib.suppress(Exception):
                    queue.put(None)

    def __reduce__(self):
        return PipeQueueTransport, (self._queues,)
