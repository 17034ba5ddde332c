"""`[providers.NAME]`: an OpenAI-compatible endpoint, and the rules of its base URL.

`redact_url` is also how every URL is shown elsewhere (proxies, redirects): credentials never are.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from urllib.parse import urlsplit, urlunsplit

from ..errors import ConfigError
from .checks import CONCURRENCY, check_keys, number

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PROVIDER_KEYS = {
    "base_url": str, "api_key_env": str, "local": bool, "models": list,
    "price_provider": str, "max_concurrency": int, "host_env": str, "start_hint": str, "prefill": str,
}
PREFILL_KINDS = ("", "trailing", "vllm", "mistral")


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


def _env_name(value, where: str, section: str, key: str) -> str:
    if not ENV_NAME.fullmatch(value):
        # the value may be a pasted key: never echo it
        raise ConfigError(
            f"{where}: [{section}] {key} must be the NAME of an environment variable (letters, "
            f"digits and _, e.g. \"MY_API_KEY\"), not a key itself; the value given is not shown."
        )
    return value


def provider_from(name: str, table: dict, where: str, base: Provider | None, user: bool) -> Provider:
    section = f"providers.{name}"
    check_keys(table, PROVIDER_KEYS, where, section)
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
        number(fields["max_concurrency"], where, section, "max_concurrency", CONCURRENCY)
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
