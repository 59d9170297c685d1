"""Entropy decoding alone: our rANS decoder against CompressAI's, on the same streams.

    .venv/bin/python bench/rans.py          # prints JSON + a table, writes bench/results/rans.json

Codes 16 tissue tiles with the default neural quality, records the CDF index of every
latent symbol in each coding pass (by decoding once), then times decoding just the
latent strings: ``tileserver.codecs.rans`` (numpy arrays in, numpy array out) against
CompressAI's ``RansDecoder.set_stream`` + ``decode_stream`` (Python lists in and out,
the conversions included, as the codec would have to do them).  Both must return the
same symbols.  Median over tiles of the best of 5, one thread.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiles import load_tiles

OUT = Path(__file__).resolve().parent / "results" / "rans.json"


def main() -> int:
    import torch
    from compressai.ans import RansDecoder

    from tileserver.codecs.neural import NeuralCodec, parse_header
    from tileserver.codecs.rans import RansStream

    torch.set_num_threads(1)
    codec = NeuralCodec(3)
    model = codec._load()
    coder, tables = model.coder, model.coder.tables
    tiles = [t.pixels for t in load_tiles(per_slide=6, per_patch=1)][:16]
    ours, theirs, symbols = [], [], 0
    for blob in codec.encode_batch(tiles):
        *_, lh, lw, payload = parse_header(blob, model.stride)
        z_hat, latent = coder._side(payload, lh, lw)
        if hasattr(coder, "_code"):  # context model: decode once, keeping each pass's CDF indexes
            passes: list[Any] = []
            stream = RansStream(latent)

            def record(n: int, indexes: Any, mu: Any, passes: list[Any] = passes, stream: Any = stream) -> Any:
                passes.append(indexes.reshape(-1).astype(np.int32))
                return tables.read(stream, indexes)

            coder._code(z_hat, lh, lw, record)
        else:  # hyperprior: one pass
            passes = [coder._params(z_hat, lh, lw)[0].reshape(-1)]
        symbols += sum(p.size for p in passes)

        def run_ours(latent: bytes = latent, passes: list[Any] = passes) -> list[Any]:
            stream = RansStream(latent)
            return [stream.decode(p, tables.arrays) for p in passes]

        def run_theirs(latent: bytes = latent, passes: list[Any] = passes) -> list[Any]:
            dec = RansDecoder()
            dec.set_stream(latent + bytes(4 * sum(p.size for p in passes) + 64))
            out = []
            for p in passes:
                used = np.unique(p)
                local = np.searchsorted(used, p)
                values = dec.decode_stream(
                    local.tolist(),
                    [tables.cdfs[i] for i in used],
                    [tables.lengths[i] for i in used],
                    [tables.offsets[i] for i in used],
                )
                out.append(np.array(values, dtype=np.int32))
            return out

        a, b = run_ours(), run_theirs()
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)), "decoders disagree"
        for fn, acc in ((run_ours, ours), (run_theirs, theirs)):
            best = min(_timed(fn) for _ in range(5))
            acc.append(best * 1000)
    result = {
        "tiles": len(tiles),
        "quality": 3,
        "architecture": codec.model_info["architecture"],
        "passes_per_tile": len(coder.passes) if hasattr(coder, "passes") else 1,
        "symbols_per_tile": symbols // len(tiles),
        "ours_ms": float(np.median(ours)),
        "compressai_ms": float(np.median(theirs)),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"\nlatent strings of {result['tiles']} tiles, {result['symbols_per_tile']} symbols each")
    print(f"{'decoder':<34}{'ms/tile':>8}")
    print(f"{'tileserver.codecs.rans (numba)':<34}{result['ours_ms']:>8.2f}")
    print(f"{'CompressAI RansDecoder (lists)':<34}{result['compressai_ms']:>8.2f}")
    return 0


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
