"""Running the app under gunicorn (threaded workers), programmatically.

* The app is built inside each worker (no preload): CUDA and models are
  initialised after fork, never before.
* Prometheus multiprocess mode: ``prepare_metrics_dir`` creates and wipes
  ``PROMETHEUS_MULTIPROC_DIR`` before any worker exists; ``child_exit`` marks a
  dead worker's files so its live gauges disappear.
* Graceful shutdown: ``worker_exit`` closes the worker's ``TileService``, which
  drains in-flight decodes.
* Slow clients: gunicorn 27's gthread worker hands every new connection to a
  thread, which waits up to 5 s for its first bytes, then reads the rest of the
  request with a blocking socket and no time limit.  So silent connections cost
  5 s of a thread each, and a client that sends part of its headers and stalls
  holds a thread for ever: a handful of either starve a worker.
  ``post_worker_init`` changes two things: a new connection with nothing to
  read yet waits in the worker's poller (no thread; closed after ``keepalive``
  seconds, as gunicorn does for connections it defers), and a connection's
  reads in a thread must finish within ``timeout`` seconds per request, or the
  connection is dropped like a reset one.  And closing a connection (which
  gunicorn does in the worker's main thread, waiting up to 2 s for the client
  to close its side) no longer waits for a client that never does.
"""

from __future__ import annotations

import atexit
import errno
import functools
import os
import selectors
import shutil
import socket
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from .. import metrics
from ..config import Settings

__all__ = ["TileServerApplication", "bind_address", "prepare_metrics_dir"]


def bind_address(host: str, port: int) -> str:
    """gunicorn's ``bind`` for ``host`` and ``port`` (IPv6 literals in brackets)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def prepare_metrics_dir() -> Path:
    """Create (or wipe) the prometheus multiprocess directory and export it.

    Uses ``PROMETHEUS_MULTIPROC_DIR`` when set (its ``*.db`` files are removed:
    counts from a previous run must not leak in), else a fresh temporary
    directory removed when the master exits.
    """
    configured = metrics.multiprocess_dir()
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
    else:
        path = Path(tempfile.mkdtemp(prefix="tileserver-metrics-"))
        master = os.getpid()

        def _cleanup() -> None:
            if os.getpid() == master:  # workers run atexit handlers too
                shutil.rmtree(path, ignore_errors=True)

        atexit.register(_cleanup)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


def _child_exit(server: Any, worker: Any) -> None:
    metrics.mark_process_dead(worker.pid)


#: read deadline of each client socket in a worker thread (monotonic seconds)
_deadlines: weakref.WeakKeyDictionary[socket.socket, float] = weakref.WeakKeyDictionary()


class _ClientSocket(socket.socket):
    """A client connection whose reads for one request must end within ``read_timeout`` seconds.

    gthread switches a connection between non-blocking (in its poller) and
    blocking (in a worker thread, once per request); here "blocking" starts the
    request's read deadline.  Running out of time becomes ``ECONNRESET``, which
    gunicorn treats as a client gone (logged at debug level, no traceback).
    """

    __slots__ = ()  # the layout of socket.socket, so an accepted socket's class can be switched
    read_timeout: float = 60.0

    def setblocking(self, flag: bool) -> None:
        if flag:
            _deadlines[self] = time.monotonic() + self.read_timeout
            self.settimeout(self.read_timeout)
        else:
            super().setblocking(False)

    def shutdown(self, how: int) -> None:
        # gunicorn's graceful close (in the worker's main thread) half-closes, then reads until the
        # client closes too, for up to 2 s: a client that never closes would stall the whole worker
        # (its poller, its heartbeat).  After a shutdown, reads only drain what already arrived.
        super().shutdown(how)
        _deadlines[self] = -1.0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        deadline = _deadlines.get(self)
        if deadline == -1.0:  # closing: drain without waiting (a timeout would make Python wait first)
            super().settimeout(0.0)
            try:
                return super().recv(bufsize, flags)
            except BlockingIOError:
                return b""
        if deadline is not None and self.gettimeout() != 0.0:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectionResetError(errno.ECONNRESET, "client too slow sending its request")
            self.settimeout(left)
        try:
            return super().recv(bufsize, flags)
        except TimeoutError as exc:
            raise ConnectionResetError(errno.ECONNRESET, "client too slow sending its request") from exc

    def sendall(self, data: Any, flags: int = 0) -> None:
        if self.gettimeout() != 0.0:  # blocking in a thread: a fresh allowance for the answer
            self.settimeout(self.read_timeout)
        try:
            super().sendall(data, flags)
        except TimeoutError as exc:
            raise ConnectionResetError(errno.ECONNRESET, "client not reading its answer") from exc


def _readable(sock: socket.socket) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        return bool(sel.select(0))


def _bound_client_io(worker: Any, timeout: float) -> None:
    """Make a gthread ``worker`` resist silent and slow clients (see the module docstring).

    Relies on gunicorn 27's gthread internals (``enqueue_req``, ``pending_conns``,
    ``on_pending_socket_readable``); with any other worker it changes nothing.
    """
    enqueue = getattr(worker, "enqueue_req", None)
    pending = getattr(worker, "pending_conns", None)
    on_readable = getattr(worker, "on_pending_socket_readable", None)
    if enqueue is None or pending is None or on_readable is None:
        return
    _ClientSocket.read_timeout = float(timeout)

    def enqueue_req(conn: Any) -> None:
        # Runs in the worker's main thread (accept and poller callbacks).
        sock = conn.sock
        if type(sock) is socket.socket:
            sock.__class__ = _ClientSocket  # same layout: only the methods change
        if not conn.initialized and not conn.data_ready and not _readable(sock):
            # nothing sent yet: wait in the poller, not in a thread (as gunicorn does after 5 s)
            conn.timeout = time.monotonic() + worker.cfg.keepalive
            pending.append(conn)
            worker.poller.register(sock, selectors.EVENT_READ, functools.partial(on_readable, conn))
            return
        enqueue(conn)

    worker.enqueue_req = enqueue_req


def _worker_exit(server: Any, worker: Any) -> None:
    app = getattr(worker, "wsgi", None)
    service = getattr(app, "extensions", {}).get("tileserver") if app is not None else None
    if service is not None:
        service.close()


class TileServerApplication(BaseApplication):  # type: ignore[misc]
    """gunicorn application serving ``create_app(settings)`` with gthread workers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        options: dict[str, Any] = {
            "bind": bind_address(s.host, s.port),
            "workers": s.resolved_workers(),
            "threads": s.threads,
            "worker_class": "gthread",
            "timeout": s.timeout,
            "graceful_timeout": s.timeout,
            "loglevel": s.log_level,
            "accesslog": None,  # the app logs requests itself, with tile source and timing
            "preload_app": False,
            "child_exit": _child_exit,
            "worker_exit": _worker_exit,
            "post_worker_init": lambda worker: _bound_client_io(worker, s.timeout),
            "proc_name": "tileserver",
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from . import create_app

        return create_app(self.settings)
