"""Service configuration: defaults, a TOML file, and command-line flags.

Precedence: a flag given on the command line wins over the file, the file over
the defaults. Every key of the file is also a flag (``data_dir`` ↔ ``--data-dir``).
"""

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from storage.store import DuplicatePolicy


class ConfigError(ValueError):
    """A configuration problem, phrased for the admin: it names the key."""


@dataclass(frozen=True)
class Config:
    aet: str = "IMAGING_SCP"
    host: str = "0.0.0.0"
    port: int = 11112
    data_dir: Path = Path("data")
    # Bounded: an unlimited max PDU lets one sender push a whole object in one PDU.
    max_pdu: int = 262144
    max_associations: int = 32
    duplicates: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST
    # Refuse associations addressed to another AE title (a misrouted modality).
    require_called_aet: bool = True
    # Seconds a connection may stay silent (mid-PDU or between messages).
    network_timeout: float = 60.0
    # Seconds SIGTERM waits for in-flight associations before aborting them.
    drain_timeout: float = 30.0
    log_level: str = "info"


_LOG_LEVELS = ("debug", "info", "warning", "error")


def load_config(path: Path | None = None, **flags) -> Config:
    """Build the effective configuration. `flags` are command-line values; None
    means "not given"."""
    values: dict = {}
    if path is not None:
        values.update(_read_file(Path(path)))
    values.update({key: value for key, value in flags.items() if value is not None})
    return _validated(values)


def _read_file(path: Path) -> dict:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def _validated(values: dict) -> Config:
    fields = {item.name: item for item in dataclasses.fields(Config)}
    converted = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key '{key}'")
        converted[key] = _convert(key, value, fields[key].type)
    config = Config(**converted)
    _check_ranges(config)
    return config


def _convert(key: str, value, kind):
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise TypeError
            return int(value)
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise TypeError
            return float(value)
        if kind is Path:
            if not isinstance(value, str | Path):
                raise TypeError
            return Path(value)
        if kind is DuplicatePolicy:
            return DuplicatePolicy(value)
        if not isinstance(value, str):
            raise TypeError
        return value
    except (TypeError, ValueError) as exc:
        expected = {
            bool: "true or false",
            int: "an integer",
            float: "a number",
            Path: "a path",
            DuplicatePolicy: "one of " + ", ".join(p.value for p in DuplicatePolicy),
            str: "a string",
        }[kind]
        raise ConfigError(f"key '{key}': expected {expected}, got {value!r}") from exc


def _check_ranges(config: Config) -> None:
    aet = config.aet
    if not (0 < len(aet.strip()) <= 16) or not aet.isascii() or "\\" in aet:
        raise ConfigError(f"key 'aet': an AE title is 1 to 16 ASCII characters, got {aet!r}")
    if not 0 <= config.port <= 65535:
        raise ConfigError(f"key 'port': must be 0..65535, got {config.port}")
    if not 4096 <= config.max_pdu <= 16 * 1024 * 1024:
        raise ConfigError(f"key 'max_pdu': must be 4096..16777216 bytes, got {config.max_pdu}")
    if config.max_associations < 1:
        raise ConfigError(
            f"key 'max_associations': must be at least 1, got {config.max_associations}"
        )
    for key in ("network_timeout", "drain_timeout"):
        if getattr(config, key) <= 0:
            raise ConfigError(f"key '{key}': must be a positive number of seconds")
    if config.log_level not in _LOG_LEVELS:
        raise ConfigError(
            f"key 'log_level': one of {', '.join(_LOG_LEVELS)}, got {config.log_level!r}"
        )
