"""Train, resume and export the neural tile codec's models.

Usage::

    python -m tileserver.train tileserver/codecs/configs/klt-hp-s140.toml            # train (resumes from ckpt)
    python -m tileserver.train tileserver/codecs/configs/klt-hp-s140.toml --until 11:20   # stop at 11:20 UTC
    python -m tileserver.train tileserver/codecs/configs/klt-hp-s140-256.toml --export   # write package weights

A config (TOML) names the architecture and its arguments, the rate–distortion
trade-off ``lambda`` and its ``distortion`` (``"mse"``: loss = lambda * 255^2 * MSE
+ bits per pixel; ``"ssim"``: loss = lambda * (1 - SSIM) + lambda_mse * 255^2 *
MSE + bits per pixel, SSIM as the benchmark measures it), crop size,
batch, steps, learning rate schedule, the training sources (globs under the
shared data directory; ``.svs`` and other slides are read at level 0 through
OpenSlide) and the held-out evaluation files, which are never trained on.
``init`` optionally names another config whose checkpoint seeds this one
(qualities are fine-tuned from a base model), or an installed model of the package
(``"<file>.pt"``: a fine-tune of what ships, needing no checkpoint).  The run directory
``runs/<name>/`` holds ``train.log`` and the resumable ``ckpt.pt``.

Export calls ``EntropyBottleneck.update(force=True, update_quantiles=True)`` so
the CDF tables are computed once and stored with the weights; the server only
loads them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import math
import os
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["TrainConfig", "add_cli", "evaluate", "export", "load_config", "main", "train"]

#: distortion measures a config may train for
DISTORTIONS = ("mse", "ssim")
#: learning-rate schedules a config may use
SCHEDULES = ("step", "cosine")
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
WEIGHTS_DIR = Path(__file__).resolve().parent / "codecs" / "weights"


@dataclass(frozen=True)
class TrainConfig:
    """One model's training recipe (see the module docstring)."""

    name: str
    quality: int
    architecture: str
    arch: dict[str, Any]
    lmbda: float
    crop: int
    batch: int
    steps: int
    lr: float
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    #: ``"step"`` (``lr_milestones``) or ``"cosine"``: a half cosine to zero over the run, its
    #: progress the larger of steps done / ``steps`` and time spent / the time ``--until`` allows
    schedule: str = "step"
    #: steps over which the learning rates rise linearly from zero (a fresh optimizer's first
    #: steps move every weight by about the full rate, whatever its gradient)
    warmup: int = 0
    hyper_lr: float | None = None
    aux_lr: float = 1e-3
    sources: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    exclude_rows: dict[str, int] = field(default_factory=dict)
    init: str | None = None
    distortion: str = "mse"
    lambda_mse: float = 0.0
    freeze: list[str] = field(default_factory=list)
    #: scanner-like JPEG on a share of the crops: ``{"p": share, "quality": [lo, hi]}`` (4:2:0)
    jpeg_augment: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    eval_every: int = 1000
    ckpt_every: int = 250
    log_every: int = 100
    path: Path = Path()

    @property
    def run_dir(self) -> Path:
        return REPO / "runs" / self.name


def _jpeg_augment(aug: Any, path: Path) -> dict[str, Any]:
    """A config's ``jpeg_augment`` table, checked: empty, or ``{p = 0..1, quality = [lo, hi]}``
    with integer qualities ``1 <= lo <= hi <= 100``; raises ``ConfigError`` otherwise."""
    from .errors import ConfigError

    if isinstance(aug, dict) and not aug:
        return {}
    ok = isinstance(aug, dict) and set(aug) == {"p", "quality"}
    if ok:
        p, q = aug["p"], aug["quality"]
        ok = isinstance(p, int | float) and not isinstance(p, bool) and 0.0 <= p <= 1.0
        ok = ok and isinstance(q, list | tuple) and len(q) == 2
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in q) and 1 <= q[0] <= q[1] <= 100
    if not ok:
        raise ConfigError(f"{path}: jpeg_augment must be {{p = 0..1, quality = [lo, hi] within 1..100}}, got {aug}")
    return dict(aug)


def load_config(path: str | Path) -> TrainConfig:
    """Read a TOML training config; raises ``ConfigError`` on unknown or missing keys."""
    from .errors import ConfigError

    p = Path(path)
    with p.open("rb") as f:
        raw = tomllib.load(f)
    train = raw.get("train", {})
    data = raw.get("data", {})
    model = raw.get("model", {})
    aug = _jpeg_augment(train.get("jpeg_augment", {}), p)
    try:
        cfg = TrainConfig(
            name=str(raw["name"]),
            quality=int(raw["quality"]),
            architecture=str(model["architecture"]),
            arch=dict(model.get("args", {})),
            lmbda=float(train["lambda"]),
            crop=int(train["crop"]),
            batch=int(train["batch"]),
            steps=int(train["steps"]),
            lr=float(train["lr"]),
            lr_milestones=[int(m) for m in train.get("lr_milestones", [])],
            lr_gamma=float(train.get("lr_gamma", 0.1)),
            schedule=str(train.get("schedule", "step")),
            warmup=int(train.get("warmup", 0)),
            hyper_lr=float(train["hyper_lr"]) if "hyper_lr" in train else None,
            aux_lr=float(train.get("aux_lr", 1e-3)),
            sources=list(data["sources"]),
            eval_files=list(data["eval"]),
            exclude_rows={str(k): int(v) for k, v in data.get("exclude_rows", {}).items()},
            init=raw.get("init"),
            distortion=str(train.get("distortion", "mse")),
            lambda_mse=float(train.get("lambda_mse", 0.0)),
            freeze=[str(f) for f in train.get("freeze", [])],
            jpeg_augment=aug,
            seed=int(train.get("seed", 0)),
            eval_every=int(train.get("eval_every", 1000)),
            ckpt_every=int(train.get("ckpt_every", 250)),
            log_every=int(train.get("log_every", 100)),
            path=p,
        )
    except KeyError as exc:
        raise ConfigError(f"{p}: missing key {exc}") from None
    if cfg.distortion not in DISTORTIONS:
        raise ConfigError(f"{p}: distortion must be one of {', '.join(DISTORTIONS)}, got {cfg.distortion!r}")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"{p}: schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    return cfg


# -- data ----------------------------------------------------------------------------------


def _read_rgb(path: Path) -> npt.NDArray[np.uint8]:
    if path.suffix.lower() in (".svs", ".ndpi", ".tif", ".tiff", ".mrxs", ".scn") and path.stat().st_size > 1 << 20:
        import openslide

        with openslide.OpenSlide(str(path)) as slide:
            w, h = slide.dimensions
            return np.asarray(slide.read_region((0, 0), 0, (w, h)).convert("RGB"))
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _expand(data_dir: Path, patterns: list[str]) -> list[Path]:
    out: list[Path] = []
    for pat in patterns:
        out.extend(Path(p) for p in sorted(glob.glob(str(data_dir / pat))))
    return out


def load_images(cfg: TrainConfig, data_dir: Path) -> tuple[list[npt.NDArray[np.uint8]], list[Path]]:
    """Training images (evaluation files removed, ``exclude_rows`` cut off the bottom)."""
    held_out = {p.resolve() for p in _expand(data_dir, cfg.eval_files)}
    images, paths = [], []
    for p in _expand(data_dir, cfg.sources):
        if p.resolve() in held_out:
            continue
        img = _read_rgb(p)
        for pat, rows in cfg.exclude_rows.items():
            if p.match(pat):
                img = img[: img.shape[0] - rows]
        if min(img.shape[:2]) >= cfg.crop:
            images.append(img)
            paths.append(p)
    if not images:
        raise SystemExit(f"no training images found for {cfg.sources} under {data_dir}")
    return images, paths


def eval_tiles(cfg: TrainConfig, data_dir: Path, size: int = 256, limit: int = 24) -> list[npt.NDArray[np.uint8]]:
    """Non-overlapping tiles (at most ``size``) from the held-out files, tissue only."""
    tiles: list[npt.NDArray[np.uint8]] = []
    for pat, rows in [(p, 0) for p in cfg.eval_files] + [(k, v) for k, v in cfg.exclude_rows.items()]:
        for p in _expand(data_dir, [pat]):
            img = _read_rgb(p)
            if rows:
                img = img[img.shape[0] - rows :]
            h, w = img.shape[:2]
            for y in range(0, max(h - size, 0) + 1, size):
                for x in range(0, max(w - size, 0) + 1, size):
                    t = img[y : y + size, x : x + size]
                    if t.mean() < 225:  # skip glass
                        tiles.append(np.ascontiguousarray(t))
    # Deterministic, spread across files.
    step = max(1, len(tiles) // limit)
    return tiles[::step][:limit]


class CropSampler:
    """Random crops with flips and 90° rotations, images weighted by area; mostly tissue.

    ``jpeg``: ``{"p": share, "quality": [lo, hi]}`` codes that share of the crops with JPEG 4:2:0
    at a uniform quality in ``lo..hi``, as scanners code slides: most slides a hospital holds
    carry JPEG's block and chroma artefacts, and the grid of a crop's 8x8 blocks (its origin)
    is the grid of a tile's latent, as in a slide's tiles."""

    def __init__(
        self, images: list[npt.NDArray[np.uint8]], crop: int, seed: int, jpeg: dict[str, Any] | None = None
    ) -> None:
        self.images = images
        self.crop = crop
        self.jpeg = jpeg or {}
        self.rng = np.random.default_rng(seed)
        self.jpeg_rng = np.random.default_rng([seed, 1])  # its own draws: the crops stay the same
        area = np.array([img.shape[0] * img.shape[1] for img in images], dtype=float)
        self.p = np.sqrt(area) / np.sqrt(area).sum()

    def one(self) -> npt.NDArray[np.uint8]:
        for _ in range(8):
            img = self.images[self.rng.choice(len(self.images), p=self.p)]
            y = self.rng.integers(0, img.shape[0] - self.crop + 1)
            x = self.rng.integers(0, img.shape[1] - self.crop + 1)
            c = img[y : y + self.crop, x : x + self.crop]
            if c.mean() < 230 or self.rng.random() < 0.1:  # keep some glass, mostly tissue
                break
        c = np.rot90(c, self.rng.integers(4))
        if self.rng.random() < 0.5:
            c = c[:, ::-1]
        if self.jpeg and self.jpeg_rng.random() < float(self.jpeg["p"]):
            import imagecodecs

            lo, hi = (int(q) for q in self.jpeg["quality"])
            level = int(self.jpeg_rng.integers(lo, hi + 1))
            data = imagecodecs.jpeg_encode(np.ascontiguousarray(c), level=level, subsampling=(2, 2))
            c = imagecodecs.jpeg_decode(data)
        return c

    def batch(self, n: int) -> npt.NDArray[np.uint8]:
        return np.stack([self.one() for _ in range(n)])


# -- training ------------------------------------------------------------------------------


def _log(cfg: TrainConfig, msg: str) -> None:
    line = f"{dt.datetime.now(dt.UTC).strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with (cfg.run_dir / "train.log").open("a") as f:
        f.write(line + "\n")


def evaluate(model: Any, tiles: list[npt.NDArray[np.uint8]]) -> dict[str, float]:
    """Mean bpp (from likelihoods, hard rounding), PSNR and SSIM over ``tiles``."""
    import torch
    from pytorch_msssim import ssim

    bpps, psnrs, ssims = [], [], []
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        for t in tiles:
            x = torch.from_numpy(np.array(t)).permute(2, 0, 1)[None].to(device).float() / 255.0
            h, w = x.shape[2:]
            ph, pw = (-h) % 16, (-w) % 16
            xp = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
            out = model(xp)
            bits = -torch.log2(out["likelihoods"]).sum().item()
            x_hat = torch.round(out["x_hat"][:, :, :h, :w].clamp(0, 1) * 255.0)
            ref = x * 255.0
            mse = torch.mean((x_hat - ref) ** 2).item()
            bpps.append(bits / (h * w))
            psnrs.append(10 * math.log10(255.0**2 / max(mse, 1e-10)))
            ssims.append(float(ssim(x_hat, ref, data_range=255, size_average=True)))
    model.train(was_training)
    return {"bpp": float(np.mean(bpps)), "psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}


def rd_loss(cfg: TrainConfig, x: Any, out: dict[str, Any], rate_weight: float = 1.0) -> tuple[Any, dict[str, float]]:
    """Rate–distortion loss of one training batch and its parts (bpp, mse, ssim) for the log; the rate
    term weighted by ``rate_weight`` (``scripts/train_encoder.py --hold-rate`` moves it)."""
    from .codecs.models.objective import bits_per_pixel, rd_objective

    bpp = bits_per_pixel(out["likelihoods"], x)
    if out["x_hat"] is None:  # synthesis frozen: only the rate can change
        return bpp, {"bpp": bpp.item()}
    loss, mse, s = rd_objective(
        x, out["x_hat"], bpp, lmbda=cfg.lmbda, distortion=cfg.distortion, lambda_mse=cfg.lambda_mse
    )
    if rate_weight != 1.0:
        loss = loss + (rate_weight - 1.0) * bpp
    parts = {"bpp": bpp.item(), "mse": mse.item()}
    if s is not None:
        parts["ssim"] = s.item()
    return loss, parts


def _init_pca(cfg: TrainConfig, model: Any, images: list[npt.NDArray[np.uint8]], device: str) -> None:
    """Start a ``klt-ps8`` model at the KLT of training blocks, its entropy model fitted to those latents."""
    import torch

    from .codecs.models.klt import KLTPS, KLTHyper, fit_klt, image_blocks

    if not isinstance(model, KLTPS):
        raise SystemExit(f"{cfg.path}: init = 'pca' needs a klt architecture")
    crops = CropSampler(images, 64, cfg.seed + 1).batch(2000)
    mean, basis, var = fit_klt(image_blocks(crops))
    model.init_klt(mean, basis)
    kept = var[: model.M].sum() / var.sum()
    with torch.no_grad():
        y = model.g_a(torch.from_numpy(crops[:512]).to(device).permute(0, 3, 1, 2).float() / 255.0)
    if isinstance(model, KLTHyper):
        model.init_prior(y)
        _log(cfg, f"initialised {cfg.name} from the KLT of 8x8 blocks ({kept:.4f} of the variance kept)")
        return
    # Fit the factorized density to the initial latents so the first steps do not pay for a flat prior.
    eb = model.entropy_bottleneck
    opt = torch.optim.Adam([p for n, p in eb.named_parameters() if not n.endswith("quantiles")], lr=1e-2)
    aux_opt = torch.optim.Adam([p for n, p in eb.named_parameters() if n.endswith("quantiles")], lr=1e-2)
    for _ in range(400):
        idx = torch.randint(0, y.shape[0], (32,))
        _, lik = eb(y[idx])
        nll = -torch.log2(lik).sum() / (idx.numel() * 64 * 64)
        opt.zero_grad(set_to_none=True)
        nll.backward()
        opt.step()
        aux = eb.loss()
        aux_opt.zero_grad(set_to_none=True)
        aux.backward()
        aux_opt.step()
    _log(cfg, f"initialised {cfg.name} from the 8x8 KLT ({kept:.4f} of the variance kept), prior {nll.item():.3f} bpp")


def _calibrate_int8(cfg: TrainConfig, model: Any, images: list[npt.NDArray[np.uint8]], device: str) -> None:
    """Fix an int8 model's activation ranges: the largest values its float layers produce on
    32 training crops of 256² (seeded), latents rounded as coding rounds them."""
    import torch

    crops = CropSampler(images, 256, cfg.seed + 2).batch(32)
    model.calibrate_int8_(torch.from_numpy(crops).to(device).permute(0, 3, 1, 2).float() / 255.0)
    ranges = "; ".join(", ".join(f"{v:.4f}" for v in buf.tolist()) for buf, _ in model._int8_ranges())
    _log(cfg, f"calibrated the int8 layers on {len(crops)} crops: activation ranges {ranges}")


def _lr_at(cfg: TrainConfig, step: int, progress: float = 0.0) -> float:
    """The transforms' learning rate at ``step``; ``progress`` (0..1) is the share of the run's
    time budget spent, which a ``cosine`` schedule follows when it is ahead of the steps."""
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    if cfg.schedule == "cosine":
        done = min(1.0, max(step / cfg.steps, progress))
        return warm * cfg.lr * 0.5 * (1.0 + math.cos(math.pi * done))
    return warm * cfg.lr * cfg.lr_gamma ** sum(step >= m for m in cfg.lr_milestones)


def _history(config: str, steps: int, minutes: float, prior: dict[str, Any]) -> dict[str, Any]:
    """What a run starts from: its config and the steps and minutes of the whole chain before it."""
    return {
        "config": config,
        "steps": steps + int(prior.get("steps", 0)),
        "train_minutes": round(minutes + float(prior.get("train_minutes", 0.0)), 1),
    }


def _init_from_weights(cfg: TrainConfig, model: Any, device: str) -> dict[str, Any]:
    """Start ``model`` at a shipped model: ``init = "<file>.pt"`` names a weights file of the
    package (current or retired); returns its history (config, steps, minutes) from the manifest.

    The analysis is stored in float16 and the synthesis snapped to its grid, so the start differs
    from that model's last checkpoint by those roundings; a fine-tune does not notice them."""
    import torch

    from .codecs.models import load_state
    from .codecs.neural import WEIGHTS_DIR as PACKAGE_WEIGHTS
    from .codecs.neural import _installed, weights_state
    from .errors import ConfigError

    path = PACKAGE_WEIGHTS / str(cfg.init)
    entry = next((e for _, e in _installed(PACKAGE_WEIGHTS) if e["file"] == cfg.init), None)
    if entry is None or not path.is_file():
        raise ConfigError(f"{cfg.path}: init {cfg.init!r} is not an installed model of the package")
    load_state(
        model, weights_state(torch.load(path, map_location=device, weights_only=False)), missing_ok=("ctx_", "int8_")
    )
    prior = dict(entry.get("init", {}))
    history = _history(Path(entry["config"]).name, int(entry["steps"]), float(entry["train_minutes"]), prior)
    return {**history, "weights": entry["sha256"][:12]}


def train(cfg: TrainConfig, *, data_dir: Path, until: dt.datetime | None, threads: int, device: str) -> int:
    """Train (or resume) ``cfg`` until ``cfg.steps`` or ``until``; returns the step reached."""
    import torch

    from .codecs.models import KLTPS, build, load_state

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed crop shapes: let cuDNN pick its kernels once
    model = build(cfg.architecture, **cfg.arch).to(device)
    for name, param in model.named_parameters():
        if name.startswith(tuple(cfg.freeze)):
            param.requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters() if not n.endswith(".quantiles") and p.requires_grad]
    params = [p for _, p in named]
    aux_params = [p for n, p in model.named_parameters() if n.endswith(".quantiles")]
    # The hyperprior starts from scratch while the transforms start near their optimum: it may learn faster.
    hyper_lr = cfg.hyper_lr or cfg.lr
    entropy_model = ("h_a.", "h_s", "hyper_", "ctx_")
    hyper = [p for n, p in named if n.startswith(entropy_model)]
    rest = [p for n, p in named if not n.startswith(entropy_model)]
    groups = [
        {"params": hyper, "lr": hyper_lr, "base": hyper_lr},
        {"params": rest, "lr": cfg.lr, "base": cfg.lr},
    ]
    opt = torch.optim.Adam([g for g in groups if g["params"]], lr=cfg.lr)
    aux_opt = torch.optim.Adam(aux_params, lr=cfg.aux_lr)
    ckpt_path = cfg.run_dir / "ckpt.pt"
    step, wall = 0, 0.0
    before: dict[str, Any] = {}  # steps and minutes of the checkpoint this run started from
    images, _ = load_images(cfg, data_dir)
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        load_state(model, ck["model"])
        if "opt" in ck:
            opt.load_state_dict(ck["opt"])
            aux_opt.load_state_dict(ck["aux_opt"])
        else:  # a checkpoint slimmed for transfer (scripts/device_finetune.sh): fresh optimizers
            _log(cfg, "checkpoint has no optimizer state: the optimizers start afresh")
        step, wall = int(ck["step"]), float(ck.get("wall", 0.0))
        before = dict(ck.get("init", {}))
        _log(cfg, f"resumed {cfg.name} at step {step} ({wall / 60:.1f} min so far)")
    elif cfg.init == "pca":
        _init_pca(cfg, model, images, device)
    elif cfg.init and cfg.init.endswith(".pt"):
        before = _init_from_weights(cfg, model, device)
        _log(cfg, f"initialised {cfg.name} from the package's {cfg.init} ({before['steps']} steps before)")
    elif cfg.init:
        base = load_config(Path(cfg.init) if Path(cfg.init).is_absolute() else cfg.path.parent / cfg.init)
        ck = torch.load(base.run_dir / "ckpt.pt", map_location=device, weights_only=False)
        # A context model starts from the hyperprior it extends, its context network fresh.
        fresh = load_state(model, ck["model"], missing_ok=("ctx_", "int8_"))
        before = _history(base.path.name, int(ck["step"]), float(ck.get("wall", 0.0)) / 60, dict(ck.get("init", {})))
        _log(cfg, f"initialised {cfg.name} from {base.name} step {ck['step']} ({len(fresh)} new tensors)")
    if isinstance(model, KLTPS) and model._int8_ranges() and not model._int8_ready():
        _calibrate_int8(cfg, model, images, device)
    tiles = eval_tiles(cfg, data_dir)
    _log(
        cfg,
        f"{cfg.name}: {cfg.distortion} lambda={cfg.lmbda} crop={cfg.crop} batch={cfg.batch} "
        f"{len(images)} images, {len(tiles)} eval tiles",
    )
    sampler = CropSampler(images, cfg.crop, cfg.seed + step, cfg.jpeg_augment)

    def save() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "aux_opt": aux_opt.state_dict(),
                "step": step,
                "wall": wall,
                "init": before,
                "config": str(cfg.path),
            },
            tmp,
        )
        os.replace(tmp, ckpt_path)

    started = time.monotonic()
    budget = (until - dt.datetime.now(dt.UTC)).total_seconds() if until is not None else 0.0

    def progress() -> float:
        return (time.monotonic() - started) / budget if budget > 0 else 0.0

    if step == 0 and cfg.init and cfg.init != "pca" and tiles:
        m = evaluate(model, tiles)  # where a fine-tune starts: its later evaluations compare with this
        _log(cfg, f"eval step 0 bpp {m['bpp']:.4f} psnr {m['psnr']:.2f} ssim {m['ssim']:.4f}")
    model.train()
    acc = {"loss": 0.0, "bpp": 0.0, "mse": 0.0, "ssim": 0.0, "n": 0}
    t_last = time.perf_counter()
    while step < cfg.steps:
        if until is not None and dt.datetime.now(dt.UTC) >= until:
            _log(cfg, f"deadline reached at step {step}")
            break
        lr_now = _lr_at(cfg, step, progress())
        for g in opt.param_groups:
            g["lr"] = g["base"] * lr_now / cfg.lr
        x = torch.from_numpy(sampler.batch(cfg.batch)).to(device).permute(0, 3, 1, 2).float() / 255.0
        out = model(x)
        loss, parts = rd_loss(cfg, x, out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        aux = model.aux_loss()
        aux_opt.zero_grad(set_to_none=True)
        aux.backward()
        aux_opt.step()
        step += 1
        acc["loss"] += loss.item()
        for k, v in parts.items():
            acc[k] += v
        acc["n"] += 1
        now = time.perf_counter()
        wall += now - t_last
        t_last = now
        if step % cfg.log_every == 0:
            n = acc["n"]
            dist_txt = ""
            if "mse" in parts:  # absent in rate-only fine-tuning
                dist_txt = f" psnr {10 * math.log10(1.0 / max(acc['mse'] / n, 1e-10)):.2f}"
                dist_txt += f" ssim {acc['ssim'] / n:.4f}" if cfg.distortion == "ssim" else ""
            _log(
                cfg,
                f"step {step} loss {acc['loss'] / n:.4f} bpp {acc['bpp'] / n:.4f}{dist_txt} "
                f"aux {aux.item():.1f} lr {lr_now:.1e} {wall / step:.3f}s/step",
            )
            acc = {"loss": 0.0, "bpp": 0.0, "mse": 0.0, "ssim": 0.0, "n": 0}
        if step % cfg.ckpt_every == 0:
            save()
        if step % cfg.eval_every == 0 and tiles:
            # Snap the quantiles to the learned density (as export does) so this
            # evaluation measures what would be shipped; the aux loss alone lags.
            model.update_entropy_models()
            m = evaluate(model, tiles)
            _log(cfg, f"eval step {step} bpp {m['bpp']:.4f} psnr {m['psnr']:.2f} ssim {m['ssim']:.4f}")
            t_last = time.perf_counter()  # evaluation time is not training time
    save()
    _log(cfg, f"stopped at step {step}, {wall / 60:.1f} min training")
    return step


# -- export --------------------------------------------------------------------------------


def export(cfg: TrainConfig, *, data_dir: Path, weights_dir: Path = WEIGHTS_DIR) -> dict[str, Any]:
    """Write ``weights/<name>.pt`` (CDF tables computed here) and update the manifest."""
    import torch

    from .codecs.models import build, load_state
    from .codecs.neural import save_weights

    ck = torch.load(cfg.run_dir / "ckpt.pt", map_location="cpu", weights_only=False)
    model = build(cfg.architecture, **cfg.arch)
    load_state(model, ck["model"])
    meta: dict[str, Any] = {
        "lambda": cfg.lmbda,
        "distortion": cfg.distortion,
        "config": str(cfg.path.resolve().relative_to(REPO))
        if cfg.path.resolve().is_relative_to(REPO)
        else str(cfg.path),
        "steps": int(ck["step"]),
        "train_minutes": round(float(ck.get("wall", 0.0)) / 60, 1),
    }
    if cfg.lambda_mse:
        meta["lambda_mse"] = cfg.lambda_mse  # refinement (models/refine.py) minimises the same objective
    if ck.get("init"):
        meta["init"] = dict(ck["init"])  # the run it was fine-tuned from (steps and minutes before this one)
    # Evaluate what will be exported (CDF tables computed, synthesis on its grid: both idempotent,
    # save_weights does them again), then write the weights and manifest entry once.
    model.eval()
    model.update_entropy_models()
    model.snap_synthesis_()
    metrics = evaluate(model, eval_tiles(cfg, data_dir))
    entry = save_weights(
        model,
        name=cfg.name,
        quality=cfg.quality,
        weights_dir=weights_dir,
        meta={**meta, "eval": {k: round(v, 4) for k, v in metrics.items()}},
    )
    _log(cfg, f"exported {cfg.name}.pt sha256 {entry['sha256'][:12]} eval {entry['eval']}")
    return entry


def _parse_until(s: str | None) -> dt.datetime | None:
    """``HH:MM`` or ``HH:MM:SS`` (UTC) as the nearest such moment, less than 12 hours away either way.

    One just past stops the run at once: a run started late for its deadline (a phase of
    scripts/train_device.sh after a slow one) must not take it for tomorrow's and train for a day."""
    if s is None:
        return None
    parts = [int(v) for v in s.split(":")]
    if len(parts) not in (2, 3):
        raise SystemExit(f"--until wants HH:MM or HH:MM:SS, got {s!r}")
    hh, mm, ss = (*parts, 0)[:3]
    now = dt.datetime.now(dt.UTC)
    t = now.replace(hour=hh, minute=mm, second=ss, microsecond=0)
    if t > now + dt.timedelta(hours=12):
        return t - dt.timedelta(days=1)
    return t if t > now - dt.timedelta(hours=12) else t + dt.timedelta(days=1)


def _add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("config", nargs="+", help="TOML config(s); several run one after another")
    ap.add_argument("--export", action="store_true", help="export package weights from the checkpoint")
    ap.add_argument("--until", help="stop training at this UTC time, HH:MM or HH:MM:SS (checkpoint kept)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("TILESERVER_TEST_DATA", DEFAULT_DATA)))
    ap.add_argument(
        "--weights-dir", type=Path, default=WEIGHTS_DIR, help="where --export writes (default: the package's weights)"
    )


def _run(args: argparse.Namespace) -> int:
    for path in args.config:
        cfg = load_config(path)
        if args.export:
            export(cfg, data_dir=args.data, weights_dir=args.weights_dir)
        else:
            train(cfg, data_dir=args.data, until=_parse_until(args.until), threads=args.threads, device=args.device)
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``tileserver train CONFIG... [--export] [--until HH:MM]``."""
    ap = subparsers.add_parser("train", help="train or export neural codec models", description=__doc__)
    _add_arguments(ap)
    ap.set_defaults(func=_run)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m tileserver.train``)."""
    ap = argparse.ArgumentParser(prog="python -m tileserver.train", description=__doc__.split("\n\n")[0])
    _add_arguments(ap)
    return _run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
