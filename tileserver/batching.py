"""Dynamic batching of tile decodes (Triton's dynamic-batcher semantics).

Callers :meth:`DecodeBatcher.submit` one tile's bytes and get a
``concurrent.futures.Future``.  One worker thread owns the model and calls
``decode_batch`` with up to ``max_batch`` queued blobs, dispatching as soon as
``max_batch`` requests are waiting or the oldest has waited ``max_delay_ms``.
A bad bitstream fails only its own future.

The worker thread starts on the first submit, never at construction, so a
batcher built before gunicorn forks still gets its own thread (and, for CUDA,
its own context) in each worker process.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["BatchObserver", "DecodeBatcher", "DecodeFn"]

Pixels = npt.NDArray[np.uint8]
#: ``decode_batch`` as every ``TileCodec`` has it: one result or exception per blob
DecodeFn = Callable[[Sequence[bytes]], Sequence["Pixels | BaseException"]]


class BatchObserver(Protocol):
    """Receives one call per dispatched batch (for metrics)."""

    def on_batch(self, size: int, seconds: float, queue_waits: list[float]) -> None:
        """``size`` tiles decoded in ``seconds``; ``queue_waits`` per tile, in seconds."""
        ...


@dataclass
class _Request:
    blob: bytes
    future: Future[Pixels]
    t_submit: float = field(default_factory=time.perf_counter)


class DecodeBatcher:
    """Gather concurrent decode requests into batched ``decode_batch`` calls.

    ``decode_batch`` is typically ``codec.decode_batch``; ``name`` and
    ``device`` label the worker thread and are available to observers' owners
    (for ``tileserver_decode_seconds{codec, device}``).  ``observer`` (optional)
    gets ``on_batch(size, seconds, queue_waits)`` after each batch.
    """

    def __init__(
        self,
        decode_batch: DecodeFn,
        *,
        max_batch: int = 8,
        max_delay_ms: float = 2.0,
        name: str = "neural",
        device: str = "cpu",
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {max_delay_ms}")
        self._decode_batch = decode_batch
        self.max_batch = int(max_batch)
        self.max_delay = float(max_delay_ms) / 1000.0
        self.name = name
        self.device = device
        self.observer = observer
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closed = False

    def __repr__(self) -> str:
        return f"DecodeBatcher(name={self.name!r}, device={self.device!r}, max_batch={self.max_batch})"

    def __enter__(self) -> DecodeBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- client side ---------------------------------------------------------------------
    def submit(self, blob: bytes) -> Future[Pixels]:
        """Queue one tile's bytes; the future resolves to its pixels or raises its error."""
        fut: Future[Pixels] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            self._ensure_worker()
            self._queue.append(_Request(bytes(blob), fut))
            self._cond.notify()
        return fut

    def decode(self, blob: bytes, timeout: float | None = None) -> Pixels:
        """Blocking convenience: submit and wait for the result."""
        return self.submit(blob).result(timeout)

    def close(self, drain: bool = True) -> None:
        """Stop the worker; with ``drain`` pending requests finish first, otherwise they are cancelled."""
        with self._cond:
            self._closed = True
            if not drain:
                while self._queue:
                    self._queue.popleft().future.cancel()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    @property
    def pending(self) -> int:
        """Requests queued and not yet dispatched."""
        with self._cond:
            return len(self._queue)

    # -- worker side ---------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        # Called with the lock held.  After a fork the parent's thread does not exist here.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._thread = None
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=f"decode-{self.name}-{self.device}", daemon=True)
            self._thread.start()

    def _next_batch(self) -> list[_Request] | None:
        with self._cond:
            while True:
                if self._queue:
                    if len(self._queue) >= self.max_batch or self._closed:
                        break
                    wait = self._queue[0].t_submit + self.max_delay - time.perf_counter()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                elif self._closed:
                    return None
                else:
                    self._cond.wait()
            n = min(self.max_batch, len(self._queue))
            return [self._queue.popleft() for _ in range(n)]

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            if live:
                self._dispatch(live)

    def _dispatch(self, batch: list[_Request]) -> None:
        t0 = time.perf_counter()
        waits = [t0 - r.t_submit for r in batch]
        try:
            results = self._call([r.blob for r in batch])
            seconds = time.perf_counter() - t0
            for req, res in zip(batch, results, strict=True):
                if isinstance(res, BaseException):
                    req.future.set_exception(res)
                else:
                    req.future.set_result(res)
        except BaseException as exc:
            # Never leave a caller waiting on a future nobody will complete.
            for req in batch:
                if not req.future.done():
                    req.future.set_exception(exc)
            raise
        if self.observer is not None:
            try:
                self.observer.on_batch(len(batch), seconds, waits)
            except Exception:  # metrics must never take the decoder down
                pass

    def _call(self, blobs: list[bytes]) -> list[Any]:
        try:
            results = list(self._decode_batch(blobs))
        except Exception as exc:
            if len(blobs) == 1:
                return [exc]
            # The batch call itself failed: retry one by one so only the culprit fails.
            return [self._call([b])[0] for b in blobs]
        if len(results) != len(blobs):
            err = RuntimeError(f"decode_batch returned {len(results)} results for {len(blobs)} blobs")
            return [err] * len(blobs)
        return results
