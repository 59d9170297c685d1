"""Train an encoder add-on: a deeper analysis against an installed model's frozen decoder.

Encoder-side refinement (``models/refine.py``) shows that the analysis leaves bits on the table
(11 % at SSIM 0.95 in 60 steps per tile).  An analysis with more capacity takes part of that back
at no cost to decoding: this script deepens the current q``--quality`` model's analysis
(``models/encoder.py``: residual blocks at the latent resolution, the first also seeing the raw
pixels of each 8x8 block, each starting at zero so the start is the shipped encoder) and trains
them, the shipped analysis and ``h_a`` (the side latent's analysis, encode-only as well) with the
model's own objective on its own training data, while the synthesis, hyper-synthesis, context and
entropy models stay frozen.

Every ``--eval-every`` steps it codes 16 tissue tiles of ``bench/compress.py``'s set with the real
codec (bitstreams and the integer decoder) and prints the rate change at equal SSIM against the
q1-q5 curve of the same tiles coded with the models' own analyses (``bench/compress.py``'s
``interp_bpp``), the rate change at equal PSNR against the same curve's PSNR (``rate_change_psnr``)
and the PSNR change against the model's own analysis, as JSON lines: trained on SSIM alone, the first
add-ons bought 1-3 % of rate with 0.55-0.8 dB of PSNR (docs/training.md), so ``--lambda-mse`` adds a
fidelity guard, and an add-on pays only if both rate changes are below zero.  The trained parts,
with the steps and minutes of every run that led to them, are saved to ``--out``; ``--resume``
continues from such a file (a new optimizer and the next crops), and ``--install`` writes the result
as the model's encoder add-on (``codecs.neural.save_encoder``) with its provenance in the manifest.

    .venv/bin/python scripts/train_encoder.py --quality 3 --minutes 28 --out q3.pt --install    # CPU
    python3 scripts/train_encoder.py --quality 3 --minutes 7 --device cuda --batch 32 --out q3.pt  # a GPU
    .venv/bin/python scripts/train_encoder.py --quality 3 --resume q3.pt --minutes 0 --install  # install it

``--hold-rate`` keeps the add-on's training rate at the shipped encoder's on the same crops (``RateHold``),
so it spends what it gains on quality and its quality stays where it is on the q1-q5 curve; the installed
q2-q5 add-ons continued the first (unguarded) ones that way, with a weak guard (docs/training.md):

    .venv/bin/python scripts/train_encoder.py --quality 3 --resume installed --lambda-mse 0.006 --hold-rate \
        --minutes 46 --threads 1 --eval-every 1000 --out q3.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from _tiles import spread_tiles  # noqa: E402
from compress import interp_bpp, run_codec  # noqa: E402

from tileserver import codecs  # noqa: E402
from tileserver.codecs.models.objective import bits_per_pixel  # noqa: E402
from tileserver.train import CropSampler, load_config, load_images, rd_loss  # noqa: E402


def code(codec: Any, tiles: np.ndarray) -> dict[str, float]:
    """Mean bpp, SSIM and PSNR of ``tiles`` through ``codec``'s real bitstreams and decoder, as the benchmark codes."""
    got = run_codec("neural", codec, tiles)
    return {k: float(np.mean(got[f"{k}_per_tile"])) for k in ("bpp", "ssim", "psnr")}


def rate_change(curve: list[dict[str, float]], got: dict[str, float], key: str = "ssim") -> tuple[float, bool]:
    """``got``'s bits against the curve's at ``got``'s ``key`` (SSIM or PSNR) - 1, and whether the curve
    was extrapolated (linearly in log bpp along its first or last segment: q1 and q5 can leave its range)."""
    on_curve = interp_bpp(curve, got[key], key=key)
    if on_curve is not None:
        return got["bpp"] / on_curve - 1, False
    pts = sorted(curve, key=lambda p: p[key])
    a, b = pts[:2] if got[key] < pts[0][key] else pts[-2:]
    t = (got[key] - a[key]) / (b[key] - a[key])
    log_bpp = math.log(a["bpp"]) + t * (math.log(b["bpp"]) - math.log(a["bpp"]))
    return got["bpp"] / math.exp(log_bpp) - 1, True


class RateHold:
    """Keeps the add-on's training rate at the shipped encoder's: every ``every`` steps the shipped model
    (its own analysis, never trained here) codes the same batch, and the loss's rate term is weighted by
    ``weight``, which rises while the add-on's rate is above the shipped one's (the ratio's running mean over
    about 20 of those batches) and falls while it is below, by ``gain`` times the relative difference per
    step (within 1/4..4).  Pairing on the same crops keeps the content's variation out of the ratio."""

    def __init__(self, shipped: Any, every: int = 4, gain: float = 0.005, weight: float = 1.0) -> None:
        self.shipped, self.every, self.gain = shipped, every, gain
        self.weight, self.ratio, self.step = self._bounded(weight), 1.0, 0
        shipped.train()  # noisy latents, as the add-on's rate is measured in training

    def update(self, x: Any, bpp: float) -> None:
        import torch

        if self.step % self.every == 0:
            with torch.no_grad():
                ref = bits_per_pixel(self.shipped(x)["likelihoods"], x).item()
            self.ratio += 0.05 * (bpp / ref - self.ratio)
        self.step += 1
        self.weight = self._bounded(self.weight * math.exp(self.gain * (self.ratio - 1)))

    @staticmethod
    def _bounded(weight: float) -> float:
        return min(4.0, max(0.25, weight))

    def state(self) -> dict[str, float]:
        return {"rate_ratio": round(self.ratio, 5), "rate_weight": round(self.weight, 4)}


def main(argv: list[str] | None = None) -> int:
    import torch

    from tileserver.codecs.models.encoder import ENCODER_PREFIXES, deepen
    from tileserver.codecs.neural import save_encoder

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quality", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=2, help="residual blocks appended to the analysis")
    ap.add_argument("--width", type=int, default=128, help="hidden width of each block")
    ap.add_argument("--lr", type=float, default=3e-4, help="the blocks' first step size (the shipped parts: a tenth)")
    ap.add_argument("--minutes", type=float, default=28.0, help="training time (cosine schedule over it)")
    ap.add_argument("--steps", type=int, default=0, help="train this many steps instead (schedule over them)")
    ap.add_argument(
        "--lambda-mse",
        type=float,
        help="weight of an MSE term in the objective (the config's lambda_mse otherwise): a fidelity guard",
    )
    ap.add_argument(
        "--hold-rate",
        action="store_true",
        help="keep the training rate at the shipped encoder's: a controller weights the rate term so the "
        "add-on spends what it gains on quality and its quality stays where it is on the curve",
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--eval-every", type=int, default=2000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    data = os.environ.get("TILESERVER_TEST_DATA", ROOT.parent / "shared" / "data")
    ap.add_argument("--data", type=Path, default=Path(data))
    ap.add_argument("--out", type=Path, default=Path("encoder.pt"))
    ap.add_argument(
        "--resume",
        help="continue from a file that --out wrote (same quality and blocks), or 'installed': the installed add-on",
    )
    ap.add_argument("--install", action="store_true", help="write the result as the model's encoder add-on")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tiles = spread_tiles(16)  # the refinement tuning's 16
    base = {"encoder": "base", "device": args.device}
    curve = [code(codecs.get("neural", quality=q, **base), tiles) for q in (1, 2, 3, 4, 5)]
    runs: list[dict[str, Any]] = []
    if args.resume == "installed":
        # The codec encodes with the model's add-on, attached to it; training goes on in place.
        codec = codecs.get("neural", quality=args.quality, device=args.device)
        entry = codec._entry  # type: ignore[attr-defined]
        if "encoder" not in entry:
            raise SystemExit(f"q{args.quality} has no installed encoder add-on to resume")
        model = codec._load_encoder().model  # type: ignore[attr-defined]
        deep = model.g_a
        args.blocks, args.width = entry["encoder"]["blocks"], entry["encoder"]["width"]
        runs = list(entry["encoder"]["runs"])
    else:
        codec = codecs.get("neural", quality=args.quality, **base)
        entry = codec._entry  # type: ignore[attr-defined]
        model = codec._load().model  # type: ignore[attr-defined]  # trained in place: the codec encodes with it
        deep = deepen(model, args.blocks, args.width)
        if args.resume:
            before = torch.load(args.resume, map_location="cpu", weights_only=True)
            if before["quality"] != args.quality or before["model"] != entry["sha256"]:
                raise SystemExit(f"{args.resume} was trained for another model (q{before['quality']})")
            if set(before["state"]) != {k for k in model.state_dict() if k.startswith(ENCODER_PREFIXES)}:
                raise SystemExit(f"{args.resume} does not fit --blocks {args.blocks} --width {args.width}")
            model.load_state_dict(before["state"], strict=False)  # g_a and h_a: the decoder stays as shipped
            runs = list(before["runs"])
    cfg = load_config(ROOT / entry["config"])
    if args.lambda_mse is not None:
        cfg = dataclasses.replace(cfg, lambda_mse=args.lambda_mse)
    for p in model.parameters():
        p.requires_grad_(False)
    new = list(deep.blocks.parameters())
    shipped = [*deep.base.parameters(), *model.h_a.parameters()]
    for p in [*new, *shipped]:
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": new, "base": args.lr}, {"params": shipped, "base": args.lr / 10}])

    def evaluate(step: int, **extra: Any) -> dict[str, Any]:
        model.eval()
        got: dict[str, Any] = code(codec, tiles)
        model.train()
        got["rate_change"], extrapolated = rate_change(curve, got)
        if extrapolated:
            got["extrapolated"] = True
        # Fidelity: an SSIM objective can buy its score with PSNR (the first add-ons lost 0.55-0.8 dB).
        # An add-on pays if it needs fewer bits at equal SSIM and at equal PSNR.
        got["psnr_change"] = got["psnr"] - curve[args.quality - 1]["psnr"]
        got["rate_change_psnr"] = rate_change(curve, got, key="psnr")[0]
        print(json.dumps({"step": step, **got, **extra}), flush=True)
        return got

    evaluate(0, curve=curve)
    images, _ = load_images(cfg, args.data)
    sampler = CropSampler(images, args.crop, 1 + sum(r["steps"] for r in runs))  # resumed: the next crops
    hold = None
    if args.hold_rate:
        own = codecs.get("neural", quality=args.quality, encoder="base", device=args.device)
        # A resumed rate-held run starts from the multiplier its last run ended at: from 1, the add-on
        # would spend its first few hundred steps above the shipped rate while the multiplier climbs back.
        weight = float(runs[-1].get("rate_weight", 1.0)) if runs else 1.0
        hold = RateHold(own._load().model, weight=weight)  # type: ignore[attr-defined]  # a model of its own
    model.train()
    started, step, losses = time.monotonic(), 0, []

    def progress() -> float:
        if args.steps:
            return step / args.steps
        return (time.monotonic() - started) / (args.minutes * 60) if args.minutes > 0 else 1.0

    while progress() < 1:
        scale = 0.5 * (1 + math.cos(math.pi * progress()))
        for group in opt.param_groups:
            group["lr"] = group["base"] * scale
        x = torch.from_numpy(sampler.batch(args.batch)).to(args.device).permute(0, 3, 1, 2).float() / 255.0
        loss, parts = rd_loss(cfg, x, model(x), rate_weight=hold.weight if hold is not None else 1.0)
        if hold is not None:
            hold.update(x, parts["bpp"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*new, *shipped], 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % args.eval_every == 0:
            extra = {"loss": float(np.mean(losses)), "s_per_step": (time.monotonic() - started) / step}
            evaluate(step, **extra, **(hold.state() if hold is not None else {}))
            losses = []
    minutes = (time.monotonic() - started) / 60
    if args.install:  # evaluate what will be installed: the add-on is stored in float16
        with torch.no_grad():
            for p in [*new, *shipped]:
                p.copy_(p.half().float())
    final = evaluate(step, minutes=minutes)
    if step:
        settings = {k: v for k, v in vars(args).items() if k not in ("data", "out", "install", "resume", "quality")}
        settings["lambda_mse"] = cfg.lambda_mse
        if hold is not None:
            settings.update(hold.state())
        runs.append({**settings, "steps": step, "minutes": round(minutes, 1)})
    state = {k: v for k, v in model.state_dict().items() if k.startswith(ENCODER_PREFIXES)}
    payload = {"quality": args.quality, "model": entry["sha256"], "runs": runs, "state": state}
    torch.save(payload, args.out)
    if args.install:
        model.eval()
        meta = {
            "script": "scripts/train_encoder.py",
            "config": entry["config"],
            "runs": runs,
            "steps": sum(r["steps"] for r in runs),
            "train_minutes": round(sum(r["minutes"] for r in runs), 1),
            "eval": {"tiles": 16, **{k: round(v, 5) if isinstance(v, float) else v for k, v in final.items()}},
        }
        print(json.dumps(save_encoder(model, quality=args.quality, meta=meta)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
