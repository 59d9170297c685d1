"""Our rANS decoder reads CompressAI's streams exactly, and fails cleanly on damaged ones."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

pytest.importorskip("compressai")

from compressai.ans import BufferedRansEncoder, RansEncoder
from compressai.entropy_models import GaussianConditional

from tileserver.codecs.rans import RansStream, Tables
from tileserver.errors import CorruptTile


@pytest.fixture(scope="module")
def tables() -> tuple[list[list[int]], list[int], list[int]]:
    """CDF tables of Gaussians 0.11 .. 137 wide, as the neural codec's coder has them."""
    gc = GaussianConditional([0.11 * np.exp(i / 8) for i in range(58)])
    gc.update()
    lengths = gc._cdf_length.tolist()
    cdfs = [row[:n] for row, n in zip(gc._quantized_cdf.tolist(), lengths, strict=True)]
    return cdfs, lengths, gc._offset.tolist()


def _symbols(rng: np.random.Generator, n: int, n_tables: int) -> tuple[np.ndarray, np.ndarray]:
    idx = rng.integers(0, n_tables, n).astype(np.int32)
    sym = np.round(rng.normal(0, 1, n) * 0.11 * np.exp(idx / 8) * 1.5).astype(np.int32)
    # Values beyond every table's range take the escape (bypass) path, both signs, long ones too.
    sym[:40] = rng.integers(-(2**20), 2**20, 40)
    sym[40:60] = 2000
    sym[60:80] = -3000
    return idx, sym


def test_decodes_compressai_streams_exactly(tables: tuple[list[list[int]], list[int], list[int]]) -> None:
    cdfs, lengths, offsets = tables
    rng = np.random.default_rng(0)
    idx, sym = _symbols(rng, 20000, len(cdfs))
    data = RansEncoder().encode_with_indexes(sym.tolist(), idx.tolist(), cdfs, lengths, offsets)
    assert np.array_equal(RansStream(data).decode(idx, Tables(cdfs, lengths, offsets)), sym)


def test_every_symbol_of_every_table(tables: tuple[list[list[int]], list[int], list[int]]) -> None:
    """Each table's every in-range value, its escapes on both sides, in a shuffled order: the symbol
    search (bucketed by cumulative frequency) must find rare tail symbols as well as common ones."""
    cdfs, lengths, offsets = tables
    idx = np.concatenate([np.full(n, t, np.int32) for t, n in enumerate(lengths)])
    # offset - 1 and offset + n - 2 are the two escapes, the values between are in the table
    sym = np.concatenate([np.arange(o - 1, o + n - 1, dtype=np.int32) for o, n in zip(offsets, lengths, strict=True)])
    order = np.random.default_rng(2).permutation(idx.size)
    idx, sym = idx[order], sym[order]
    data = RansEncoder().encode_with_indexes(sym.tolist(), idx.tolist(), cdfs, lengths, offsets)
    assert np.array_equal(RansStream(data).decode(idx, Tables(cdfs, lengths, offsets)), sym)


def test_one_stream_in_several_calls(tables: tuple[list[list[int]], list[int], list[int]]) -> None:
    cdfs, lengths, offsets = tables
    rng = np.random.default_rng(1)
    idx, sym = _symbols(rng, 9000, len(cdfs))
    cuts = [0, 1, 500, 4000, 9000]
    enc = BufferedRansEncoder()
    for a, b in itertools.pairwise(cuts):
        enc.encode_with_indexes(sym[a:b].tolist(), idx[a:b].tolist(), cdfs, lengths, offsets)
    stream, t = RansStream(enc.flush()), Tables(cdfs, lengths, offsets)
    got = [stream.decode(idx[a:b], t) for a, b in itertools.pairwise(cuts)]
    assert np.array_equal(np.concatenate(got), sym)


def test_damaged_streams_fail_cleanly(tables: tuple[list[list[int]], list[int], list[int]]) -> None:
    cdfs, lengths, offsets = tables
    rng = np.random.default_rng(2)
    idx, sym = _symbols(rng, 5000, len(cdfs))
    data = RansEncoder().encode_with_indexes(sym.tolist(), idx.tolist(), cdfs, lengths, offsets)
    t = Tables(cdfs, lengths, offsets)
    with pytest.raises(CorruptTile, match="ends early"):
        RansStream(data[: len(data) // 2]).decode(idx, t)
    with pytest.raises(CorruptTile, match="too short"):
        RansStream(data[:4])
    for seed in range(20):  # random bytes: a clean error or some symbols, never a crash
        junk = np.random.default_rng(seed).bytes(64)
        try:
            RansStream(junk).decode(idx, t)
        except CorruptTile:
            pass
    with pytest.raises(ValueError, match="outside the CDF tables"):
        RansStream(data).decode(np.array([len(cdfs)], dtype=np.int32), t)
    stream = RansStream(data)
    with pytest.raises(ValueError, match="outside the CDF tables"):  # found mid-call: nothing consumed
        stream.decode(np.concatenate([idx[:10], [-1]]).astype(np.int32), t)
    assert np.array_equal(stream.decode(idx, t), sym)


_FIRST_DECODE_IN_CHILD = """
import numpy as np
from compressai.ans import RansEncoder
from tileserver.codecs.rans import RansStream, Tables, _decode, warm_up
warm_up()
compiled = len(_decode.signatures)
cdfs, lengths, offsets = [[0, 30000, 65536]], [3], [0]
data = RansEncoder().encode_with_indexes([0, 0, 0], [0, 0, 0], cdfs, lengths, offsets)
RansStream(data).decode(np.zeros(3, dtype=np.int32), Tables(cdfs, lengths, offsets))
print(compiled, len(_decode.signatures))
"""


def test_warm_up_compiles_what_decoding_uses() -> None:
    # A fresh process: the warm-up at model load must leave nothing to compile in the first request.
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _FIRST_DECODE_IN_CHILD], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.split() == ["1", "1"]
