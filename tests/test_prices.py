"""Prices: user config, local $0, genai-prices bundled data, unknown -> None (never a silent 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest

from moa_magic.config import Provider
from moa_magic.accounting.prices import Price, price_for

OPENAI = Provider(name="openai", base_url="https://api.openai.com/v1", api_key_env="OPENAI_API_KEY")
GEMINI = Provider(name="gemini", base_url="https://generativelanguage.googleapis.com/v1beta/openai",
                  price_provider="google")
OLLAMA = Provider(name="ollama", base_url="http://localhost:11434/v1", local=True, host_env="OLLAMA_HOST")
GENAI_VERSION = version("genai-prices")


def test_cost_arithmetic_exact():
    p = Price(2.0, 8.0, "config")
    assert p.known
    assert p.cost(1_000_000, 0) == 2.0
    assert p.cost(0, 1_000_000) == 8.0
    assert p.cost(500_000, 250_000) == 3.0
    assert p.cost(0, 0) == 0.0


def test_unknown_price_cost_is_none():
    p = Price(None, None, "price unknown")
    assert not p.known
    assert p.cost(1000, 1000) is None
    assert Price(1.0, None, "x").cost(1, 1) is None


def test_user_price_wins_over_everything():
    user = {"openai:gpt-4o-mini": {"input": 2.0, "output": 4.0}, "ollama:llama3": {"input": 1.0, "output": 1.0}}
    p = price_for(OPENAI, "gpt-4o-mini", user)
    assert p == Price(2.0, 4.0, "config")
    assert p.cost(1_000_000, 1_000_000) == 6.0
    assert price_for(OLLAMA, "llama3", user) == Price(1.0, 1.0, "config")


def test_local_provider_costs_zero():
    p = price_for(OLLAMA, "llama3:8b", {})
    assert p == Price(0.0, 0.0, "local ($0)")
    assert p.cost(123, 456) == 0.0
    embedded = Provider(name="local", base_url="embedded:smollm2", local=True)
    assert price_for(embedded, "smollm2", {}).source == "local ($0)"


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1", "http://[::1]:8080/v1", "http://LOCALHOST/v1"])
def test_loopback_url_is_local_even_without_flag(url):
    p = price_for(Provider(name="mine", base_url=url), "gpt-4o-mini", {})
    assert p == Price(0.0, 0.0, "local ($0)")


def test_env_override_to_loopback_is_local(monkeypatch):
    monkeypatch.setenv("MOA_OPENAI_BASE_URL", "http://127.0.0.1:9999/v1")
    assert price_for(OPENAI, "some-model-nobody-prices", {}).source == "local ($0)"


def test_well_known_model_from_genai_prices():
    p = price_for(OPENAI, "gpt-4o-mini", {})
    assert p.known
    assert p.input_per_mtok == pytest.approx(0.15)
    assert p.output_per_mtok == pytest.approx(0.6)
    assert p.source == f"genai-prices {GENAI_VERSION}"
    assert p.cost(1_000_000, 1_000_000) == pytest.approx(0.75)


def test_openrouter_vendor_model():
    p = price_for(Provider(name="openrouter", base_url="https://openrouter.ai/api/v1"), "openai/gpt-4o", {})
    assert p.known and p.input_per_mtok > 0 and p.source.startswith("genai-prices")


def test_price_provider_alias_and_tiers_use_base():
    p = price_for(GEMINI, "gemini-2.5-pro", {})
    assert p.known
    assert p.input_per_mtok == pytest.approx(1.25)
    assert p.output_per_mtok == pytest.approx(10.0)
    assert p.source == f"genai-prices {GENAI_VERSION} (base tier)"


def test_lookup_by_base_url_when_name_unknown():
    custom = Provider(name="my-openai-proxy", base_url="https://api.openai.com/v1")
    p = price_for(custom, "gpt-4o-mini", {})
    assert p.known and p.input_per_mtok == pytest.approx(0.15)


@pytest.mark.parametrize(
    "provider,model",
    [
        (OPENAI, "no-such-model-xyz"),
        (Provider(name="nowhere", base_url="https://llm.example.invalid/v1"), "gpt-4o-mini"),
        (Provider(name="nowhere", base_url="not a url"), ""),
    ],
)
def test_unknown_is_unknown_and_does_not_raise(provider, model):
    p = price_for(provider, model, {})
    assert p == Price(None, None, "price unknown")
    assert not p.known
    assert p.cost(1000, 1000) is None


def test_lookups_cached():
    from moa_magic.accounting import prices

    prices._lookup.cache_clear()
    price_for(OPENAI, "gpt-4o-mini", {})
    price_for(OPENAI, "gpt-4o-mini", {})
    info = prices._lookup.cache_info()
    assert info.hits >= 1 and info.misses == 1


def test_import_is_lazy_and_no_price_fetch(tmp_path):
    """Importing moa_magic.accounting.prices does not import genai_prices; a lookup uses bundled data, no sockets."""
    code = textwrap.dedent(
        """
        import json, socket, sys, threading
        def refuse(*a, **k):
            raise AssertionError("network used")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        import moa_magic.accounting.prices as prices
        lazy = "genai_prices" not in sys.modules
        from moa_magic.config import Provider
        p = prices.price_for(Provider(name="openai", base_url="https://api.openai.com/v1"), "gpt-4o-mini", {})
        from genai_prices import data_snapshot
        print(json.dumps({"lazy": lazy, "input": p.input_per_mtok, "source": p.source,
                          "custom_snapshot": data_snapshot._custom_snapshot is not None,
                          "threads": threading.active_count()}))
        """
    )
    env = dict(os.environ, HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"lazy": True, "input": 0.15, "source": f"genai-prices {GENAI_VERSION}",
                   "custom_snapshot": False, "threads": 1}
