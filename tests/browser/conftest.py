"""Fixtures for the browser tests (marker ``browser``).

Needs Debian's chromium and the ``browser`` extra: ``bash .ci/install-browser.sh``.
When they are missing the tests are skipped, unless MOA_REQUIRE_BROWSER=1
(set it in CI once the install step runs there) which turns that into a failure.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import lab as lab_mod  # noqa: E402


def _missing() -> str | None:
    if not Path(lab_mod.CHROMIUM).exists():
        return f"{lab_mod.CHROMIUM} not installed"
    for mod in ("playwright", "jupyterlab", "notebook", "ipywidgets", "nbformat"):
        if importlib.util.find_spec(mod) is None:
            return f"python package {mod} not installed"
    return None


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    why = _missing()
    for item in items:
        if here not in Path(str(item.fspath)).parents:
            continue
        item.add_marker(pytest.mark.browser)
        if why:
            if os.environ.get("MOA_REQUIRE_BROWSER") == "1":
                continue  # let it fail loudly
            item.add_marker(pytest.mark.skip(reason=f"{why}: run `bash .ci/install-browser.sh`"))


@pytest.fixture
def lab_root(tmp_path) -> Path:
    root = tmp_path / "lab-root"
    root.mkdir()
    return root


@pytest.fixture
def lab_factory():
    """``with lab_factory(root, env) as lab:`` — same as lab.running_lab."""
    return lab_mod.running_lab


@pytest.fixture(scope="session")
def chromium():
    """One headless Chromium (fresh profile) for the whole session."""
    with lab_mod.browser() as b:
        yield b


@pytest.fixture
def page(chromium):
    p = chromium.new_page()
    yield p
    p.close()


@pytest.fixture
def artifacts_dir(tmp_path) -> Path:
    """Where screenshots go: $MOA_BROWSER_ARTIFACTS if set (CI keeps them), else tmp."""
    d = Path(os.environ.get("MOA_BROWSER_ARTIFACTS") or (tmp_path / "artifacts"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture
def chat_server():
    """tests/conftest.py's fake server, stopped from a helper thread.

    Playwright's sync API keeps an asyncio loop marked as running in the main thread while
    the session's Chromium is up, and ChatServer.stop() calls loop.run_until_complete(), which
    refuses to run there ("Cannot run the event loop while another loop is running").
    """
    from chat_server import ChatServer

    server = ChatServer().start()
    try:
        yield server
    finally:
        failure: list[BaseException] = []

        def stop():
            try:
                server.stop()
            except BaseException as exc:  # pragma: no cover
                failure.append(exc)

        t = threading.Thread(target=stop, name="chat-server-stop")
        t.start()
        t.join(30)
        if failure:
            raise failure[0]
    assert not server.errors, f"the fake server itself failed: {server.errors!r}"


def pytest_addoption(parser):
    parser.addoption(
        "--readme-images", action="store_true", default=False,
        help="also write the README's screenshots (docs/tree.png) from the browser run; "
             "without it the tests write only to the artifacts directory",
    )


@pytest.fixture
def readme_images(request) -> bool:
    return request.config.getoption("--readme-images")
