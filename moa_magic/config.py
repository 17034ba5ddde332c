"""Providers, presets, prices and run settings, read from TOML.

The built-in providers and presets live in `builtin.toml` and go through the same loader as a user's
file, so a new provider or preset is data, not code. Every error names the file and the key.

Over 400 lines on purpose: each field of the schema sits beside the rule that checks it (a type and
its validation split into two files would have to change together every time).
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError, MoaUserError
from .limits import judge_prompt_problem, max_tokens_problem, temperature_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

BUILTIN = "built-in presets (moa_magic/builtin.toml)"
MODEL_KEYS = {"model": str, "temperature": (int, float), "max_tokens": int, "system": str, "seed": int}
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Allowed ranges of numbers: (low, high, whole number?). Seeds are whatever an int64 holds.
SEED = (-(2**63), 2**63 - 1, True)
CONCURRENCY = (1, 1024, True)
SETTINGS_RANGES = {
    "retries": (0, 100, True),
    "connect_timeout": (0.001, 86_400, False),
    "first_byte_timeout": (0.001, 86_400, False),
    "chunk_timeout": (0.001, 86_400, False),
    "call_timeout": (0.001, 86_400, False),
    "min_ok": (0, 1024, True),
    "quorum": (0, 1024, True),  # 0: off
    "deadline": (0, 86_400, False),  # 0: off
    "max_concurrency": CONCURRENCY,
    "backoff_base": (0, 3_600, False),
    "backoff_max": (0, 3_600, False),
    "cache_max_mb": (0.001, 1_000_000, False),
    "cache_replay_s": (0, 60, False),
}
PRICE = (0, 1_000_000, False)


def redact_url(url: str) -> str:
    """`url` with any user name and password shown as `***`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"//[^/?#]*@", "//***@", url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def url_problem(url: str) -> str | None:
    """Why `url` cannot be a base URL, or None. Credentials are allowed (sent as basic auth)."""
    if not url.startswith(("http://", "https://")):
        return "must start with http:// or https://"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        return "must not contain spaces or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if not parts.hostname:
        return "has no host name"
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        return "must not have a ?query or #fragment (moa-magic appends /chat/completions)"
    return None


@dataclass(frozen=True)
class Provider:
    """An OpenAI-compatible chat-completions endpoint. The key is read from the env at call time."""

    name: str
    base_url: str
    api_key_env: str | None = None
    local: bool = False
    models: tuple[str, ...] | None = None
    price_provider: str | None = None
    max_concurrency: int = 8
    host_env: str | None = None
    start_hint: str = ""
    base_url_from_user: bool = False
    # How the server continues an assistant prefix (staircase streaming, core/staircase.py):
    # "trailing" (a last assistant message is continued: llama.cpp's llama-server, the embedded
    # model), "vllm" (continue_final_message), "mistral" (prefix: true); "": it cannot (or unknown)
    prefill: str = ""

    @property
    def embedded(self) -> bool:
        return self.base_url.startswith("embedded:")

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def has_key(self) -> bool:
        return not self.api_key_env or bool(self.api_key())

    def url(self) -> str:
        """Base URL after overrides: MOA_<NAME>_BASE_URL, then the config file, then e.g. OLLAMA_HOST.

        A malformed override is a ConfigError naming the variable (its value shown redacted)."""
        variable = f"MOA_{self.name.upper().replace('-', '_')}_BASE_URL"
        override = os.environ.get(variable)
        if override:
            return _checked_env_url(override.rstrip("/"), variable)
        if self.host_env and not self.base_url_from_user and os.environ.get(self.host_env):
            host = os.environ[self.host_env].strip().rstrip("/")
            if "://" not in host:
                host = f"http://{host}"
            host = host.replace("://0.0.0.0", "://127.0.0.1")
            return _checked_env_url(f"{host}/v1", self.host_env)
        return self.base_url.rstrip("/")

    def shown_url(self) -> str:
        """The base URL to show a person: credentials redacted, the embedded marker as is."""
        return self.base_url if self.embedded else redact_url(self.url())


def _checked_env_url(url: str, variable: str) -> str:
    problem = url_problem(url)
    if problem:
        raise ConfigError(f"${variable} = {redact_url(url)!r} {problem}. Fix or unset it.")
    return url


@dataclass(frozen=True)
class ModelEntry:
    """One slot of a layer: a `provider:model` name plus optional per-call overrides."""

    spec: str
    temperature: float | None = None
    max_tokens: int | None = None
    system: str | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Preset:
    name: str
    layers: tuple[tuple[ModelEntry, ...], ...]
    aggregator: ModelEntry
    description: str = ""
    temperature: float = 0.7
    max_tokens: int = 512
    system: str | None = None
    aggregator_prompt: str | None = None
    quorum: int | None = None  # None: the run's [settings]
    deadline: float | None = None
    judge_prompt: str | None = None  # None: the run's [settings]
    source: str = BUILTIN


@dataclass(frozen=True)
class RunSettings:
    """Fault handling knobs; `[settings]` in a config file."""

    retries: int = 2
    connect_timeout: float = 10.0
    first_byte_timeout: float = 60.0
    chunk_timeout: float = 60.0
    call_timeout: float = 300.0
    min_ok: int = 1
    # early aggregation (core/policy.py): a layer goes on when `quorum` proposers succeeded, or
    # `deadline` seconds after it started with what succeeded (at least min_ok); 0: off
    quorum: int = 0
    deadline: float = 0.0
    max_concurrency: int = 16
    backoff_base: float = 0.5
    backoff_max: float = 20.0
    # The request cache (providers/call_cache.py); `cache` is "auto", "on" or "off" (see README, "Cache").
    cache: str = "auto"
    cache_path: str = ""  # empty: requests.sqlite3 in the user cache dir
    cache_max_mb: float = 256.0
    cache_replay_s: float = 0.3  # how long a cached answer takes to stream into a watched run
    judge_prompt: str = ""  # replaces core/judge.py's (a preset's wins); empty: that one


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
    # beside this file, read directly: importlib.resources would import zipfile (~10 ms) before the
    # first request, for a package that is never imported from a zip
    builtin_text = Path(__file__).with_name("builtin.toml").read_text("utf-8")
    config = _merge(Config(providers={}, presets={}), _parse(builtin_text, BUILTIN), BUILTIN, user=False)
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


def _parse(text: str, where: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}. Fix that line and run again.") from None


TOP_KEYS = {"providers", "presets", "prices", "default_preset", "auto_presets", "settings"}
PROVIDER_KEYS = {
    "base_url": str, "api_key_env": str, "local": bool, "models": list,
    "price_provider": str, "max_concurrency": int, "host_env": str, "start_hint": str, "prefill": str,
}
PREFILL_KINDS = ("", "trailing", "vllm", "mistral")
PRESET_KEYS = {
    "layers", "aggregator", "description", "temperature", "max_tokens", "system", "aggregator_prompt",
    "quorum", "deadline", "judge_prompt",
}


def _merge(config: Config, data: dict, where: str, user: bool) -> Config:
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise ConfigError(
            f"{where}: unknown top-level key(s) {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(TOP_KEYS))}."
        )
    providers = dict(config.providers)
    for name, table in _table(data, "providers", where).items():
        providers[name] = _provider(name, table, where, providers.get(name), user)
    presets = dict(config.presets)
    for name, table in _table(data, "presets", where).items():
        presets[name] = _preset(name, table, where)
    prices = dict(config.prices)
    for spec, table in _table(data, "prices", where).items():
        prices[spec] = _price(spec, table, where)
    settings = config.settings
    settings_table = _table(data, "settings", where)
    if settings_table:
        settings = _settings(settings, settings_table, where)
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


def _check_keys(table: dict, allowed, where: str, section: str) -> None:
    unknown = set(table) - set(allowed)
    if unknown:
        raise ConfigError(
            f"{where}: [{section}] has unknown key(s) {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(allowed))}."
        )


def _number(value, where: str, section: str, key: str, bounds: tuple) -> int | float:
    """`value` if it is a (whole) number within `bounds`; NaN and infinities never are."""
    low, high, whole = bounds
    kinds = (int,) if whole else (int, float)
    if (
        isinstance(value, bool)
        or not isinstance(value, kinds)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        kind = "a whole number" if whole else "a number"
        raise ConfigError(f"{where}: [{section}] {key} must be {kind} from {low} to {high}, got {value!r}.")
    return value


def _env_name(value, where: str, section: str, key: str) -> str:
    if not ENV_NAME.fullmatch(value):
        # the value may be a pasted key: never echo it
        raise ConfigError(
            f"{where}: [{section}] {key} must be the NAME of an environment variable (letters, "
            f"digits and _, e.g. \"MY_API_KEY\"), not a key itself; the value given is not shown."
        )
    return value


def _provider(name: str, table: dict, where: str, base: Provider | None, user: bool) -> Provider:
    section = f"providers.{name}"
    _check_keys(table, PROVIDER_KEYS, where, section)
    for key, kind in PROVIDER_KEYS.items():
        if key in table and not isinstance(table[key], kind):
            raise ConfigError(f"{where}: [{section}] {key} must be of type {kind.__name__}.")
    if ":" in name or not name:
        raise ConfigError(f"{where}: [{section}] provider names cannot contain ':'.")
    if base is None and "base_url" not in table:
        raise ConfigError(
            f"{where}: [{section}] needs base_url, e.g. base_url = \"http://localhost:8000/v1\"."
        )
    fields = dict(table)
    if "models" in fields:
        if not all(isinstance(m, str) and m for m in fields["models"]):
            raise ConfigError(f"{where}: [{section}] models must be a list of model names.")
        fields["models"] = tuple(fields["models"])
    for key in ("api_key_env", "host_env"):
        if fields.get(key):  # "" means none
            _env_name(fields[key], where, section, key)
    if "base_url" in fields:
        url = fields["base_url"]
        problem = None if url.startswith("embedded:") else url_problem(url)
        if problem:
            raise ConfigError(
                f"{where}: [{section}] base_url {problem}, e.g. \"https://api.example.com/v1\"; "
                f"got {redact_url(url)!r}."
            )
        fields["base_url_from_user"] = user
    if "max_concurrency" in fields:
        _number(fields["max_concurrency"], where, section, "max_concurrency", CONCURRENCY)
    if fields.get("prefill", "") not in PREFILL_KINDS:
        raise ConfigError(f"{where}: [{section}] prefill must be one of "
                          f"{', '.join(repr(k) for k in PREFILL_KINDS)}, got {fields['prefill']!r}.")
    provider = replace(base, **fields) if base else Provider(name=name, **fields)
    if provider.api_key_env and "@" in urlsplit(provider.base_url).netloc:
        raise ConfigError(
            f"{where}: [{section}] base_url {redact_url(provider.base_url)} carries a user name and "
            f"password, and api_key_env = \"{provider.api_key_env}\" names a key: only one can be "
            f"sent. Remove the credentials from the URL, or set api_key_env = \"\"."
        )
    return provider


def _model_entry(value, where: str, section: str) -> ModelEntry:
    if isinstance(value, str):
        return ModelEntry(spec=value)
    if isinstance(value, dict):
        _check_keys(value, MODEL_KEYS, where, section)
        if "model" not in value:
            raise ConfigError(f"{where}: [{section}] a model table needs model = \"provider:model\".")
        for key, kind in MODEL_KEYS.items():
            if key in value and not isinstance(value[key], kind):
                raise ConfigError(f"{where}: [{section}] {key} has the wrong type.")
        fields = dict(value)
        spec = fields.pop("model")
        for key, problem in (("temperature", temperature_problem), ("max_tokens", max_tokens_problem)):
            if key in fields and problem(fields[key]):
                raise ConfigError(f"{where}: [{section}] model {spec!r}: {key} {problem(fields[key])}.")
        if "seed" in fields:
            _number(fields["seed"], where, f"{section}] [model {spec!r}", "seed", SEED)
        return ModelEntry(spec=spec, **fields)
    raise ConfigError(
        f"{where}: [{section}] a model must be \"provider:model\" or "
        f"{{ model = \"provider:model\", temperature = 0.7 }}, got {value!r}."
    )


def _preset(name: str, table: dict, where: str) -> Preset:
    section = f"presets.{name}"
    _check_keys(table, PRESET_KEYS, where, section)
    layers = table.get("layers")
    if (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(layer, list) and layer for layer in layers)
    ):
        raise ConfigError(
            f"{where}: [{section}] layers must be a non-empty list of non-empty model lists, "
            f"e.g. layers = [[\"openai:gpt-4o-mini\", \"groq:llama-3.3-70b-versatile\"]]."
        )
    if "aggregator" not in table:
        raise ConfigError(f"{where}: [{section}] needs aggregator = \"provider:model\".")
    number = table.get("temperature", 0.7)
    tokens = table.get("max_tokens", 512)
    for key, problem in (("temperature", temperature_problem(number)),
                         ("max_tokens", max_tokens_problem(tokens))):
        if problem:
            raise ConfigError(f"{where}: [{section}] {key} {problem}.")
    for key in ("description", "system", "aggregator_prompt"):
        if key in table and not isinstance(table[key], str):
            raise ConfigError(f"{where}: [{section}] {key} must be a string.")
    return Preset(
        name=name,
        layers=tuple(tuple(_model_entry(m, where, section) for m in layer) for layer in layers),
        aggregator=_model_entry(table["aggregator"], where, section),
        description=table.get("description", ""),
        temperature=float(number),
        max_tokens=tokens,
        system=table.get("system"),
        aggregator_prompt=table.get("aggregator_prompt"),
        quorum=_number(table["quorum"], where, section, "quorum", SETTINGS_RANGES["quorum"])
        if "quorum" in table else None,
        deadline=float(_number(table["deadline"], where, section, "deadline", SETTINGS_RANGES["deadline"]))
        if "deadline" in table else None,
        judge_prompt=_judge_prompt(table["judge_prompt"], where, section)
        if "judge_prompt" in table else None,
        source=where,
    )


def _price(spec: str, table: dict, where: str) -> dict[str, float]:
    section = f'prices."{spec}"'
    _check_keys(table, {"input", "output"}, where, section)
    if ":" not in spec:
        raise ConfigError(f"{where}: [{section}] the key must be \"provider:model\".")
    for key in ("input", "output"):
        if key not in table:
            raise ConfigError(f"{where}: [{section}] needs {key} = USD per million tokens.")
        _number(table[key], where, section, f"{key} (USD per million tokens)", PRICE)
    return {"input": float(table["input"]), "output": float(table["output"])}


def cache_mode(value, where: str) -> str:
    """`cache` as the API, the flags and the config give it (True, False, None, "auto"...) -> a mode."""
    modes = {True: "on", False: "off", None: "auto", "on": "on", "off": "off", "auto": "auto"}
    if isinstance(value, (bool, str, type(None))) and value in modes:
        return modes[value]
    raise ConfigError(
        f"{where}: cache must be true (serve every call from the cache when it can), false (never "
        f"read or write the cache) or \"auto\" (only calls at temperature 0 or with a seed), "
        f"got {value!r}."
    )


def _settings(current: RunSettings, table: dict, where: str) -> RunSettings:
    allowed = {name: type(getattr(current, name)) for name in current.__dataclass_fields__}
    _check_keys(table, allowed, where, "settings")
    fields = {}
    for key, value in table.items():
        if key == "cache":
            fields[key] = cache_mode(value, f"{where}: [settings]")
        elif key == "cache_path":
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{where}: [settings] cache_path must be a file path in quotes.")
            path = Path(value).expanduser()
            if not path.is_absolute() and where != BUILTIN:  # relative to the file that says it
                path = Path(where).parent / path
            fields[key] = str(path)
        elif key == "judge_prompt":
            fields[key] = _judge_prompt(value, where, "settings")
        else:
            fields[key] = allowed[key](_number(value, where, "settings", key, SETTINGS_RANGES[key]))
    return replace(current, **fields)


def _judge_prompt(value, where: str, section: str) -> str:
    problem = judge_prompt_problem(value)
    if problem:
        raise ConfigError(f"{where}: [{section}] judge_prompt {problem}.")
    return value
