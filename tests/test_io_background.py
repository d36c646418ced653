"""The writer thread (bnfold.onnxio.background): every byte in order, a bounded pool of
buffers, and a failed write raised in the caller, without hanging it."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest

import bnfold.onnxio.background as background
from bnfold.folding.product import WeightProduct
from bnfold.onnxio.background import BackgroundWriter


class _Recording(io.BytesIO):
    """Records each write's size; fails on the `fail_at`-th write (0-based) when given."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.sizes: list[int] = []
        self.threads: set[str] = set()
        self.fail_at = fail_at

    def write(self, data) -> int:
        self.threads.add(threading.current_thread().name)
        if self.fail_at is not None and len(self.sizes) == self.fail_at:
            raise OSError(28, "No space left on device")
        self.sizes.append(memoryview(data).nbytes)
        return super().write(data)


def test_every_kind_of_write_arrives_in_order():
    r = np.random.default_rng(0)
    handle = _Recording()
    writer = BackgroundWriter(handle)
    expected = bytearray()
    small = [bytes([i % 256]) * 10 for i in range(2000)]  # gathered into batches
    for part in small[:1000]:
        writer.write(part)
        expected += part
    large = r.integers(0, 255, 300_000, dtype=np.uint8)
    writer.write(memoryview(large))
    expected += large.tobytes()
    product = WeightProduct(r.normal(size=(64, 3, 50)).astype(np.float32),
                            r.normal(size=(64, 1, 1)))
    for chunk in product.chunks(7_000, take=writer.take):
        writer.write_taken(chunk)
    expected += product.tobytes()
    writer.call(lambda out: out.write(b"called"))
    expected += b"called"
    for part in small[1000:]:
        writer.write(part)
        expected += part
    writer.close()
    assert handle.getvalue() == bytes(expected)
    assert handle.threads == {"bnfold-writer"}
    # 20,000 small bytes went out in a few writes, not 2,000
    assert len(handle.sizes) < 2000 // 10


def test_buffers_are_reused_not_one_per_chunk(monkeypatch):
    made = []
    real_empty = np.empty

    def counted_empty(*args, **kwargs):
        made.append(args)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(background.np, "empty", counted_empty)
    handle = _Recording()
    writer = BackgroundWriter(handle)
    product = WeightProduct(np.ones((100, 10), np.float32), np.full((100, 1), 2.0))
    for chunk in product.chunks(400, take=writer.take):  # 100 chunks of one row
        writer.write_taken(chunk)
    writer.close()
    assert handle.getvalue() == np.full((100, 10), 2.0, np.float32).tobytes()
    pool = [args for args in made if args[1:] == (np.uint8,)]  # np is numpy itself: filter
    assert 1 <= len(pool) <= background.BUFFERS


def test_a_larger_chunk_replaces_a_small_free_buffer():
    writer = BackgroundWriter(_Recording())
    sizes = [10, 10, 10, 1000, 10, 5000]
    for size in sizes:
        buffer = writer.take(size)
        assert buffer.nbytes >= size
        buffer[:size] = 7
        writer.write_taken(memoryview(buffer)[:size])
    writer.close()


@pytest.mark.parametrize("fail_at", [0, 1, 5])
def test_a_failed_write_is_raised_in_the_caller(fail_at):
    handle = _Recording(fail_at=fail_at)
    writer = BackgroundWriter(handle)
    product = WeightProduct(np.ones((64, 1000), np.float32), np.full((64, 1), 3.0))
    with pytest.raises(OSError, match="No space left"):
        try:  # as write_model does
            for _ in range(3):  # more chunks than the pool holds: a hang would show here
                for chunk in product.chunks(4000, take=writer.take):
                    writer.write_taken(chunk)
        except BaseException:
            writer.close(abort=True)
            raise
        writer.close()
    assert not writer._thread.is_alive()
    assert len(handle.sizes) == fail_at  # nothing was written after the failure


def test_abort_drops_what_is_queued_and_stops_the_thread():
    gate = threading.Event()
    handle = _Recording()
    writer = BackgroundWriter(handle)
    writer.call(lambda out: gate.wait(10))
    writer.write(b"x" * (1 << 20))  # queued behind the blocked call
    opener = threading.Timer(0.3, gate.set)  # opens after close has dropped the queue
    opener.start()
    writer.close(abort=True)
    opener.join()
    assert not writer._thread.is_alive()
    assert handle.getvalue() == b""


def test_close_stops_the_thread_when_the_last_batch_finds_a_failure():
    handle = _Recording(fail_at=0)
    writer = BackgroundWriter(handle)
    writer.write(b"y" * (1 << 17))  # queued as it is, and fails
    writer.call(lambda out: None)  # waits for the failure to be recorded before the batch
    while writer._jobs:
        threading.Event().wait(0.01)
    writer.write(b"x" * 10)  # batched: only close() queues it, and finds the failure
    with pytest.raises(OSError, match="No space left"):
        writer.close()
    writer._thread.join(timeout=5)
    assert not writer._thread.is_alive()
