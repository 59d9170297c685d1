"""The learned glass detector: a tiny CNN over the tile's optical density, backed by the classic one.

* Input: the tile padded to 256×256 (edge rows/columns repeated, as the classic detector
  does), averaged over 4×4 blocks to 64×64, turned into optical density relative to the
  slide's glass colour (``ln((bg+1)/(x+1))``, clipped to [-0.5, 3]).  Working in OD makes
  the network indifferent to the scanner's white level and tint.
* Network (``TinyTissueNet``): four 3×3 conv layers (16-16-32-32 channels, stride 2 from the
  second), batch norm, ReLU, then global mean *and* max pooling (max so that a sliver in a
  corner is not averaged away) and one linear layer: 17 k parameters, 75 KB as float32.
* Weights ship in ``tileserver/tissue_weights/tissue_cnn.npz`` with ``tissue_cnn.json``
  (architecture, threshold, SHA-256 of the npz, training summary); ``python -m
  tileserver.tissue_train`` reproduces them.  A missing or altered weight file raises
  ``MissingModel``.
* Safety: a tile is glass only when the CNN **and** the classic detector both say glass, so
  the CNN can only keep more.  Its decision threshold (in the manifest) is the 1st
  percentile of P(tissue) over the tissue-labelled training tiles.  Fluorescence slides go
  to the classic detector alone: the shared data holds one fluorescence slide, too little
  to train on.

Torch is imported when this module is (only ``get_detector("cnn")`` imports it); inference
runs on the CPU with the caller's thread settings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torch import nn

from ..errors import MissingModel
from .background import Background
from .classic import ClassicGlassDetector, _check_tile, _pad_to, _quarter

__all__ = ["WEIGHTS_DIR", "CnnGlassDetector", "TinyTissueNet", "load_model", "preprocess"]

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "tissue_weights"
WEIGHTS_NAME = "tissue_cnn.npz"
MANIFEST_NAME = "tissue_cnn.json"
#: inference batch (bounds memory: 64 x 3 x 64 x 64 floats)
_BATCH = 256


class TinyTissueNet(nn.Module):  # type: ignore[misc]
    """64×64×3 OD tile → one logit (tissue)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.features = nn.Sequential(block(3, w, 1), block(w, w, 2), block(w, 2 * w, 2), block(2 * w, 2 * w, 2))
        self.head = nn.Linear(4 * w, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        out: torch.Tensor = self.head(pooled)[:, 0]
        return out


def preprocess(tiles: list[npt.NDArray[np.uint8]], background: Background) -> npt.NDArray[np.float32]:
    """(N, 3, 64, 64) float32 network input: padded, 4×4-averaged, optical density vs the glass colour."""
    out = np.empty((len(tiles), 3, 64, 64), dtype=np.float32)
    bg = np.asarray(background.color, dtype=np.float32)[:, None, None, None]
    for i, t in enumerate(tiles):
        x = _check_tile(t)[..., :3]
        if max(x.shape[:2]) > 256:  # larger tiles: area-average down to fit 256 first
            h, w = x.shape[:2]
            scale = 256 / max(h, w)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            x = np.asarray(Image.fromarray(np.ascontiguousarray(x)).resize(size, Image.Resampling.BOX))
        x = _pad_to(x[None], 256)
        b4 = _quarter(x)  # planar (3, 1, 64, 64)
        out[i] = np.clip(np.log((bg + 1.0) / (b4 + 1.0)), -0.5, 3.0)[:, 0]
    return out


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model(model: TinyTissueNet, meta: dict[str, Any], directory: Path = WEIGHTS_DIR) -> dict[str, Any]:
    """Write the weights (npz of float32 arrays, no pickle) and the manifest with their SHA-256."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    npz = directory / WEIGHTS_NAME
    # fixed member order and no timestamps in the archive content, so retraining is bit-identical
    with open(npz, "wb") as f:
        np.savez(f, **dict(sorted(state.items())))
    manifest = {**meta, "weights": WEIGHTS_NAME, "sha256": sha256_of(npz)}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def load_model(directory: Path = WEIGHTS_DIR) -> tuple[TinyTissueNet, dict[str, Any]]:
    """The shipped network in eval mode and its manifest; ``MissingModel`` when absent or altered."""
    manifest_path = directory / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise MissingModel(f"tissue CNN manifest {manifest_path} unreadable: {exc}") from exc
    npz = directory / str(manifest.get("weights", WEIGHTS_NAME))
    if not npz.is_file():
        raise MissingModel(f"tissue CNN weights {npz} not installed (run python -m tileserver.tissue_train)")
    digest = sha256_of(npz)
    if digest != manifest.get("sha256"):
        raise MissingModel(f"tissue CNN weights {npz}: SHA-256 {digest} does not match the manifest")
    model = TinyTissueNet(int(manifest.get("width", 16)))
    with np.load(npz) as arrays:
        state = {k: torch.from_numpy(arrays[k].copy()) for k in arrays.files}
    # batch norm's counter is stored as float32 in the npz
    if "features.0.1.num_batches_tracked" in state:
        for k in list(state):
            if k.endswith("num_batches_tracked"):
                state[k] = state[k].to(torch.long)
    model.load_state_dict(state)
    model.eval()
    return model, manifest


@dataclass
class CnnGlassDetector:
    """Glass only where the CNN and the classic detector agree (see the module docstring)."""

    name: str = "cnn"
    classic: ClassicGlassDetector = field(default_factory=ClassicGlassDetector)
    model: TinyTissueNet | None = None
    threshold: float = 0.2
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model is None:
            self.model, self.manifest = load_model()
            self.threshold = float(self.manifest.get("threshold", self.threshold))

    def tissue_probability(self, tiles: list[npt.NDArray[np.uint8]], background: Background) -> list[float]:
        """The CNN's P(tissue) per tile (brightfield)."""
        if self.model is None:  # only if a caller cleared it
            raise MissingModel("tissue CNN has no model loaded")
        probs: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(tiles), _BATCH):
                x = torch.from_numpy(preprocess(tiles[start : start + _BATCH], background))
                probs.extend(torch.sigmoid(self.model(x)).tolist())
        return probs

    def glass_flags(self, tiles: list[npt.NDArray[np.uint8]], background: Background) -> list[bool]:
        """True only where both the classic detector and the CNN see glass."""
        classic = self.classic.glass_flags(tiles, background)
        if background.kind != "brightfield" or not any(classic):
            return classic
        idx = [i for i, g in enumerate(classic) if g]  # the CNN can only veto drops
        probs = self.tissue_probability([tiles[i] for i in idx], background)
        flags = list(classic)
        for i, p in zip(idx, probs, strict=True):
            flags[i] = p < self.threshold
        return flags
