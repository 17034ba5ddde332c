"""Shared fixtures. The fake provider lives in tests/chat_server.py (ChatServer, Reply); shared
plumbing (TOML blocks, hostile text, checks) in tests/helpers.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # `from chat_server import …`, `from helpers import …`

from chat_server import ChatServer, Reply  # noqa: E402
from helpers import MOA_TOML, wait_for_runs_to_end  # noqa: E402

__all__ = ["ChatServer", "Reply"]


@pytest.fixture(autouse=True)
def _no_real_keys(monkeypatch):
    """Real provider keys and base-URL overrides never leak into a test."""
    for name in list(os.environ):
        if name.endswith("_API_KEY") or (name.startswith("MOA_") and name.endswith("_BASE_URL")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MOA_TEST_KEY", raising=False)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Every test gets an empty request cache of its own (also its subprocesses and kernels), never
    the user's: platformdirs puts the cache under $XDG_CACHE_HOME. Without $XDG_RUNTIME_DIR the
    `moa` commands it starts look for a warm daemon (`moa daemon`) there too, so never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("MOA_MAGIC_DAEMON", raising=False)


@pytest.fixture(autouse=True)
def _no_run_outlives_its_test():
    """A test's runs end before the next test starts (after this test's servers stopped): one
    still winding down after a Ctrl-C would otherwise record itself in the next test's session
    ledger, or be its `last_result()`."""
    yield
    wait_for_runs_to_end()


@pytest.fixture
def shell():
    """The IPython shell with moa_magic loaded; unloaded and cleaned afterwards (the names a test
    made, `_moa`, `%config MoaMagics`)."""
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    before = set(ip.user_ns)
    ip.run_line_magic("load_ext", "moa_magic")
    yield ip
    ip.run_line_magic("unload_ext", "moa_magic")
    for name in set(ip.user_ns) - before:
        ip.user_ns.pop(name, None)
    ip.user_ns.pop("_moa", None)
    ip.config.pop("MoaMagics", None)


@pytest.fixture
def chat_server():
    """A fresh fake OpenAI-compatible server for one test (stopped afterwards)."""
    with ChatServer() as server:
        yield server
    assert not server.errors, f"the fake server itself failed: {server.errors!r}"


@pytest.fixture(scope="session")
def _shared_chat_server_session():
    with ChatServer() as server:
        yield server


@pytest.fixture
def shared_chat_server(_shared_chat_server_session):
    """One server for the whole session, `.reset()` (no rules, no records) before each test."""
    _shared_chat_server_session.reset()
    yield _shared_chat_server_session
    _shared_chat_server_session.reset()




@pytest.fixture
def write_moa_toml(tmp_path, chat_server, monkeypatch):
    """`write_moa_toml(text, name="moa.toml") -> Path`: the config file, `{url}` filled in with
    `chat_server`'s base URL, and MOA_MAGIC_CONFIG pointing at it (kernels and the CLI inherit it)."""

    def write(text: str, name: str = "moa.toml") -> Path:
        path = tmp_path / name
        path.write_text(text.format(url=chat_server.url), "utf-8")
        monkeypatch.setenv("MOA_MAGIC_CONFIG", str(path))
        return path

    return write


@pytest.fixture
def moa_config(write_moa_toml) -> Path:
    """A moa.toml pointing providers `fake` and `fakekey` at `chat_server`; MOA_MAGIC_CONFIG set."""
    return write_moa_toml(MOA_TOML)


BROWSER_TESTS = Path(__file__).parent / "browser"


def pytest_collection_modifyitems(config, items):
    """Browser tests run last: Playwright's sync API keeps an event loop marked as running in the
    main thread while Chromium is up, which every later `asyncio.run()` would trip over."""
    items.sort(key=lambda item: BROWSER_TESTS in Path(str(item.fspath)).parents)
