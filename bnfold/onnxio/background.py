"""A file written on a second thread, so the next weights are computed while these are written.

Folding a 100 MB model is three costs in a row: computing the folded weights (W·s, chunk by
chunk), writing them, and everything else. The write is a memory copy into the page cache that
runs with the GIL released, and so is numpy's multiply: with the writes queued to a thread, the
two overlap on two cores instead of adding up.

Writes keep their order. Small ones (tags, headers, small tensors) are gathered here and queued
in batches, so a graph of 80,000 tiny initializers pays no per-write queue cost. Computed chunks
go into a few reused buffers (`take`); a buffer comes back once its bytes are written, so memory
stays at BUFFERS of them. A failed write is raised in the caller at its next call or at `close`.
"""

from __future__ import annotations

import collections
import threading
from typing import BinaryIO, Callable

import numpy as np

BUFFERS = 3
_BATCH_BYTES = 1 << 20  # small writes gathered up to this much before they are queued
_SMALL_BYTES = 64 << 10  # writes below this are gathered; larger ones are queued as they are


class BackgroundWriter:
    """Writes to `handle` (a binary file) in order, on a thread of its own."""

    def __init__(self, handle: BinaryIO):
        self._handle = handle
        self._jobs: collections.deque = collections.deque()
        self._ready = threading.Condition()
        self._free: list[np.ndarray] = []  # buffers whose bytes are written
        self._lent: collections.deque[np.ndarray] = collections.deque()  # taken, not yet queued
        self._buffers = 0
        self._batch = bytearray()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bnfold-writer", daemon=True)
        self._thread.start()

    # ---- the caller's side --------------------------------------------------------------

    def write(self, data) -> None:
        """Queue `data` (bytes, or a buffer that is not changed afterwards)."""
        if memoryview(data).nbytes < _SMALL_BYTES:
            self._batch += data
            if len(self._batch) >= _BATCH_BYTES:
                self._flush_batch()
            return
        self._flush_batch()
        self._put((data, None))

    def call(self, function: Callable[[BinaryIO], None]) -> None:
        """Queue `function(handle)`, run on the writer's thread after every earlier write."""
        self._flush_batch()
        self._put((function, None))

    def take(self, nbytes: int) -> np.ndarray:
        """A buffer (uint8, at least `nbytes`) to compute into; hand it back filled with
        `write_taken`. Waits while every buffer is still being written."""
        with self._ready:
            while True:
                self._raise_failure()
                fits = [i for i, buffer in enumerate(self._free) if buffer.nbytes >= nbytes]
                if fits:
                    buffer = self._free.pop(fits[0])
                    break
                if self._free:  # free but too small for this chunk: replace it
                    self._free.pop()
                    self._buffers -= 1
                if self._buffers < BUFFERS:
                    buffer = np.empty(nbytes, np.uint8)
                    self._buffers += 1
                    break
                self._ready.wait()
        self._lent.append(buffer)
        return buffer

    def write_taken(self, view) -> None:
        """Queue `view` (bytes of the oldest buffer from `take`): the buffer returns to the pool
        once it is written."""
        self._flush_batch()
        self._put((view, self._lent.popleft()))

    def close(self, abort: bool = False) -> None:
        """Write what is queued (nothing more when `abort`), stop the thread, and raise the
        error of a failed write."""
        try:
            if not abort:
                self._flush_batch()  # raises a failure already seen: the thread stops anyway
        finally:
            with self._ready:
                if abort or self._error is not None:
                    self._jobs.clear()
                self._jobs.append(None)
                self._ready.notify_all()
            self._thread.join()
        if not abort:
            self._raise_failure()

    def _flush_batch(self) -> None:
        if self._batch:
            self._put((bytes(self._batch), None))
            self._batch.clear()

    def _put(self, job) -> None:
        with self._ready:
            self._raise_failure()
            self._jobs.append(job)
            self._ready.notify_all()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    # ---- the writer's thread ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._jobs:
                    self._ready.wait()
                job = self._jobs.popleft()
            if job is None:
                return
            data, buffer = job
            try:
                if self._error is None:
                    if callable(data):
                        data(self._handle)
                    else:
                        self._handle.write(data)
            except BaseException as exc:  # noqa: BLE001 (raised again in the caller)
                self._error = exc
            finally:
                if buffer is not None:
                    with self._ready:
                        self._free.append(buffer)
                        self._ready.notify_all()
