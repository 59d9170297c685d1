"""Training mechanics: schedules, deadlines, fine-tuning from an installed model, slim checkpoints."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from tileserver import train  # noqa: E402
from tileserver.codecs import neural  # noqa: E402
from tileserver.errors import ConfigError  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "tileserver" / "codecs" / "configs"


def _config(tmp_path: Path, text: str, **train_keys: object) -> Path:
    """A copy of ``text`` with ``[train]`` keys replaced or added (TOML values as Python reprs)."""
    lines = text.splitlines()
    for key, value in train_keys.items():
        rendered = f"{key} = {json.dumps(value)}"
        hit = [i for i, line in enumerate(lines) if line.split("=")[0].strip() == key]
        if hit:
            lines[hit[0]] = rendered
        else:
            lines.insert(lines.index("[train]") + 1, rendered)
    path = tmp_path / "c.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cosine_schedule_warms_up_then_falls_to_zero_with_steps_or_time(tmp_path: Path) -> None:
    text = (CONFIGS / "klt-cx-s140-gpu.toml").read_text()
    cfg = train.load_config(_config(tmp_path, text, steps=100, warmup=10, lr=1e-4))
    assert cfg.schedule == "cosine"
    assert train._lr_at(cfg, 0) == pytest.approx(1e-5)  # a tenth of the way up
    assert train._lr_at(cfg, 9) == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi * 0.09)))
    after = [train._lr_at(cfg, s) for s in range(10, 101)]
    assert all(a > b for a, b in itertools.pairwise(after))
    assert after[-1] == 0.0
    # The time budget leads when it is further along than the steps.
    assert train._lr_at(cfg, 20, progress=0.5) == pytest.approx(0.5e-4)
    assert train._lr_at(cfg, 50, progress=0.1) == pytest.approx(0.5e-4)
    assert train._lr_at(cfg, 20, progress=1.5) == 0.0


def test_step_schedule_keeps_its_milestones() -> None:
    cfg = train.load_config(CONFIGS / "klt-cx-s140.toml")
    assert (cfg.schedule, cfg.warmup, cfg.lr_milestones) == ("step", 0, [4500])
    assert train._lr_at(cfg, 4499, progress=0.99) == cfg.lr
    assert train._lr_at(cfg, 4500) == pytest.approx(cfg.lr * 0.1)


def test_config_rejects_an_unknown_schedule(tmp_path: Path) -> None:
    text = (CONFIGS / "klt-cx-s140-gpu.toml").read_text()
    with pytest.raises(ConfigError, match="schedule"):
        train.load_config(_config(tmp_path, text, schedule="linear"))


def test_until_is_the_nearest_such_moment_and_takes_seconds() -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)

    def at(delta: dt.timedelta, seconds: bool = True) -> dt.datetime:
        t = now + delta
        until = train._parse_until(t.strftime("%H:%M:%S" if seconds else "%H:%M"))
        assert until is not None
        return until

    assert at(dt.timedelta(minutes=7, seconds=13)) == now + dt.timedelta(minutes=7, seconds=13)
    assert at(dt.timedelta(hours=11)) == now + dt.timedelta(hours=11)
    # Just past (a phase that started late for its deadline): past, so the run stops at once.
    assert at(dt.timedelta(seconds=-20)) == now - dt.timedelta(seconds=20)
    assert at(dt.timedelta(hours=-11)) == now - dt.timedelta(hours=11)
    # Further away than 12 hours either way: the nearest such moment is on the other day.
    assert at(dt.timedelta(hours=-13)) == now + dt.timedelta(hours=11)
    assert at(dt.timedelta(hours=13)) == now - dt.timedelta(hours=11)
    minute = at(dt.timedelta(minutes=30), seconds=False)
    assert minute.second == 0 and dt.timedelta(minutes=29) < minute - now <= dt.timedelta(minutes=30)
    with pytest.raises(SystemExit, match="HH:MM"):
        train._parse_until("7")


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """Two tissue-coloured images: one to train on, one held out."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.png", "eval.png"):
        base = np.array([200, 120, 170], float) + rng.normal(0, 25, (288, 288, 3))
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(data / name)
    return data


def test_fine_tune_starts_at_an_installed_model_and_resumes_from_a_slim_checkpoint(
    tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train, "REPO", tmp_path)  # run directories under tmp_path/runs
    entry = neural._manifest(None)["models"]["1"]
    text = (CONFIGS / "klt-cx-s280-gpu.toml").read_text()
    text = text.replace(text[text.index("[data]") :], '[data]\nsources = ["*.png"]\neval = ["eval.png"]\n')
    text = text.replace(
        text[text.index("init = ") : text.index("\n", text.index("init = "))], f'init = "{entry["file"]}"'
    )
    cfg = train.load_config(_config(tmp_path, text, steps=2, batch=1, crop=64, eval_every=2, warmup=0))
    assert train.train(cfg, data_dir=tiny_data, until=None, threads=1, device="cpu") == 2

    ck = torch.load(cfg.run_dir / "ckpt.pt", weights_only=False)
    prior = entry.get("init", {})
    assert ck["init"] == {
        "config": Path(entry["config"]).name,
        "steps": entry["steps"] + prior.get("steps", 0),
        "train_minutes": round(entry["train_minutes"] + prior.get("train_minutes", 0.0), 1),
        "weights": entry["sha256"][:12],
    }
    log = (cfg.run_dir / "train.log").read_text()
    assert f"from the package's {entry['file']}" in log and " eval step 0 " in log
    # The installed model, not a fresh one: its calibrated activation ranges (buffers, never
    # trained) came along, and its weights moved by at most two steps' worth.
    installed = torch.load(neural.WEIGHTS_DIR / entry["file"], weights_only=False)["state_dict"]
    ranges = [k for k in installed if k.startswith("int8_")]
    assert ranges and all(torch.equal(ck["model"][k], installed[k]) for k in ranges)
    assert torch.allclose(ck["model"]["inverse.weight"], installed["inverse.weight"].float(), atol=1e-4)

    # A checkpoint slimmed for transfer (no optimizer states) resumes with fresh optimizers.
    torch.save({k: v for k, v in ck.items() if k not in ("opt", "aux_opt")}, cfg.run_dir / "ckpt.pt")
    more = train.load_config(_config(tmp_path, text, steps=3, batch=1, crop=64, eval_every=100, warmup=0))
    assert train.train(more, data_dir=tiny_data, until=None, threads=1, device="cpu") == 3
    log = (cfg.run_dir / "train.log").read_text()
    assert "resumed klt-cx-s280-gpu at step 2" in log and "optimizers start afresh" in log


def test_init_must_name_an_installed_model(tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train, "REPO", tmp_path)
    text = (CONFIGS / "klt-cx-s280-gpu.toml").read_text().replace('"klt-cx-s280-q8.pt"', '"no-such-model.pt"')
    text = text.replace(text[text.index("[data]") :], '[data]\nsources = ["*.png"]\neval = ["eval.png"]\n')
    cfg = train.load_config(_config(tmp_path, text, steps=1, batch=1, crop=64))
    with pytest.raises(ConfigError, match="not an installed model"):
        train.train(cfg, data_dir=tiny_data, until=None, threads=1, device="cpu")
