"""DecodeBatcher: dynamic batching semantics, error isolation, lifecycle, metrics hooks.

A classic codec (JPEG) stands behind the batcher, so no torch or weights are needed.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import CancelledError

import numpy as np
import pytest

from tileserver import codecs
from tileserver.batching import DecodeBatcher
from tileserver.errors import CorruptTile

WAIT = 30.0  # generous bound so a broken batcher fails instead of hanging


@pytest.fixture(scope="module")
def jpeg_blobs() -> list[bytes]:
    rng = np.random.default_rng(0)
    codec = codecs.get("jpeg", quality=90)
    return [codec.encode(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)) for _ in range(12)]


class Recorder:
    """Wraps a decode_batch, recording batch sizes; can be held closed to build up a queue."""

    def __init__(self) -> None:
        self.codec = codecs.get("jpeg", quality=90)
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on: bytes | None = None

    def __call__(self, blobs: Sequence[bytes]) -> list[object]:
        self.gate.wait(WAIT)
        self.sizes.append(len(blobs))
        if self.fail_on is not None and self.fail_on in blobs:
            raise RuntimeError("whole batch failed")
        return list(self.codec.decode_batch(blobs))


class Observer:
    def __init__(self) -> None:
        self.calls: list[tuple[int, float, list[float]]] = []

    def on_batch(self, size: int, seconds: float, queue_waits: list[float]) -> None:
        self.calls.append((size, seconds, queue_waits))


def test_results_match_direct_decode(jpeg_blobs: list[bytes]) -> None:
    codec = codecs.get("jpeg", quality=90)
    with DecodeBatcher(codec.decode_batch, max_batch=4, max_delay_ms=1.0, name="jpeg") as b:
        futures = [b.submit(x) for x in jpeg_blobs]
        for fut, blob in zip(futures, jpeg_blobs, strict=True):
            assert np.array_equal(fut.result(WAIT), codec.decode(blob))
        assert np.array_equal(b.decode(jpeg_blobs[0], timeout=WAIT), codec.decode(jpeg_blobs[0]))


def test_full_batch_dispatches_without_waiting_for_delay(jpeg_blobs: list[bytes]) -> None:
    rec = Recorder()
    # A one-hour delay: only reaching max_batch can dispatch these.
    b = DecodeBatcher(rec, max_batch=4, max_delay_ms=3_600_000)
    futures = [b.submit(x) for x in jpeg_blobs[:8]]
    for f in futures:
        f.result(WAIT)
    assert rec.sizes == [4, 4]
    b.close()


def test_delay_dispatches_partial_batch(jpeg_blobs: list[bytes]) -> None:
    rec = Recorder()
    with DecodeBatcher(rec, max_batch=64, max_delay_ms=1.0) as b:
        b.submit(jpeg_blobs[0]).result(WAIT)
    assert rec.sizes == [1]


def test_queued_requests_are_batched_up_to_max(jpeg_blobs: list[bytes]) -> None:
    rec = Recorder()
    rec.gate.clear()  # hold the worker inside its first batch while more requests queue
    b = DecodeBatcher(rec, max_batch=5, max_delay_ms=0.0)
    first = b.submit(jpeg_blobs[0])
    while b.pending:  # the worker has taken the first request
        threading.Event().wait(0.001)
    rest = [b.submit(x) for x in jpeg_blobs[1:12]]
    rec.gate.set()
    for f in [first, *rest]:
        f.result(WAIT)
    b.close()
    assert rec.sizes[0] == 1
    assert rec.sizes[1:] == [5, 5, 1]


def test_bad_blob_fails_only_its_own_future(jpeg_blobs: list[bytes]) -> None:
    codec = codecs.get("jpeg", quality=90)
    with DecodeBatcher(codec.decode_batch, max_batch=8, max_delay_ms=50.0) as b:
        futures = [b.submit(jpeg_blobs[0]), b.submit(b"not a jpeg"), b.submit(jpeg_blobs[1])]
        assert futures[0].result(WAIT).shape == (32, 48, 3)
        with pytest.raises(CorruptTile):
            futures[1].result(WAIT)
        assert futures[2].result(WAIT).shape == (32, 48, 3)


def test_whole_batch_exception_is_isolated_and_worker_survives(jpeg_blobs: list[bytes]) -> None:
    rec = Recorder()
    rec.fail_on = b"boom"
    with DecodeBatcher(rec, max_batch=8, max_delay_ms=50.0) as b:
        futures = [b.submit(jpeg_blobs[0]), b.submit(b"boom"), b.submit(jpeg_blobs[1])]
        assert futures[0].result(WAIT).shape == (32, 48, 3)
        with pytest.raises(RuntimeError, match="whole batch failed"):
            futures[1].result(WAIT)
        assert futures[2].result(WAIT).shape == (32, 48, 3)
        # The worker is still alive afterwards.
        assert b.decode(jpeg_blobs[2], timeout=WAIT).shape == (32, 48, 3)


def test_wrong_result_count_fails_futures_not_worker(jpeg_blobs: list[bytes]) -> None:
    calls = []

    def short(blobs: Sequence[bytes]) -> list[object]:
        calls.append(len(blobs))
        return [] if len(calls) == 1 else list(codecs.get("jpeg").decode_batch(blobs))

    with DecodeBatcher(short, max_batch=1, max_delay_ms=0.0) as b:
        with pytest.raises(RuntimeError, match="0 results"):
            b.decode(jpeg_blobs[0], timeout=WAIT)
        assert b.decode(jpeg_blobs[0], timeout=WAIT).shape == (32, 48, 3)


def test_thread_starts_lazily(jpeg_blobs: list[bytes]) -> None:
    b = DecodeBatcher(codecs.get("jpeg").decode_batch, name="lazy-probe")
    assert not any("lazy-probe" in t.name for t in threading.enumerate())
    b.decode(jpeg_blobs[0], timeout=WAIT)
    assert any("lazy-probe" in t.name for t in threading.enumerate())
    b.close()
    assert not any("lazy-probe" in t.name for t in threading.enumerate())


def test_close_drains_pending(jpeg_blobs: list[bytes]) -> None:
    rec = Recorder()
    rec.gate.clear()
    b = DecodeBatcher(rec, max_batch=2, max_delay_ms=0.0)
    futures = [b.submit(x) for x in jpeg_blobs[:6]]
    rec.gate.set()
    b.close(drain=True)
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(jpeg_blobs[0])


def test_close_without_drain_cancels_pending(jpeg_blobs: list[bytes]) -> None:
    rec = Recorder()
    rec.gate.clear()
    b = DecodeBatcher(rec, max_batch=1, max_delay_ms=0.0)
    first = b.submit(jpeg_blobs[0])
    while b.pending:
        threading.Event().wait(0.001)
    rest = [b.submit(x) for x in jpeg_blobs[1:5]]
    closer = threading.Thread(target=b.close, kwargs={"drain": False})
    closer.start()
    while b.pending:  # close() has cancelled the queue before the worker may continue
        threading.Event().wait(0.001)
    rec.gate.set()
    closer.join(WAIT)
    assert first.result(WAIT).shape == (32, 48, 3)
    for f in rest:
        with pytest.raises(CancelledError):
            f.result(WAIT)


def test_observer_sees_each_batch(jpeg_blobs: list[bytes]) -> None:
    obs = Observer()
    rec = Recorder()
    with DecodeBatcher(rec, max_batch=3, max_delay_ms=3_600_000, observer=obs) as b:
        for f in [b.submit(x) for x in jpeg_blobs[:6]]:
            f.result(WAIT)
    assert [c[0] for c in obs.calls] == [3, 3]
    for size, seconds, waits in obs.calls:
        assert seconds >= 0 and len(waits) == size and all(w >= 0 for w in waits)


def test_failing_observer_does_not_break_decoding(jpeg_blobs: list[bytes]) -> None:
    class Broken:
        def on_batch(self, size: int, seconds: float, queue_waits: list[float]) -> None:
            raise ValueError("metrics down")

    with DecodeBatcher(codecs.get("jpeg").decode_batch, max_delay_ms=0.0, observer=Broken()) as b:
        assert b.decode(jpeg_blobs[0], timeout=WAIT).shape == (32, 48, 3)
        assert b.decode(jpeg_blobs[1], timeout=WAIT).shape == (32, 48, 3)


@pytest.mark.parametrize("kwargs", [{"max_batch": 0}, {"max_delay_ms": -1.0}])
def test_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        DecodeBatcher(codecs.get("jpeg").decode_batch, **kwargs)  # type: ignore[arg-type]
