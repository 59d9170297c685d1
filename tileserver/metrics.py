"""Prometheus metrics; names are part of the interface (the Grafana dashboard uses them).

=====================================  =========  ====================================================
name                                   type       labels / meaning
=====================================  =========  ====================================================
tileserver_tile_requests_total         counter    source (glass|cache|decode|openslide), format
tileserver_tile_seconds                histogram  source; time to answer one tile request
tileserver_decode_seconds              histogram  codec, device; one decode batch
tileserver_decode_batch_size           histogram  codec, device; tiles per decode batch
tileserver_decode_queue_seconds        histogram  codec, device; time a tile waited for its batch
tileserver_cache_bytes                 gauge      bytes of encoded tiles cached (summed over workers)
tileserver_cache_hits_total            counter    tile cache hits
tileserver_cache_misses_total          counter    tile cache misses
tileserver_slides_open                 gauge      open slides (summed over workers)
tileserver_model_load_seconds          histogram  codec, device; loading a neural model
tileserver_http_requests_total         counter    endpoint (tile|dzi|index|...), status
tileserver_http_request_seconds        histogram  endpoint
tileserver_build_info                  gauge      version, torch, device; always 1
=====================================  =========  ====================================================

Under gunicorn, ``tileserver serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before any
metric exists (prometheus_client picks its value store when the first metric is
built), so the metrics here are built lazily by ``get()`` on first use, never at
import.  ``render()`` aggregates all workers' files with ``MultiProcessCollector``
in that mode.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = [
    "CONTENT_TYPE_LATEST",
    "LATENCY_BUCKETS",
    "DecodeObserver",
    "Metrics",
    "get",
    "mark_process_dead",
    "multiprocess_dir",
    "render",
]

#: latency buckets, 0.5 ms to 5 s
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class Metrics:
    """The process's metric objects (see the module docstring for names)."""

    tile_requests: Counter
    tile_seconds: Histogram
    decode_seconds: Histogram
    decode_batch_size: Histogram
    decode_queue_seconds: Histogram
    cache_bytes: Gauge
    cache_hits: Counter
    cache_misses: Counter
    slides_open: Gauge
    model_load_seconds: Histogram
    http_requests: Counter
    http_request_seconds: Histogram
    build_info: Gauge


_lock = threading.Lock()
_metrics: Metrics | None = None


def multiprocess_dir() -> str | None:
    """The prometheus_client multiprocess directory, when running in that mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


def _build() -> Metrics:
    if multiprocess_dir():
        from prometheus_client import values

        # prometheus_client chose its value store when it was imported, maybe before
        # ``tileserver serve`` set the directory (the CLI imports it early): choose again.
        if values.ValueClass is values.MutexValue:
            values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    lat = LATENCY_BUCKETS
    return Metrics(
        tile_requests=Counter(
            "tileserver_tile_requests_total", "Tile requests by where the answer came from", ["source", "format"]
        ),
        tile_seconds=Histogram("tileserver_tile_seconds", "Tile request latency", ["source"], buckets=lat),
        decode_seconds=Histogram(
            "tileserver_decode_seconds", "Latency of one decode batch", ["codec", "device"], buckets=lat
        ),
        decode_batch_size=Histogram(
            "tileserver_decode_batch_size", "Tiles per decode batch", ["codec", "device"], buckets=BATCH_BUCKETS
        ),
        decode_queue_seconds=Histogram(
            "tileserver_decode_queue_seconds", "Time a tile waited for its batch", ["codec", "device"], buckets=lat
        ),
        cache_bytes=Gauge("tileserver_cache_bytes", "Bytes of encoded tiles cached", multiprocess_mode="livesum"),
        cache_hits=Counter("tileserver_cache_hits_total", "Tile cache hits"),
        cache_misses=Counter("tileserver_cache_misses_total", "Tile cache misses"),
        slides_open=Gauge("tileserver_slides_open", "Open slides", multiprocess_mode="livesum"),
        model_load_seconds=Histogram(
            "tileserver_model_load_seconds",
            "Time to load a neural model",
            ["codec", "device"],
            buckets=(*lat, 10.0, 30.0, 60.0),
        ),
        http_requests=Counter("tileserver_http_requests_total", "HTTP requests", ["endpoint", "status"]),
        http_request_seconds=Histogram(
            "tileserver_http_request_seconds", "HTTP request latency", ["endpoint"], buckets=lat
        ),
        build_info=Gauge(
            "tileserver_build_info",
            "Build information (always 1)",
            ["version", "torch", "device"],
            multiprocess_mode="max",
        ),
    )


def get() -> Metrics:
    """The process's metrics, built on first call (after the multiprocess directory is set)."""
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = _build()
    return _metrics


def render() -> bytes:
    """Prometheus text exposition of this process, or of all workers in multiprocess mode."""
    get()
    if multiprocess_dir():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def mark_process_dead(pid: int) -> None:
    """Forget a dead worker's live gauges (gunicorn ``child_exit`` hook)."""
    if multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class DecodeObserver:
    """A ``DecodeBatcher`` observer recording batch latency, size and queue waits."""

    def __init__(self, codec: str, device: str) -> None:
        self.codec = codec
        self.device = device

    def on_batch(self, size: int, seconds: float, queue_waits: Sequence[float]) -> None:
        """Called by the batcher after each batch."""
        m = get()
        m.decode_seconds.labels(self.codec, self.device).observe(seconds)
        m.decode_batch_size.labels(self.codec, self.device).observe(size)
        queue = m.decode_queue_seconds.labels(self.codec, self.device)
        for wait in queue_waits:
            queue.observe(wait)
