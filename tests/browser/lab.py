"""Drive a real JupyterLab 4 in headless Chromium (Debian's /usr/bin/chromium).

Install the pieces with ``bash .ci/install-browser.sh`` (never ``playwright
install``).  Typical use::

    with running_lab(tmp_path) as lab, browser() as b:
        page = b.new_page()
        open_notebook(page, lab, "demo.ipynb")
        run_all_cells(page)
        wait_idle(page)

The server is isolated from the user's Jupyter state: config, data, runtime,
settings and workspaces dirs all live in a temp dir, so nothing a person has
in ``~/.jupyter`` leaks in, and nothing is restored from an old workspace.
Kernels use the ``python3`` kernelspec installed in the venv (``--sys-prefix``),
i.e. the venv's own interpreter.  The lab is started with
``--LabApp.expose_app_in_browser=True`` so helpers can call JupyterLab commands
through ``window.jupyterapp``.

The same server also serves Notebook 7 (the ``notebook`` package, a jupyter_server extension
enabled by its install) at ``/notebooks/NAME``; its app is exposed the same way, and Notebook 7 is
built from JupyterLab's parts (the same commands, ``shell.currentWidget`` and DOM classes), so
every helper here works in both: pass ``ui="notebook"`` where a page is opened.

Nothing here touches the network beyond 127.0.0.1: news/announcements and the
update check are off, the extension manager is read-only, Chromium runs with
background networking, component updates, sync and QUIC disabled.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

CHROMIUM = os.environ.get("MOA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
VIEWPORT = {"width": 1400, "height": 1000}

# DOM selectors for JupyterLab 4.x + ipywidgets 8 (jupyterlab_widgets 3).
SEL = {
    "notebook": ".jp-NotebookPanel .jp-Notebook",
    "cell": ".jp-Notebook .jp-Cell",
    "code_cell": ".jp-Notebook .jp-CodeCell",
    "input_prompt": ".jp-InputArea-prompt",
    "output_area": ".jp-OutputArea",
    "output": ".jp-OutputArea-output",
    # A widget view in an output area: ipywidgets 8 renders it into a Panel
    # `.jp-OutputArea-output` (no data-mime-type attribute on it) whose child
    # is the widget root, which carries `.jupyter-widgets`.
    "widget_output": ".jp-OutputArea-output:has(> .jupyter-widgets)",
    "widget": ".jupyter-widgets",
    "widget_html": ".widget-html",
    "widget_html_content": ".widget-html-content",
    # ipywidgets 8.1 Accordion: a stack of Collapse children, each a header
    # (click target; `.fa-caret-right`/`.fa-caret-down` icon) and contents
    # (hidden with Lumino's `.lm-mod-hidden` when collapsed); the open child
    # gets `.jupyter-widget-Collapse-open`.
    "accordion": ".jupyter-widget-Accordion",
    "accordion_child": ".jupyter-widget-Accordion-child",
    "accordion_title": ".jupyter-widget-Accordion .jupyter-widget-Collapse-header",
    "collapse_header": ".jupyter-widget-Collapse-header",  # relative, inside an accordion
    "accordion_contents": ".jupyter-widget-Collapse-contents",
    "accordion_open": ".jupyter-widget-Collapse-open",
    "hidden": ".lm-mod-hidden",
    # Markdown *output* (display(Markdown(...))); a rendered markdown cell also
    # has .jp-RenderedMarkdown but sits in .jp-MarkdownOutput, not an output area.
    "markdown_output": '.jp-OutputArea-output.jp-RenderedMarkdown[data-mime-type="text/markdown"]',
    "markdown_cell": ".jp-MarkdownCell .jp-RenderedMarkdown",
    # .jp-RenderedHTMLCommon is on BOTH markdown and HTML outputs (and markdown
    # cells); an HTML output alone is .jp-RenderedHTML / data-mime-type=text/html.
    "html_output": '.jp-OutputArea-output.jp-RenderedHTML[data-mime-type="text/html"]',
    "html_common": ".jp-RenderedHTMLCommon",
    "text_output": ".jp-RenderedText",
    "error_output": '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]',
    "dialog": ".jp-Dialog",
    "dialog_accept": ".jp-Dialog .jp-Dialog-button.jp-mod-accept",
    "exec_indicator": ".jp-Notebook-ExecutionIndicator",
}

# User-settings overrides written into the isolated JUPYTERLAB_SETTINGS_DIR.
LAB_SETTINGS: dict[str, dict] = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {
        # open a notebook straight into its (or the default) kernel, no dialog
        "autoStartDefaultKernel": True,
    },
    "@jupyterlab/apputils-extension/palette.jupyterlab-settings": {},
}


# ----------------------------------------------------------------------------
# JupyterLab server
# ----------------------------------------------------------------------------


@dataclass
class Lab:
    url: str  # e.g. http://127.0.0.1:PORT/
    token: str
    root_dir: Path
    proc: subprocess.Popen
    home: Path  # isolated jupyter dirs
    log_path: Path
    started_in: float = 0.0
    _kernel_pids: set[int] = field(default_factory=set)

    def notebook_url(self, name: str, ui: str = "lab") -> str:
        """NAME in JupyterLab (``ui="lab"``) or in Notebook 7's one-document page (``"notebook"``)."""
        if ui == "notebook":
            return f"{self.url}notebooks/{name}?token={self.token}"
        return f"{self.url}lab/tree/{name}?token={self.token}&reset"

    def api(self, path: str, method: str = "GET", body: dict | None = None, timeout: float = 10):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.url}{path.lstrip('/')}",
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_python() -> str:
    return sys.executable


def ensure_kernelspec(python: str | None = None) -> Path:
    """Make sure a ``python3`` kernelspec lives in the venv and points at its python."""
    python = python or venv_python()
    prefix = Path(subprocess.check_output([python, "-c", "import sys; print(sys.prefix)"], text=True).strip())
    spec = prefix / "share" / "jupyter" / "kernels" / "python3" / "kernel.json"
    ok = False
    if spec.exists():
        try:
            ok = json.loads(spec.read_text())["argv"][0] == python
        except (ValueError, KeyError, IndexError):
            ok = False
    if not ok:
        subprocess.check_call(
            [python, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3",
             "--display-name", "Python 3 (ipykernel)"],
            stdout=subprocess.DEVNULL,
        )
    return spec


def _descendants(pid: int) -> set[int]:
    try:
        import psutil

        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except Exception:
        return set()


def _kill_pids(pids: set[int], timeout: float = 5.0) -> None:
    try:
        import psutil
    except ImportError:  # pragma: no cover
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)


@contextlib.contextmanager
def running_lab(
    root_dir: Path,
    env: dict | None = None,
    *,
    python: str | None = None,
    startup_timeout: float = 90.0,
    extra_args: list[str] | None = None,
) -> Iterator[Lab]:
    """Start ``python -m jupyterlab`` on 127.0.0.1 serving *root_dir*.

    *env* is merged over ``os.environ``; kernels inherit the server's
    environment, so this is how a test hands variables (API keys for a fake
    server, config paths, ...) to the notebook's kernel.
    """
    python = python or venv_python()
    root_dir = Path(root_dir).resolve()
    ensure_kernelspec(python)
    home = Path(tempfile.mkdtemp(prefix="moa-lab-"))
    for d in ("config", "data", "runtime", "settings", "workspaces", "ipython"):
        (home / d).mkdir()
    for rel, content in LAB_SETTINGS.items():
        p = home / "settings" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(content))

    token = secrets.token_hex(24)
    port = _free_port()
    full_env = dict(os.environ)
    full_env.update(
        {
            "JUPYTER_CONFIG_DIR": str(home / "config"),
            "JUPYTER_DATA_DIR": str(home / "data"),
            "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
            "IPYTHONDIR": str(home / "ipython"),
            "JUPYTER_PLATFORM_DIRS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    # A venv not "activated" still works: put its bin first so `jupyter`/`pip`
    # subprocesses from the kernel resolve to the venv too.
    bindir = str(Path(python).parent)
    full_env["PATH"] = bindir + os.pathsep + full_env.get("PATH", "")
    full_env.pop("JUPYTER_PATH", None)
    if env:
        full_env.update({k: str(v) for k, v in env.items()})

    args = [
        python, "-m", "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=50",
        f"--ServerApp.root_dir={root_dir}",
        f"--IdentityProvider.token={token}",
        "--ServerApp.password=",
        "--ServerApp.allow_remote_access=False",
        "--ServerApp.open_browser=False",
        "--ServerApp.terminals_enabled=False",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
        "--LabApp.expose_app_in_browser=True",
        "--JupyterNotebookApp.expose_app_in_browser=True",
        f"--LabApp.workspaces_dir={home / 'workspaces'}",
        f"--LabApp.user_settings_dir={home / 'settings'}",
        "--ServerApp.jpserver_extensions={'jupyter_lsp': False}",
        # kernels: restart quickly, shut down on exit
        "--MappingKernelManager.cull_idle_timeout=0",
    ] + list(extra_args or [])
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")  # CI and dev containers run as root

    log_path = home / "lab.log"
    logf = open(log_path, "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        args, cwd=root_dir, env=full_env, stdout=logf, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )
    lab = Lab(url="", token=token, root_dir=root_dir, proc=proc, home=home, log_path=log_path)
    try:
        # The real port (port_retries may move it) is in jpserver-PID.json.
        info_file = home / "runtime" / f"jpserver-{proc.pid}.json"
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {proc.returncode}:\n{lab.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"jupyter lab did not start in {startup_timeout}s:\n{lab.log()[-4000:]}")
            if info_file.exists():
                try:
                    info = json.loads(info_file.read_text())
                    lab.url = f"http://127.0.0.1:{info['port']}/"
                    lab.api("api/status", timeout=2)
                    break
                except (ValueError, KeyError, OSError, urllib.error.URLError):
                    pass
            time.sleep(0.1)
        lab.started_in = time.monotonic() - t0
        yield lab
    finally:
        _stop_lab(lab)
        logf.close()
        if os.environ.get("MOA_KEEP_LAB_LOG"):
            print(f"jupyter lab log kept in {log_path}", file=sys.stderr)
        else:
            shutil.rmtree(home, ignore_errors=True)


def _stop_lab(lab: Lab) -> None:
    proc = lab.proc
    kids = _descendants(proc.pid)  # kernels and anything they spawned
    if proc.poll() is None and lab.url:
        # Polite: shut down kernels over the API, then the server.
        with contextlib.suppress(Exception):
            for k in lab.api("api/kernels", timeout=5) or []:
                with contextlib.suppress(Exception):
                    lab.api(f"api/kernels/{k['id']}", method="DELETE", timeout=10)
        kids |= _descendants(proc.pid)
        with contextlib.suppress(Exception):
            lab.api("api/shutdown", method="POST", timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    # Leftovers: anything still alive from the server's tree or its session group.
    _kill_pids({p for p in kids if _alive(p)})
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        import psutil

        p = psutil.Process(pid)
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


# ----------------------------------------------------------------------------
# Browser
# ----------------------------------------------------------------------------


@dataclass
class Browser:
    playwright: object
    browser: object
    context: object
    console: list[str]
    page_errors: list[str]

    def new_page(self):
        page = self.context.new_page()
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        return page


@contextlib.contextmanager
def browser(*, viewport: dict | None = None, executable_path: str | None = None) -> Iterator[Browser]:
    """Headless Debian Chromium under Playwright, with a fresh profile dir."""
    from playwright.sync_api import sync_playwright

    exe = executable_path or CHROMIUM
    if not Path(exe).exists():
        raise FileNotFoundError(f"{exe} missing: run `bash .ci/install-browser.sh`")
    user_data = tempfile.mkdtemp(prefix="moa-chromium-")
    pw = sync_playwright().start()
    ctx = None
    try:
        ctx = pw.chromium.launch_persistent_context(
            user_data,
            executable_path=exe,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport=viewport or VIEWPORT,
            # keep everything local: no service workers caching across runs
            service_workers="block",
        )
        ctx.set_default_timeout(30_000)
        yield Browser(pw, None, ctx, [], [])
    finally:
        if ctx is not None:
            with contextlib.suppress(Exception):
                ctx.close()
        pw.stop()
        shutil.rmtree(user_data, ignore_errors=True)


# ----------------------------------------------------------------------------
# Page helpers
# ----------------------------------------------------------------------------

_JS_CURRENT = """
() => {
  const app = window.jupyterapp;
  if (!app) return null;
  const w = app.shell.currentWidget;
  return (w && w.sessionContext && w.content && w.content.widgets) ? w : null;
}
"""

_JS_STATE = """
() => {
  const app = window.jupyterapp;
  const w = app && app.shell.currentWidget;
  if (!w || !w.sessionContext) return {ready: false};
  const sc = w.sessionContext;
  const k = sc.session && sc.session.kernel;
  const prompts = Array.from(w.node.querySelectorAll('.jp-InputArea-prompt'))
                       .map(e => e.textContent.trim());
  return {
    ready: true,
    path: sc.path,
    kernelName: k ? k.name : null,
    status: k ? k.status : null,
    connection: k ? k.connectionStatus : null,
    busyPrompts: prompts.filter(p => p.includes('[*]')).length,
    dirty: w.context ? w.context.model.dirty : null,
    pendingInput: !!w.node.querySelector('.jp-Stdin'),
  };
}
"""


def notebook_state(page) -> dict:
    return page.evaluate(_JS_STATE)


def _dismiss_kernel_dialog(page) -> bool:
    """If JupyterLab asks which kernel to use, accept the default (Python 3)."""
    dlg = page.locator(SEL["dialog"])
    if dlg.count() == 0 or not dlg.first.is_visible():
        return False
    select = dlg.locator("select")
    if select.count():
        with contextlib.suppress(Exception):
            # choose the python3 option explicitly if present
            opts = select.first.locator("option").evaluate_all(
                "os => os.map(o => [o.value, o.textContent])"
            )
            for value, text in opts:
                if "python3" in value or "Python 3" in text:
                    select.first.select_option(value=value)
                    break
    page.locator(SEL["dialog_accept"]).first.click()
    return True


def open_notebook(page, lab: Lab, name: str, timeout: float = 90.0, ui: str = "lab") -> None:
    """Open NAME in the lab (or Notebook 7: ``ui="notebook"``), wait for an idle, connected kernel."""
    page.goto(lab.notebook_url(name, ui), wait_until="domcontentloaded")
    page.wait_for_function("() => !!window.jupyterapp", timeout=timeout * 1000)
    page.wait_for_selector(SEL["notebook"], timeout=timeout * 1000)
    deadline = time.monotonic() + timeout
    while True:
        _dismiss_kernel_dialog(page)
        st = notebook_state(page)
        if (
            st.get("ready")
            and st.get("path", "").endswith(name)
            and st.get("status") == "idle"
            and st.get("connection") == "connected"
        ):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"notebook {name} not ready: {st}\n{lab.log()[-3000:]}")
        page.wait_for_timeout(200)


def run_all_cells(page) -> None:
    """Run → Run All Cells (the same JupyterLab command the menu item runs).

    Returns as soon as the command is issued (it does not wait for the cells),
    so the caller can watch the DOM while cells run; follow with wait_idle().
    """
    page.evaluate(
        "() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); return true; }"
    )


def run_command(page, command: str, args: dict | None = None):
    return page.evaluate(
        "([c, a]) => window.jupyterapp.commands.execute(c, a || {})", [command, args]
    )


def wait_idle(page, timeout: float = 120.0, settle: float = 0.3) -> None:
    """Wait until the kernel is idle and no cell shows ``[*]`` (twice, *settle* apart)."""
    deadline = time.monotonic() + timeout
    calm_since = None
    while True:
        st = notebook_state(page)
        calm = st.get("status") == "idle" and st.get("busyPrompts") == 0
        now = time.monotonic()
        if calm:
            calm_since = calm_since or now
            if now - calm_since >= settle:
                return
        else:
            calm_since = None
        if now > deadline:
            raise TimeoutError(f"kernel not idle after {timeout}s: {st}")
        page.wait_for_timeout(100)


def save(page, timeout: float = 30.0) -> None:
    run_command(page, "docmanager:save")
    page.wait_for_function(
        "() => { const w = window.jupyterapp.shell.currentWidget;"
        " return w && w.context && !w.context.model.dirty; }",
        timeout=timeout * 1000,
    )


def restart_kernel(page, timeout: float = 60.0) -> None:
    """Restart the current kernel without the confirmation dialog."""
    page.evaluate(
        "async () => { await window.jupyterapp.shell.currentWidget.sessionContext.restartKernel(); }"
    )
    deadline = time.monotonic() + timeout
    while notebook_state(page).get("status") != "idle":
        if time.monotonic() > deadline:
            raise TimeoutError("kernel did not come back idle after restart")
        page.wait_for_timeout(200)


def close_current(page) -> None:
    """Close the current notebook tab (saved first, so no 'unsaved' dialog)."""
    page.evaluate(
        "async () => { const w = window.jupyterapp.shell.currentWidget;"
        " if (w) { await w.context.save(); w.dispose(); } }"
    )


def restart_kernel_and_reopen(page, lab: Lab, name: str, ui: str = "lab") -> None:
    """Restart the kernel, close the tab, reload the page and reopen NAME from disk."""
    restart_kernel(page)
    close_current(page)
    page.wait_for_timeout(200)
    open_notebook(page, lab, name, ui=ui)


def screenshot(page, path: Path | str, full_page: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=full_page)
    return path


def cell_outputs(page, index: int):
    """Locator for the output area of the INDEX-th cell of the current notebook."""
    return page.locator(SEL["cell"]).nth(index).locator(SEL["output_area"])


def read_notebook(lab: Lab, name: str) -> dict:
    return json.loads((lab.root_dir / name).read_text())
