"""Settings: the example file documents every key; precedence; unknown keys and bad values fail clearly."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from tileserver.config import SECTIONS, Settings, load_settings
from tileserver.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"


def test_example_covers_every_setting_with_its_default() -> None:
    doc = tomllib.loads(EXAMPLE.read_text())
    in_file = {key: value for table in doc.values() for key, value in table.items()}
    fields = {f.name: f.default for f in dataclasses.fields(Settings)}
    assert set(in_file) == set(fields)
    assert in_file == fields
    for section, names in SECTIONS.items():
        assert set(doc[section]) == set(names)
    text = EXAMPLE.read_text()
    for name in fields:  # each key has a comment line right above it
        before = text.split(f"\n{name} = ", 1)[0]
        assert before.rstrip().splitlines()[-1].startswith("# "), name


def test_example_loads_to_the_defaults() -> None:
    assert load_settings(EXAMPLE, env={}) == Settings()


def test_precedence_defaults_file_env_args(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nport = 9001\nthreads = 3\nhost = "0.0.0.0"\n[tiles]\ntile_quality = 60\n')
    env = {"TILESERVER_PORT": "9002", "TILESERVER_THREADS": "5", "TILESERVER_METRICS": "off"}
    s = load_settings(cfg, env=env, port=9003, host=None)
    assert s.port == 9003  # explicit argument wins
    assert s.threads == 5  # environment beats the file
    assert s.host == "0.0.0.0"  # the file beats the default; None argument = not given
    assert s.tile_quality == 60
    assert s.metrics is False
    assert s.tile_size == Settings().tile_size


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[server]\nprot = 1\n", "server.prot"),
        ("[nonsense]\nport = 1\n", "nonsense"),
        ("[tiles]\nport = 1\n", "tiles.port"),  # a real key in the wrong section
        ('[server]\nport = "eighty"\n', "port"),
        ("[server]\nport = 70000\n", "port"),
        ('[tiles]\ntile_format = "gif"\n', "tile_format"),
        ("[tiles]\nlimit_bounds = 1\n", "limit_bounds"),
        ("[decode]\nbatch_max_delay_ms = -1\n", "batch_max_delay_ms"),
        ("port = 1\n", "port"),  # keys live in sections
        ("[server\n", "not valid TOML"),
    ],
)
def test_bad_file_names_the_key(tmp_path: Path, toml: str, key: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace(".", r"\.")):
        load_settings(cfg, env={})


@pytest.mark.parametrize(
    ("var", "value"),
    [("TILESERVER_PORT", "x"), ("TILESERVER_METRICS", "maybe"), ("TILESERVER_DEVICE", "tpu")],
)
def test_bad_environment_value_names_the_key(var: str, value: str) -> None:
    with pytest.raises(ConfigError, match=var.removeprefix("TILESERVER_").lower()):
        load_settings(env={var: value})


def test_environment_values_are_typed() -> None:
    s = load_settings(env={"TILESERVER_CACHE_BYTES": "1_000", "TILESERVER_BATCH_MAX_DELAY_MS": "2.5"})
    assert s.cache_bytes == 1000
    assert s.batch_max_delay_ms == 2.5


def test_missing_file_and_bad_argument() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings("/nonexistent/tileserver.toml", env={})
    with pytest.raises(ConfigError, match="'bogus'"):
        load_settings(env={}, bogus=1)
    with pytest.raises(ConfigError, match="'workers'"):
        load_settings(env={}, workers="two")


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().port = 1  # type: ignore[misc]
