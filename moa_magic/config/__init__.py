"""Providers, presets, prices and run settings, read from TOML.

The built-in providers and presets live in `builtin.toml` and go through the same loader as a user's
file, so a new provider or preset is data, not code. Every error names the file and the key.

Here: where the files are, reading and merging them, and the config as a whole (with `[prices]`).
Each section's type sits beside the rule that checks it: `[providers]` provider.py, `[presets]`
preset.py, `[settings]` settings.py; the rules they share checks.py.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, MoaUserError
from .checks import BUILTIN, check_keys, number
from .preset import ModelEntry, Preset, preset_from
from .provider import Provider, provider_from, redact_url
from .settings import RunSettings, cache_mode, settings_from

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "BUILTIN", "Config", "ModelEntry", "Preset", "Provider", "RunSettings", "cache_mode",
    "load_config", "redact_url", "user_config_path",
]

PRICE = (0, 1_000_000, False)


@dataclass(frozen=True)
class Config:
    providers: dict[str, Provider]
    presets: dict[str, Preset]
    prices: dict[str, dict[str, float]] = field(default_factory=dict)
    default_preset: str = ""
    auto_presets: tuple[str, ...] = ()
    settings: RunSettings = RunSettings()
    files: tuple[str, ...] = ()

    def preset(self, name: str) -> Preset:
        """The preset called `name`; an unknown name is a MoaUserError listing the known ones."""
        if name not in self.presets:
            raise MoaUserError(
                f"Unknown preset {name!r}. Presets: {', '.join(sorted(self.presets))}. "
                f"Define your own as [presets.{name}] in moa.toml."
            )
        return self.presets[name]


def user_config_path() -> Path | None:
    """`$MOA_MAGIC_CONFIG`, else `./moa.toml`, else the user config dir; None when none exists."""
    explicit = os.environ.get("MOA_MAGIC_CONFIG")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"MOA_MAGIC_CONFIG points to {path}, which is not a file.")
        return path
    here = Path("moa.toml")
    if here.is_file():
        return here
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA", Path.home()))
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    path = base / "moa-magic" / "moa.toml"
    return path if path.is_file() else None


def load_config(path: str | Path | None = None) -> Config:
    """Built-in data, then the user's file (an explicit `path` wins over the search)."""
    config = builtin_config()
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist.")
    else:
        path = user_config_path()
    if path is not None:
        try:
            text = path.read_text("utf-8")
        except OSError as exc:
            raise ConfigError(f"Cannot read config file {path}: {exc.strerror}.") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{path}: not UTF-8 text (byte {exc.start} cannot be decoded); save it as UTF-8."
            ) from None
        config = _merge(config, _parse(text, str(path)), str(path), user=True)
    return config


def builtin_config() -> Config:
    """builtin.toml, parsed once per version of the file (the warm daemon does it before forking)."""
    # beside the package's modules, read directly: importlib.resources would import zipfile (~10 ms)
    # before the first request, for a package that is never imported from a zip
    path = Path(__file__).parent.parent / "builtin.toml"
    return _parsed_builtin(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _parsed_builtin(path: Path, mtime_ns: int) -> Config:
    data = _parse(path.read_text("utf-8"), BUILTIN)
    return _merge(Config(providers={}, presets={}), data, BUILTIN, user=False)


def _parse(text: str, where: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}. Fix that line and run again.") from None


TOP_KEYS = {"providers", "presets", "prices", "default_preset", "auto_presets", "settings"}


def _merge(config: Config, data: dict, where: str, user: bool) -> Config:
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise ConfigError(
            f"{where}: unknown top-level key(s) {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(TOP_KEYS))}."
        )
    providers = dict(config.providers)
    for name, table in _table(data, "providers", where).items():
        providers[name] = provider_from(name, table, where, providers.get(name), user)
    presets = dict(config.presets)
    for name, table in _table(data, "presets", where).items():
        presets[name] = preset_from(name, table, where)
    prices = dict(config.prices)
    for spec, table in _table(data, "prices", where).items():
        prices[spec] = _price(spec, table, where)
    settings = config.settings
    settings_table = _table(data, "settings", where)
    if settings_table:
        settings = settings_from(settings, settings_table, where)
    default = data.get("default_preset", config.default_preset)
    if not isinstance(default, str):
        raise ConfigError(f"{where}: default_preset must be a preset name in quotes.")
    auto = data.get("auto_presets", config.auto_presets)
    if not isinstance(auto, (list, tuple)) or not all(isinstance(a, str) for a in auto):
        raise ConfigError(f"{where}: auto_presets must be a list of preset names.")
    return Config(
        providers=providers,
        presets=presets,
        prices=prices,
        default_preset=default,
        auto_presets=tuple(auto),
        settings=settings,
        files=config.files + ((where,) if user else ()),
    )


def _table(data: dict, key: str, where: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{key}] must be a table, e.g. [{key}.NAME].")
    for name, table in value.items():
        if key != "settings" and not isinstance(table, dict):
            raise ConfigError(f"{where}: [{key}.{name}] must be a table of keys.")
    return value


def _price(spec: str, table: dict, where: str) -> dict[str, float]:
    section = f'prices."{spec}"'
    check_keys(table, {"input", "output"}, where, section)
    if ":" not in spec:
        raise ConfigError(f"{where}: [{section}] the key must be \"provider:model\".")
    for key in ("input", "output"):
        if key not in table:
            raise ConfigError(f"{where}: [{section}] needs {key} = USD per million tokens.")
        number(table[key], where, section, f"{key} (USD per million tokens)", PRICE)
    return {"input": float(table["input"]), "output": float(table["output"])}
