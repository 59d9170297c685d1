"""rANS decoding of CompressAI's entropy-coded streams, compiled with numba, on numpy arrays.

CompressAI's ``RansDecoder`` is fast C++, but its pybind11 interface takes and
returns Python lists: every call converts the symbol indexes, every CDF table and
the decoded symbols, which cost more than the decoding itself at pathology rates
(about 4 of 6 ms per 256² tile at quality 3, ``bench/decode.py``).  This module
decodes the same streams from numpy arrays in compiled code.

The stream format (CompressAI 1.2's ``RansEncoder``, built on F. Giesen's public
``rans64``): a 64-bit state, renormalised in 32-bit little-endian words down to
2**31; symbol probabilities quantized to 16 bits; each symbol is coded under the
CDF its index names, minus that CDF's offset.  The CDF's last symbol is an escape:
a value outside the table follows as 4-bit groups (a run-length count of groups,
15 meaning "and more", then the groups, least significant first) of
``2 * (value - max)`` above the table or ``-2 * value - 1`` below it.

A symbol is found from a per-table index of 256 buckets of cumulative frequency: a bucket
that one symbol's range covers gives that symbol and its range outright, any other the
symbols at its two ends to bisect between.  At pathology rates nearly every symbol is 0 or
±1 under a narrow Gaussian, so most take no search and no further table reads.  Against a
bisection of the whole table this took a quality-3 tile's 98,304 symbols from 1.47 to
0.80 ms (``bench/rans.py``; the bucket ends alone), then to 0.63 ms (ranges in the index),
then to 0.52 ms (the bypass reader inlined: a numba call passing an array counts references).

Every read is bounds-checked: a damaged stream yields ``CorruptTile``, never a read
past its buffer (CompressAI's decoder does not check, hence the zero padding the
neural codec used to add).  Encoding stays CompressAI's (it is offline).

Compiled at model load (:func:`warm_up`, about 1 s with numba's import) and not cached on disk: a
read-only install or a user without a home directory must not break decoding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from numba import njit

from ..errors import CorruptTile

__all__ = ["RansStream", "Tables", "warm_up"]

_PRECISION = 16
_BYPASS_BITS = 4
_BYPASS_MAX = (1 << _BYPASS_BITS) - 1
_OVERRUN = -1
_BAD_INDEX = -2
_BUCKET_BITS = 8  # the symbol search starts from a table of 2**(16 - 8) buckets of cumulative frequency


@njit(cache=False, nogil=True, inline="always")  # a call passing the words array costs reference counts
def _get_bits(state: np.uint64, words: Any, pos: int, nbits: int) -> tuple[int, np.uint64, int]:
    value = int(state & np.uint64((1 << nbits) - 1))
    state = state >> np.uint64(nbits)
    if state < np.uint64(1 << 31):
        if pos >= words.shape[0]:
            return value, state, _OVERRUN
        state = (state << np.uint64(32)) | np.uint64(words[pos])
        pos += 1
    return value, state, pos


@njit(cache=False, nogil=True)
def _decode(
    words: Any,
    pos: int,
    state: np.uint64,
    indexes: Any,
    cdfs: Any,
    buckets: Any,
    lengths: Any,
    offsets: Any,
    out: Any,
) -> tuple[int, np.uint64]:
    """Decode ``len(indexes)`` symbols into ``out``; returns (next word, state), word -1 on overrun
    and -2 for an index outside the tables."""
    mask = np.uint64((1 << _PRECISION) - 1)
    low = np.uint64(1 << 31)
    n_words = words.shape[0]
    n_tables = lengths.shape[0]
    for i in range(indexes.shape[0]):
        t = indexes[i]
        if t < 0 or t >= n_tables:
            return _BAD_INDEX, state
        n = lengths[t]
        max_value = n - 2
        cum = int(state & mask)
        # The symbol is the last CDF entry not above cum (the CDF rises strictly from 0 to 2**16),
        # between the symbols at the two ends of cum's bucket; usually it is the only one there.
        e = buckets[t, cum >> _BUCKET_BITS]
        if e >= 0:  # one symbol spans the bucket: it comes with its range
            lo, start, freq = e & 0xFFFF, (e >> 16) & 0xFFFF, e >> 32
        else:
            lo = -1 - e
            e = buckets[t, (cum >> _BUCKET_BITS) + 1]
            hi = (e & 0xFFFF if e >= 0 else -1 - e) + 1
            while hi - lo > 1:
                mid = (lo + hi) >> 1
                if cdfs[t, mid] <= cum:
                    lo = mid
                else:
                    hi = mid
            start = cdfs[t, lo]
            freq = cdfs[t, lo + 1] - start
        state = np.uint64(freq) * (state >> np.uint64(_PRECISION)) + np.uint64(cum - start)
        if state < low:
            if pos >= n_words:
                return _OVERRUN, state
            state = (state << np.uint64(32)) | np.uint64(words[pos])
            pos += 1
        value = lo
        if value == max_value:
            val, state, pos = _get_bits(state, words, pos, _BYPASS_BITS)
            if pos < 0:
                return _OVERRUN, state
            count = val
            while val == _BYPASS_MAX:
                val, state, pos = _get_bits(state, words, pos, _BYPASS_BITS)
                if pos < 0:
                    return _OVERRUN, state
                count += val
            if count > 8:  # more than 32 bits: no valid stream says so
                return _OVERRUN, state
            raw = 0
            for j in range(count):
                val, state, pos = _get_bits(state, words, pos, _BYPASS_BITS)
                if pos < 0:
                    return _OVERRUN, state
                raw |= val << (j * _BYPASS_BITS)
            value = raw >> 1
            value = -value - 1 if raw & 1 else value + max_value
        out[i] = value + offsets[t]
    return pos, state


class Tables:
    """One entropy model's quantized CDFs as arrays: ``cdfs`` (tables x longest, padded), lengths, offsets."""

    def __init__(self, cdfs: list[list[int]], lengths: list[int], offsets: list[int]) -> None:
        width = max(lengths)
        self.cdfs = np.full((len(cdfs), width), 1 << _PRECISION, dtype=np.int32)
        for i, (row, n) in enumerate(zip(cdfs, lengths, strict=True)):
            self.cdfs[i, :n] = row[:n]
        self.lengths = np.asarray(lengths, dtype=np.int32)
        # Bucket b of table t holds cumulative frequencies b * 2**_BUCKET_BITS onwards; its entry names
        # the symbol s whose range holds the first of them: s + start << 16 + freq << 32 when s's
        # range covers the whole bucket, -1 - s when the bucket ends in another symbol's range.
        # (An extra bucket past the end names the last symbol, n - 2.)
        starts = np.arange(0, (1 << _PRECISION) + 1, 1 << _BUCKET_BITS)
        self.buckets = np.empty((len(cdfs), starts.size), dtype=np.int64)
        for i, n in enumerate(self.lengths):
            cdf = self.cdfs[i, :n].astype(np.int64)
            first = np.minimum(np.searchsorted(cdf, starts, side="right") - 1, n - 2)
            last = np.minimum(np.searchsorted(cdf, starts + (1 << _BUCKET_BITS) - 1, side="right") - 1, n - 2)
            whole = (first == last) & (starts < 1 << _PRECISION)
            start, freq = cdf[first], cdf[first + 1] - cdf[first]  # first <= n - 2
            self.buckets[i] = np.where(whole, first + (start << 16) + (freq << 32), -1 - first)
        self.offsets = np.asarray(offsets, dtype=np.int32)
        if (self.lengths < 2).any():
            raise ValueError("every CDF needs at least two entries")


class RansStream:
    """One rANS string, decoded in consecutive calls (CompressAI's ``set_stream`` + ``decode_stream``)."""

    def __init__(self, data: bytes) -> None:
        pad = (-len(data)) % 4
        self._words: npt.NDArray[np.uint32] = np.frombuffer(bytes(data) + bytes(pad), dtype="<u4")
        if self._words.shape[0] < 2:
            raise CorruptTile("neural: entropy-coded string too short")
        self._state = np.uint64(int(self._words[0]) | (int(self._words[1]) << 32))
        self._pos = 2

    def decode(self, indexes: npt.NDArray[np.int32], tables: Tables) -> npt.NDArray[np.int32]:
        """The next ``indexes.size`` symbols (int32, flat); raises ``CorruptTile`` on a damaged stream."""
        flat = np.ascontiguousarray(indexes, dtype=np.int32).reshape(-1)
        out = np.empty(flat.size, dtype=np.int32)
        pos, state = _decode(
            self._words, self._pos, self._state, flat, tables.cdfs, tables.buckets, tables.lengths, tables.offsets, out
        )
        if pos == _BAD_INDEX:  # checked symbol by symbol in the compiled loop (cheaper than a pass over them)
            raise ValueError("symbol index outside the CDF tables")
        if pos < 0:
            raise CorruptTile("neural: entropy-coded string ends early (truncated or damaged tile)")
        self._pos, self._state = int(pos), np.uint64(state)
        return out


def warm_up() -> None:
    """Compile the decoder now rather than in the first request: through :class:`RansStream`, so
    with the argument types decoding passes (its words are a read-only view of the tile's bytes)."""
    RansStream(bytes(8)).decode(np.zeros(0, dtype=np.int32), Tables([[0, 1 << _PRECISION]], [2], [0]))
