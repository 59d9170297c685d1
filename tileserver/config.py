"""Settings: one frozen, typed object, loaded once at start-up.

Precedence, lowest first::

    defaults  <  TOML file (``--config FILE``)  <  TILESERVER_* environment  <  explicit arguments

The TOML file groups keys in sections (``[server]``, ``[slides]``, ``[tiles]``,
``[cache]``, ``[decode]``); each key is the ``Settings`` field name.  The
environment variable for a field is ``TILESERVER_`` + its name in upper case
(``TILESERVER_PORT=9000``, ``TILESERVER_CACHE_BYTES=1073741824``).
``config.example.toml`` at the repository root documents every key with its default.

An unknown key or a bad value raises ``ConfigError`` with one message naming the key.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from .errors import ConfigError

__all__ = ["ENV_PREFIX", "SECTIONS", "Settings", "describe", "load_settings"]

#: prefix of the environment variables that override settings
ENV_PREFIX = "TILESERVER_"

_log = logging.getLogger(__name__)

TileFormat = Literal["jpeg", "png", "webp"]
Device = Literal["auto", "cpu", "cuda"]
LogLevel = Literal["debug", "info", "warning", "error"]


def _m(section: str, doc: str) -> dict[str, str]:
    """Field metadata: the TOML section a setting lives in, and its one-line documentation."""
    return {"section": section, "doc": doc}


@dataclass(frozen=True)
class Settings:
    """Every setting of the server, with its default.  Build with ``load_settings``."""

    # [server]
    host: str = field(default="127.0.0.1", metadata=_m("server", "address to listen on (0.0.0.0 for all interfaces)"))
    port: int = field(default=8080, metadata=_m("server", "TCP port"))
    workers: int = field(
        default=0, metadata=_m("server", "gunicorn worker processes; 0 = auto: min(4, max(1, cores // 2))")
    )
    threads: int = field(
        default=8, metadata=_m("server", "threads per worker (gthread), so a worker's decode batcher sees concurrency")
    )
    timeout: int = field(
        default=60, metadata=_m("server", "seconds before a silent worker is restarted; also the shutdown drain")
    )
    metrics: bool = field(default=True, metadata=_m("server", "serve Prometheus metrics at /metrics"))
    access_log_json: bool = field(
        default=False, metadata=_m("server", "access log as JSON lines (with tile source and decode time)")
    )
    log_level: LogLevel = field(default="info", metadata=_m("server", "log level: debug, info, warning, error"))
    # [slides]
    slides_dir: str = field(default=".", metadata=_m("slides", "folder of slides to serve (sub-folders included)"))
    max_open_slides: int = field(
        default=32, metadata=_m("slides", "open slides kept per worker (least recently used closed first)")
    )
    # [tiles]
    tile_size: int = field(
        default=256, metadata=_m("tiles", "Deep Zoom tile size; 256 with overlap 0 lines up with our stored tiles")
    )
    overlap: int = field(default=0, metadata=_m("tiles", "Deep Zoom tile overlap in pixels"))
    limit_bounds: bool = field(
        default=True, metadata=_m("tiles", "show only the slide's non-empty region when it declares one")
    )
    tile_format: TileFormat = field(default="jpeg", metadata=_m("tiles", "format named in the .dzi: jpeg, png or webp"))
    tile_quality: int = field(default=80, metadata=_m("tiles", "JPEG / WebP quality of browser tiles, 1-100"))
    thumbnail_max: int = field(default=1024, metadata=_m("tiles", "largest thumbnail edge served, in pixels"))
    # [cache]
    cache_bytes: int = field(
        default=256 * 1024 * 1024, metadata=_m("cache", "bytes of encoded browser tiles cached per worker")
    )
    # [decode]
    batch_max_size: int = field(
        default=16, metadata=_m("decode", "neural decode batch: dispatch when this many tiles wait")
    )
    batch_max_delay_ms: float = field(
        default=5.0, metadata=_m("decode", "neural decode batch: or when the oldest has waited this long")
    )
    device: Device = field(default="auto", metadata=_m("decode", "neural decode device: auto, cpu or cuda"))
    preload_models: bool = field(
        default=True, metadata=_m("decode", "load installed neural models at worker start; /readyz is 503 until done")
    )
    torch_threads: int = field(
        default=0, metadata=_m("decode", "torch intra-op threads per worker; 0 = auto: max(1, cores // workers)")
    )

    def __post_init__(self) -> None:
        _validate(self)

    def resolved_workers(self) -> int:
        """``workers``, with 0 replaced by the automatic choice for this machine."""
        if self.workers:
            return self.workers
        return min(4, max(1, (os.cpu_count() or 1) // 2))

    def resolved_torch_threads(self) -> int:
        """``torch_threads``, with 0 replaced by the automatic choice for this machine."""
        if self.torch_threads:
            return self.torch_threads
        return max(1, (os.cpu_count() or 1) // self.resolved_workers())


#: section name -> field names, in declaration order
SECTIONS: dict[str, list[str]] = {}
for _fld in dataclasses.fields(Settings):
    SECTIONS.setdefault(_fld.metadata["section"], []).append(_fld.name)

_HINTS = get_type_hints(Settings)
_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}

_RANGES: dict[str, tuple[float, float]] = {
    "port": (0, 65535),
    "workers": (0, 1024),
    "threads": (1, 1024),
    "timeout": (1, 86400),
    "max_open_slides": (1, 100_000),
    "tile_size": (16, 4096),
    "overlap": (0, 64),
    "tile_quality": (1, 100),
    "thumbnail_max": (16, 16384),
    "cache_bytes": (0, 1 << 50),
    "batch_max_size": (1, 4096),
    "batch_max_delay_ms": (0, 10_000),
    "torch_threads": (0, 1024),
}


def _validate(s: Settings) -> None:
    for name, (lo, hi) in _RANGES.items():
        value = getattr(s, name)
        if not lo <= value <= hi:
            raise ConfigError(f"setting {name!r}: {value!r} is out of range [{lo:g}, {hi:g}]")


def _coerce(name: str, value: Any, *, from_text: bool) -> Any:
    """``value`` converted to the type of field ``name``; ConfigError naming the key otherwise."""
    hint = _HINTS[name]
    if get_origin(hint) is Literal:
        choices = get_args(hint)
        text = value.strip().lower() if isinstance(value, str) else value
        if text not in choices:
            raise ConfigError(f"setting {name!r}: {value!r} is not one of {', '.join(map(str, choices))}")
        return text
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        raise ConfigError(f"setting {name!r}: {value!r} is not a boolean (true/false)")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"setting {name!r}: {value!r} is not an integer")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if from_text and isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"setting {name!r}: {value!r} is not a number")
    if hint is str:
        if isinstance(value, str | os.PathLike):
            return os.fspath(value)
        raise ConfigError(f"setting {name!r}: {value!r} is not a string")
    raise AssertionError(f"unhandled settings type {hint!r}")  # pragma: no cover - a new field type


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {str(path)!r} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
    out: dict[str, Any] = {}
    for section, table in doc.items():
        if section not in SECTIONS:
            raise ConfigError(f"config file {str(path)!r}: unknown section [{section}]")
        if not isinstance(table, dict):
            raise ConfigError(f"config file {str(path)!r}: {section!r} must be a [section] table")
        for key, value in table.items():
            if key not in SECTIONS[section]:
                raise ConfigError(f"config file {str(path)!r}: unknown key {section}.{key}")
            out[key] = _coerce(key, value, from_text=False)
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        name = var[len(ENV_PREFIX) :].lower()
        if name not in _FIELDS:
            # The TILESERVER_ namespace is shared (TILESERVER_TEST_DATA, model paths...),
            # so an unknown variable is reported, not fatal; a bad value for a setting is.
            _log.warning("ignoring environment variable %s: not a setting", var)
            continue
        out[name] = _coerce(name, value, from_text=True)
    return out


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Settings from defaults, then ``config_file``, then ``env`` (default ``os.environ``), then ``overrides``.

    ``overrides`` are explicit values (command-line arguments); a None value means
    "not given" and is skipped.  Raises ``ConfigError`` naming the offending key.
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(_from_toml(Path(config_file)))
    values.update(_from_env(os.environ if env is None else env))
    for name, value in overrides.items():
        if name not in _FIELDS:
            raise ConfigError(f"unknown setting {name!r}")
        if value is not None:
            values[name] = _coerce(name, value, from_text=False)
    return Settings(**values)


def describe() -> list[tuple[str, str, Any, str]]:
    """(section, name, default, doc) for every setting, in order (for docs and tests)."""
    return [(f.metadata["section"], f.name, f.default, f.metadata["doc"]) for f in dataclasses.fields(Settings)]
