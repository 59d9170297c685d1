"""Neural tiles through the ``DecodeBatcher``, as the server decodes them: isolation and determinism.

``tests/codecs/test_neural.py`` checks ``decode_batch`` called directly (batch
sizes, a corrupt neighbour, thread counts).  Here the same guarantees are checked
one level up, where requests really meet: concurrent threads submit to one
``DecodeBatcher`` over the shipped model, so a tile's batch size, its
neighbours and their order are whatever the scheduling makes them.

* a garbage bitstream fails its own future only; the tiles batched with it are
  bit-identical to decoding them alone, and the batcher keeps working;
* a tile decodes to the same pixels for every ``max_batch`` from 1 to the
  server's default, with garbage and repeated neighbours, with 1 or 2 torch
  threads, and with the synthesis run tile by tile or as one pass per batch.
"""

from __future__ import annotations

import random
import threading
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
import openslide
import pytest

from tests.conftest import CMU, NDPI
from tileserver.batching import DecodeBatcher
from tileserver.config import Settings
from tileserver.errors import CorruptTile

from .conftest import record

Pixels = npt.NDArray[np.uint8]

torch = pytest.importorskip("torch")
neural = pytest.importorskip("tileserver.codecs.neural")

pytestmark = [pytest.mark.shared_data]

if not neural.available_qualities():
    pytest.skip("no neural weights installed in tileserver/codecs/weights", allow_module_level=True)

QUALITY = neural.available_qualities()[-1]
#: the server's default batch size: determinism is checked up to it
MAX_BATCH = Settings().batch_max_size


def _tiles() -> list[Pixels]:
    """Real tissue tiles of several shapes (full, edge, tiny) from two slides."""
    out = []
    with openslide.OpenSlide(str(CMU)) as s:
        for x, y, w, h in ((1024, 1024, 256, 256), (1280, 1536, 256, 256), (900, 2000, 256, 100), (1100, 700, 37, 200)):
            out.append(np.asarray(s.read_region((x, y), 0, (w, h)).convert("RGB")))
    with openslide.OpenSlide(str(NDPI)) as s:
        w, h = s.dimensions
        out.append(np.asarray(s.read_region((w // 2, h // 2), 0, (256, 256)).convert("RGB")))
    return [np.ascontiguousarray(t) for t in out]


@pytest.fixture(scope="module")
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def coded(threads: None) -> tuple[list[bytes], list[Pixels]]:
    """(bitstreams, pixels each decodes to alone, with one torch thread)."""
    codec = neural.NeuralCodec(QUALITY, device="cpu")
    blobs = codec.encode_batch(_tiles())
    torch.set_num_threads(1)
    singles = [codec.decode(b) for b in blobs]
    return blobs, singles


def _garbage(good: bytes) -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10
    payload = rng.integers(0, 256, 400, dtype=np.uint8).tobytes()
    return {
        "random": rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "empty": b"",
        "truncated": good[: len(good) // 3],
        "flipped": bytes(flipped),
        # a valid header and CRC around random payload: reaches the entropy decoder
        "crafted": good[:14] + zlib.crc32(payload).to_bytes(4, "little") + payload,
    }


class Recording:
    """``decode_batch`` wrapper that remembers which blobs went into each call."""

    def __init__(self, decode_batch: Any) -> None:
        self._decode_batch = decode_batch
        self.calls: list[list[bytes]] = []
        self._lock = threading.Lock()

    def __call__(self, blobs: Sequence[bytes]) -> list[Any]:
        with self._lock:
            self.calls.append(list(blobs))
        return list(self._decode_batch(blobs))


def _submit_all(batcher: DecodeBatcher, blobs: list[bytes], clients: int) -> list[Future[Pixels]]:
    """Submit ``blobs`` from ``clients`` threads released together; futures in ``blobs`` order."""
    gate = threading.Barrier(clients)
    futures: list[Future[Pixels] | None] = [None] * len(blobs)

    def client(k: int) -> None:
        gate.wait()
        for i in range(k, len(blobs), clients):
            futures[i] = batcher.submit(blobs[i])

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    assert all(f is not None for f in futures)
    return [f for f in futures if f is not None]


def test_garbage_fails_only_its_own_future(coded: tuple[list[bytes], list[Pixels]]) -> None:
    blobs, singles = coded
    codec = neural.NeuralCodec(QUALITY, device="cpu")
    garbage = _garbage(blobs[0])
    recording = Recording(codec.decode_batch)
    # one batch holds everything: max_batch = the number of requests, and a long delay
    mixed = [*blobs, *garbage.values()]
    order = list(range(len(mixed)))
    random.Random(3).shuffle(order)
    with DecodeBatcher(recording, max_batch=len(mixed), max_delay_ms=2000) as batcher:
        futures = _submit_all(batcher, [mixed[i] for i in order], clients=len(mixed))
        results: dict[int, Any] = {}
        for i, fut in zip(order, futures, strict=True):
            try:
                results[i] = fut.result(timeout=300)
            except CorruptTile as exc:
                results[i] = exc
        # the batcher still works afterwards
        again = batcher.decode(blobs[1], timeout=300)
    assert len(recording.calls[0]) == len(mixed), "all the requests went into one batch"
    for i, single in enumerate(singles):
        assert isinstance(results[i], np.ndarray), f"good tile {i} failed: {results[i]!r}"
        assert np.array_equal(results[i], single)
    for k, name in enumerate(garbage, start=len(blobs)):
        if name == "crafted":  # may decode to (garbage) pixels; it must not take others down
            assert isinstance(results[k], CorruptTile | np.ndarray)
        else:
            assert isinstance(results[k], CorruptTile), f"{name}: {results[k]!r}"
    assert np.array_equal(again, singles[1])


def test_batch_call_raising_fails_only_the_culprit(coded: tuple[list[bytes], list[Pixels]]) -> None:
    # A decode_batch that raises for the whole batch (a codec bug, CUDA OOM...): the batcher
    # retries one by one, so only the tile that really fails gets the error.
    blobs, singles = coded
    codec = neural.NeuralCodec(QUALITY, device="cpu")
    poison = b"poison"

    def fragile(batch: Sequence[bytes]) -> list[Any]:
        if poison in batch:
            raise RuntimeError("whole batch failed")
        return list(codec.decode_batch(batch))

    with DecodeBatcher(fragile, max_batch=len(blobs) + 1, max_delay_ms=2000) as batcher:
        futures = _submit_all(batcher, [*blobs, poison], clients=len(blobs) + 1)
        for fut, single in zip(futures, singles, strict=False):
            assert np.array_equal(fut.result(timeout=300), single)
        with pytest.raises(RuntimeError):
            futures[-1].result(timeout=300)


def _configs() -> list[Any]:
    out = []
    for n_threads in (1, 2):
        for max_batch in sorted({1, 3, MAX_BATCH}):
            for synthesis in (None, 64):
                marks = [pytest.mark.slow] if (max_batch, synthesis) != (MAX_BATCH, 64) else []
                out.append(
                    pytest.param(
                        n_threads, max_batch, synthesis, marks=marks, id=f"t{n_threads}-b{max_batch}-s{synthesis}"
                    )
                )
    return out


_DETERMINISM: dict[str, int] = {"configs": 0, "decodes": 0}


@pytest.mark.parametrize(("n_threads", "max_batch", "synthesis_batch"), _configs())
def test_same_pixels_whatever_the_batch(
    coded: tuple[list[bytes], list[Pixels]],
    threads: None,
    n_threads: int,
    max_batch: int,
    synthesis_batch: int | None,
) -> None:
    blobs, singles = coded
    torch.set_num_threads(n_threads)
    codec = neural.NeuralCodec(QUALITY, device="cpu", synthesis_batch=synthesis_batch)
    # every tile twice, plus garbage, in a shuffled order, from 8 concurrent clients
    work = [(i, b) for i, b in enumerate(blobs)] * 2 + [(-1, g) for g in _garbage(blobs[0]).values() if g]
    random.Random(max_batch * 10 + n_threads).shuffle(work)
    recording = Recording(codec.decode_batch)
    with DecodeBatcher(recording, max_batch=max_batch, max_delay_ms=20) as batcher:
        futures = _submit_all(batcher, [b for _, b in work], clients=8)
        for (i, _), fut in zip(work, futures, strict=True):
            if i < 0:
                continue
            out = fut.result(timeout=300)
            assert np.array_equal(out, singles[i]), f"tile {i} differs (threads {n_threads}, batch {max_batch})"
    sizes = [len(c) for c in recording.calls]
    assert max(sizes) <= max_batch
    _DETERMINISM["configs"] += 1
    _DETERMINISM["decodes"] += len(work)
    record(
        "neural_determinism",
        {**_DETERMINISM, "quality": QUALITY, "tiles": len(blobs), "max_batch_checked": MAX_BATCH, "device": "cpu"},
    )


@pytest.mark.gpu
def test_same_pixels_on_cuda_through_the_batcher(coded: tuple[list[bytes], list[Pixels]]) -> None:
    # encoded on CPU, decoded on CUDA in batches with neighbours: identical to the CPU singles
    blobs, singles = coded
    codec = neural.NeuralCodec(QUALITY, device="cuda")
    with DecodeBatcher(codec.decode_batch, max_batch=MAX_BATCH, max_delay_ms=20) as batcher:
        futures = _submit_all(batcher, blobs * 3, clients=8)
        for k, fut in enumerate(futures):
            assert np.array_equal(fut.result(timeout=300), singles[k % len(blobs)])
