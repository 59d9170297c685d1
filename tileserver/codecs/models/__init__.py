"""Neural codec architectures, registered by stable names.

A weights file names its architecture (``"factorized-ps"``) and the keyword
arguments that rebuild it; :func:`build` turns that pair back into a module.
Importing this package imports torch, so only ``tileserver.codecs.neural`` and
``tileserver.train`` import it, lazily.
"""

from __future__ import annotations

import warnings
from typing import Any

with warnings.catch_warnings():
    # CompressAI calls torch.jit.script at import time, which newer torch deprecates.
    warnings.simplefilter("ignore", FutureWarning)
    from .factorized import FactorizedPS

__all__ = ["ARCHITECTURES", "FactorizedPS", "build"]

#: stable architecture name -> model class; names are stored in weights files
ARCHITECTURES: dict[str, type[FactorizedPS]] = {"factorized-ps": FactorizedPS}


def build(architecture: str, **kwargs: Any) -> FactorizedPS:
    """Instantiate the architecture registered as ``architecture``."""
    try:
        cls = ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None
    return cls(**kwargs)
