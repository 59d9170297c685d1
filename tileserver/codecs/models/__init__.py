"""Neural codec architectures, registered by stable names.

A weights file names its architecture (``"klt-ps8"``, ``"factorized-ps"``) and the keyword
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
    from .context import KLTContext
    from .factorized import FactorizedPS
    from .klt import KLTPS, KLTHyper

__all__ = ["ARCHITECTURES", "KLTPS", "FactorizedPS", "KLTContext", "KLTHyper", "Model", "build", "load_state"]

#: any registered architecture
Model = FactorizedPS | KLTPS | KLTHyper | KLTContext

#: stable architecture name -> model class; names are stored in weights files
ARCHITECTURES: dict[str, type[Model]] = {
    "factorized-ps": FactorizedPS,
    "klt-ps8": KLTPS,
    "klt-hp8": KLTHyper,
    "klt-cx8": KLTContext,
}

_ENTROPY_BUFFERS = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")


def build(architecture: str, **kwargs: Any) -> Model:
    """Instantiate the architecture registered as ``architecture``."""
    try:
        cls = ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None
    return cls(**kwargs)


def load_state(model: Model, state: dict[str, Any], *, missing_ok: tuple[str, ...] = ()) -> list[str]:
    """``load_state_dict``, first resizing the entropy models' CDF buffers (they start empty).

    Parameters whose names start with one of ``missing_ok`` may be absent from ``state``
    (a context model initialised from the hyperprior it extends keeps its fresh context
    network); any other missing or unexpected key raises.  Returns the missing keys.
    """
    for key, value in state.items():
        path, _, name = key.rpartition(".")
        if name in _ENTROPY_BUFFERS:
            setattr(model.get_submodule(path), name, value.clone())
    result = model.load_state_dict(state, strict=not missing_ok)
    bad = [k for k in result.missing_keys if not k.startswith(missing_ok)] + list(result.unexpected_keys)
    if bad:
        raise RuntimeError(f"state does not fit {type(model).__name__}: {', '.join(bad[:8])}")
    return list(result.missing_keys)
