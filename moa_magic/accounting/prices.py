"""USD prices per million tokens for a `provider:model`, offline.

`price_for(provider, model, user_prices)` resolves, in this order:

1. the user's `[prices."provider:model"]` table (`{"input": usd_per_mtok, "output": ...}`), source
   `"config"`, which wins over everything;
2. a local provider (`provider.local`, or a base URL on localhost / 127.0.0.1 / ::1 / 0.0.0.0, or the
   embedded model) costs $0, source `"local ($0)"`;
3. the price data bundled in the `genai-prices` package, source `"genai-prices <version>"`. The
   provider is found by id (`provider.price_provider`, else `provider.name`) and, failing that, by its
   base URL (genai-prices matches each provider's `api_pattern` against the URL). We call its public
   `genai_prices.calc_price(Usage(input_tokens=1, output_tokens=1), model, provider_id=... |
   provider_api_url=...)` only to find the model, and read the model's per-MTok prices from the
   returned `PriceCalculation.model_price` (`input_mtok`, `output_mtok`), with the current date's
   price (genai-prices picks date-conditional prices by the request time).
   *Tiered prices* (e.g. Gemini 2.5 Pro or Claude Sonnet 4.5, where a prompt above 200k tokens is
   billed at a higher rate): we use the base tier, i.e. the price for prompts below the first
   threshold, and say so in the source: `"genai-prices 0.2.3 (base tier)"`. MoA prompts are far
   below those thresholds, so this is the price actually paid in practice.
   Network: genai-prices only fetches prices from the web when an `UpdatePrices` is started; this
   module never starts one, so only the data bundled with the installed package is used.
4. otherwise `Price(None, None, "price unknown")`: a cost is then None, never a silent 0.

genai-prices (~0.1 s to import) is imported on the first lookup, not when this module is imported.
Lookups are cached per (provider id, base URL, model); no lookup ever raises.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..figures import PRICE_UNKNOWN

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Provider

__all__ = ["Price", "price_for", "LOCAL_SOURCE", "UNKNOWN_SOURCE", "CONFIG_SOURCE"]

CONFIG_SOURCE = "config"
LOCAL_SOURCE = "local ($0)"
UNKNOWN_SOURCE = PRICE_UNKNOWN
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


@dataclass(frozen=True)
class Price:
    """USD per million input / output tokens, and where the numbers came from."""

    input_per_mtok: float | None
    output_per_mtok: float | None
    source: str

    @property
    def known(self) -> bool:
        return self.input_per_mtok is not None and self.output_per_mtok is not None

    def cost(self, input_tokens: int, output_tokens: int) -> float | None:
        """USD for a call, or None when the price is not known."""
        if not self.known:
            return None
        assert self.input_per_mtok is not None and self.output_per_mtok is not None
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1_000_000


def price_for(provider: "Provider", model: str, user_prices: dict[str, dict[str, float]] | None,
              lookup: bool = True) -> Price | None:
    """The price of `model` on `provider`: user config, then local ($0), then genai-prices, else unknown.

    With `lookup=False`, None instead of a price that would need genai-prices imported first."""
    key = f"{provider.name}:{model}"
    table = (user_prices or {}).get(key)
    if table is not None:
        try:
            return Price(float(table["input"]), float(table["output"]), CONFIG_SOURCE)
        except (KeyError, TypeError, ValueError):
            pass  # the config loader validates these; a malformed table falls through
    try:
        url = provider.url()
    except Exception:  # noqa: BLE001 - a bad env override must not break pricing
        url = provider.base_url
    if provider.local or _is_local_url(url):
        return Price(0.0, 0.0, LOCAL_SOURCE)
    if not lookup and "genai_prices" not in sys.modules:
        return None
    return _lookup(provider.price_provider or provider.name, url, model)


def load_price_data() -> None:
    """Import genai-prices and build its bundled price table now (the warm process does, before
    it forks: moa_magic/warm/server.py), instead of on the first lookup."""
    from genai_prices import data_snapshot

    data_snapshot.get_snapshot()


def _is_local_url(url: str) -> bool:
    if url.startswith("embedded:"):
        return True
    try:
        host = urlsplit(url if "://" in url else f"//{url}").hostname
    except ValueError:
        return False
    return host is not None and host.lower() in _LOCAL_HOSTS


@functools.lru_cache(maxsize=1024)
def _lookup(provider_id: str, url: str, model: str) -> Price:
    try:
        import genai_prices
        from genai_prices import Usage, calc_price
    except Exception:  # noqa: BLE001 - package missing or broken: prices are simply unknown
        return Price(None, None, UNKNOWN_SOURCE)
    usage = Usage(input_tokens=1, output_tokens=1)
    attempts: list[dict[str, Any]] = [{"provider_id": provider_id}]
    if url.startswith(("http://", "https://")):
        attempts.append({"provider_api_url": url})
    for how in attempts:
        try:
            calc = calc_price(usage, model, **how)
        except Exception:  # noqa: BLE001 - LookupError for unknown provider/model, or bad data
            continue
        model_price = calc.model_price
        input_mtok, in_tiered = _base(getattr(model_price, "input_mtok", None))
        output_mtok, out_tiered = _base(getattr(model_price, "output_mtok", None))
        if input_mtok is None or output_mtok is None:
            continue
        source = f"genai-prices {_version(genai_prices)}"
        if in_tiered or out_tiered:
            source += " (base tier)"
        return Price(input_mtok, output_mtok, source)
    return Price(None, None, UNKNOWN_SOURCE)


def _base(value: Any) -> tuple[float | None, bool]:
    """(USD per MTok, tiered?) from a genai-prices Decimal or TieredPrices (its base tier)."""
    if value is None:
        return None, False
    if isinstance(value, (Decimal, int, float)):
        return float(value), False
    base = getattr(value, "base", None)
    if isinstance(base, (Decimal, int, float)):
        return float(base), True
    return None, False


def _version(module: Any) -> str:
    try:
        from importlib.metadata import version

        return version("genai-prices")
    except Exception:  # noqa: BLE001
        return str(getattr(module, "__version__", "?"))
