"""Caches: encoded browser tiles (bounded in bytes) and open slides (bounded in count).

Both are thread-safe and never hold their lock during I/O or decoding: work is
done outside the lock and the result re-checked on insert.

A slide's *identity* is ``(path, size, mtime_ns)`` of its file (for a DICOM
folder: of the folder's files together), so a file replaced in place gets a new
identity: its cached tiles are never served, and the open slide is re-opened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import cachetools

from . import metrics
from .errors import SlideNotFound

__all__ = ["FileIdentity", "OpenSlideCache", "TileCache", "file_identity"]

_log = logging.getLogger(__name__)

#: (path, size in bytes, mtime in ns) of a slide's file(s)
FileIdentity = tuple[str, int, int]

S = TypeVar("S")


def file_identity(path: Path) -> FileIdentity:
    """Identity of the slide at ``path``; ``SlideNotFound`` if it is gone."""
    try:
        st = path.stat()
        if path.is_dir():
            # a DICOM folder: any instance file replaced or added changes the identity
            size, mtime = 0, st.st_mtime_ns
            for entry in os.scandir(path):
                if entry.is_file():
                    est = entry.stat()
                    size += est.st_size
                    mtime = max(mtime, est.st_mtime_ns)
            return (str(path), size, mtime)
        return (str(path), st.st_size, st.st_mtime_ns)
    except FileNotFoundError as exc:
        raise SlideNotFound(f"{path}: no such slide") from exc


class TileCache:
    """Byte-bounded LRU of encoded tiles; keys are hashable tuples that start with a ``FileIdentity``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lru: cachetools.LRUCache[Hashable, bytes] = cachetools.LRUCache(maxsize=max(1, max_bytes), getsizeof=len)
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> bytes | None:
        """The cached bytes, or None; counts a hit or a miss."""
        with self._lock:
            data = self._lru.get(key)
        m = metrics.get()
        if data is None:
            m.cache_misses.inc()
        else:
            m.cache_hits.inc()
        return data

    def put(self, key: Hashable, data: bytes) -> None:
        """Store ``data`` (silently skipped when larger than the whole cache)."""
        if self.max_bytes <= 0 or len(data) > self.max_bytes:
            return
        with self._lock:
            before = self._lru.currsize
            self._lru[key] = data
            delta = self._lru.currsize - before
        metrics.get().cache_bytes.inc(delta)

    @property
    def currsize(self) -> int:
        """Bytes currently cached."""
        with self._lock:
            return int(self._lru.currsize)

    def clear(self) -> None:
        """Drop everything."""
        with self._lock:
            size = self._lru.currsize
            self._lru.clear()
        metrics.get().cache_bytes.dec(size)

    def __len__(self) -> int:
        with self._lock:
            return len(self._lru)


@dataclass(eq=False)
class _Entry(Generic[S]):
    identity: FileIdentity
    value: S
    users: int = 0
    retired: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class OpenSlideCache(Generic[S]):
    """Open slides by path, at most ``max_open``; re-opened when the file's identity changes.

    ``acquire(path)`` is a context manager yielding ``(slide, identity, extra)``;
    ``extra`` is a per-open-slide dict for derived objects (Deep Zoom geometry).
    An evicted or replaced slide is closed only once no request still uses it.
    """

    def __init__(
        self,
        max_open: int,
        opener: Callable[[Path], S],
        closer: Callable[[S], None],
        identify: Callable[[Path], FileIdentity] = file_identity,
    ) -> None:
        self.max_open = max(1, max_open)
        self._opener = opener
        self._closer = closer
        self._identify = identify
        self._entries: OrderedDict[str, _Entry[S]] = OrderedDict()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def acquire(self, path: Path) -> Iterator[tuple[S, FileIdentity, dict[str, Any]]]:
        """Use the open slide at ``path`` for the duration of the ``with`` block."""
        entry = self._checkout(path)
        try:
            yield entry.value, entry.identity, entry.extra
        finally:
            self._release(entry)

    def _checkout(self, path: Path) -> _Entry[S]:
        key = str(path)
        try:
            identity = self._identify(path)  # stat outside the lock
        except SlideNotFound:
            self.forget(path)  # the file is gone: do not keep it open
            raise
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.identity == identity:
                self._entries.move_to_end(key)
                entry.users += 1
                return entry
        value = self._opener(path)  # open outside the lock: slow I/O
        fresh: _Entry[S] = _Entry(identity, value, users=1)
        to_close: list[_Entry[S]] = []
        with self._lock:
            current = self._entries.get(key)
            if current is not None and current.identity == identity:
                # another thread opened it meanwhile: use theirs, close ours
                current.users += 1
                self._entries.move_to_end(key)
                fresh.users = 0
                fresh.retired = True
                to_close.append(fresh)
                result = current
            else:
                if current is not None:
                    to_close.extend(self._retire(current))
                self._entries[key] = fresh
                while len(self._entries) > self.max_open:
                    _, old = self._entries.popitem(last=False)
                    to_close.extend(self._retire(old))
                result = fresh
                metrics.get().slides_open.inc()
        for e in to_close:
            self._close(e, counted=e is not fresh)
        return result

    def _retire(self, entry: _Entry[S]) -> list[_Entry[S]]:
        """Mark ``entry`` retired (caller holds the lock); returned if it can be closed now."""
        entry.retired = True
        return [entry] if entry.users == 0 else []

    def _release(self, entry: _Entry[S]) -> None:
        with self._lock:
            entry.users -= 1
            close_now = entry.retired and entry.users == 0
        if close_now:
            self._close(entry, counted=True)

    def _close(self, entry: _Entry[S], *, counted: bool) -> None:
        if counted:
            metrics.get().slides_open.dec()
        try:
            self._closer(entry.value)
        except Exception:  # a failing close must not fail the request that triggered it
            _log.exception("closing slide %s failed", entry.identity[0])

    def forget(self, path: Path) -> None:
        """Drop the slide at ``path`` (closed once no request uses it)."""
        with self._lock:
            entry = self._entries.pop(str(path), None)
            to_close = self._retire(entry) if entry is not None else []
        for e in to_close:
            self._close(e, counted=True)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        """Close every slide not in use now; the rest close when released."""
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
            to_close = [e for entry in entries for e in self._retire(entry)]
        for e in to_close:
            self._close(e, counted=True)
