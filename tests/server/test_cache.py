"""Caches: the tile LRU is bounded in bytes; open slides are bounded in count and closed only when unused."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tileserver.cache import OpenSlideCache, TileCache, file_identity
from tileserver.errors import SlideNotFound


def test_tile_cache_is_bounded_in_bytes() -> None:
    cache = TileCache(1000)
    for i in range(10):
        cache.put(("id", i), bytes(300))
    assert cache.currsize <= 1000
    assert len(cache) == 3
    assert cache.get(("id", 9)) == bytes(300)  # most recent survive
    assert cache.get(("id", 0)) is None
    cache.put(("big",), bytes(2000))  # larger than the cache: not stored, nothing evicted
    assert cache.get(("big",)) is None and len(cache) == 3
    cache.clear()
    assert cache.currsize == 0


def test_tile_cache_is_thread_safe() -> None:
    cache = TileCache(50_000)

    def work(n: int) -> None:
        for i in range(300):
            cache.put((n, i), bytes(100 + i % 7))
            cache.get((n, i - 1))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.currsize <= 50_000


class _Res:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.closed = False


def _slide_cache(max_open: int, opened: list[_Res]) -> OpenSlideCache[_Res]:
    def opener(p: Path) -> _Res:
        r = _Res(p)
        opened.append(r)
        return r

    def closer(r: _Res) -> None:
        r.closed = True

    return OpenSlideCache(max_open, opener, closer)


def test_slide_cache_evicts_but_never_closes_a_slide_in_use(tmp_path: Path) -> None:
    for name in "abc":
        (tmp_path / name).write_bytes(b"x")
    opened: list[_Res] = []
    cache = _slide_cache(2, opened)
    with cache.acquire(tmp_path / "a") as (a, _, _):
        with cache.acquire(tmp_path / "b"), cache.acquire(tmp_path / "c"):
            assert len(cache) == 2  # "a" was evicted...
            assert not a.closed  # ...but is still in use
        assert not a.closed
    assert a.closed  # closed once released
    with cache.acquire(tmp_path / "c") as (c, _, _):
        assert c is opened[2]  # still cached: not re-opened
    assert len(opened) == 3


def test_slide_cache_reopens_a_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.write_bytes(b"one")
    opened: list[_Res] = []
    cache = _slide_cache(4, opened)
    with cache.acquire(path) as (first, identity1, _):
        pass
    path.write_bytes(b"second version")
    with cache.acquire(path) as (second, identity2, _):
        assert second is not first and identity2 != identity1
    assert first.closed and not second.closed
    path.unlink()
    with pytest.raises(SlideNotFound), cache.acquire(path):
        pass
    assert second.closed and len(cache) == 0


def test_dicom_folder_identity_changes_with_its_files(tmp_path: Path) -> None:
    (tmp_path / "1.dcm").write_bytes(b"a")
    before = file_identity(tmp_path)
    (tmp_path / "2.dcm").write_bytes(b"bb")
    assert file_identity(tmp_path) != before
    with pytest.raises(SlideNotFound):
        file_identity(tmp_path / "missing")
