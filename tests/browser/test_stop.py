"""The kernel's Stop button during a `%%moa` run, in a real JupyterLab.

Proposers stream slowly from a ChatServer in this process; while the live view shows their text the
test interrupts the kernel (what the toolbar's ■ does). The cell must end with the finished view
marked cancelled and one line saying so — no KeyboardInterrupt traceback —, Run All must stop
there, and `_moa` must hold the partial result for the next cell.
"""

from __future__ import annotations

import re
import time

import pytest
from nbformat.v4 import new_code_cell, new_notebook
import nbformat

from chat_server import Reply
from lab import cell_outputs, open_notebook, run_all_cells, running_lab, screenshot, wait_idle

pytestmark = pytest.mark.browser

NB = "stop.ipynb"
TOML = """\
default_preset = "slow"

[providers.demo]
base_url = "{url}"

[presets.slow]
layers = [["demo:slow1", "demo:slow2", "demo:slow3"], ["demo:slow1", "demo:slow2", "demo:slow3"]]
aggregator = "demo:agg"
"""
STATUS_CELL = "print(_moa.status, [r.status for r in _moa.layers[0]], len(_moa.layers[0][0].text) > 0)"


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def test_stop_ends_the_run_in_one_line_and_keeps_the_partial_result(lab_root, artifacts_dir, chat_server,
                                                                     chromium, page):
    words = [f"word{i} " for i in range(200)]
    chat_server.script(match=lambda body: body["model"].startswith("slow"),
                       reply=Reply(chunks=words, chunk_delay=0.1))
    config = lab_root / "moa.toml"
    config.write_text(TOML.format(url=chat_server.url), "utf-8")
    nb = new_notebook(cells=[
        new_code_cell("%load_ext moa_magic"),
        new_code_cell("%%moa\nCount slowly, one word at a time."),
        new_code_cell(STATUS_CELL),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, lab_root / NB)
    with running_lab(lab_root, env={"MOA_MAGIC_CONFIG": str(config)}) as lab:
        open_notebook(page, lab, NB)
        run_all_cells(page)
        run_cell = cell_outputs(page, 1)
        streaming = run_cell.locator(".moa-tree .moa-card .moa-streaming")
        streaming.first.wait_for(state="visible", timeout=60_000)
        page.wait_for_function(
            "() => (document.querySelector('.moa-tree .moa-streaming') || {}).textContent.length > 40")
        screenshot(page, artifacts_dir / "10-stop-live.png", full_page=False)

        stopped_at = time.monotonic()
        page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.interrupt()")
        wait_idle(page, timeout=30)
        stop_s = time.monotonic() - stopped_at

        run_cell.locator(".moa-view").wait_for(state="visible")
        view = run_cell.locator(".moa-view")
        assert view.get_attribute("data-status") == "cancelled"
        assert run_cell.locator(".moa-tree").count() == 0
        cancelled = view.locator('.moa-card[data-layer="1"].moa-status-cancelled')
        assert cancelled.count() == 3 and "word0" in cancelled.first.text_content()
        text = run_cell.text_content()
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-2000:]
        errors = [_norm(t) for t in run_cell.locator(".jp-OutputArea-output[data-mime-type*='stderr']").all_text_contents()]
        assert errors == ["UsageError: Run cancelled (interrupted): the partial result is in _moa."], errors
        # Run All stopped at the cancelled cell: the next cell did not run
        assert cell_outputs(page, 2).locator(".jp-OutputArea-output").count() == 0
        screenshot(page, artifacts_dir / "11-stopped.png", full_page=False)

        # the next cell runs normally and sees the partial result
        page.evaluate("""() => {
            const panel = window.jupyterapp.shell.currentWidget;
            panel.content.activeCellIndex = 2;
            return window.jupyterapp.commands.execute('notebook:run-cell');
        }""")
        wait_idle(page, timeout=30)
        printed = _norm(cell_outputs(page, 2).text_content())
        assert printed == "cancelled ['cancelled', 'cancelled', 'cancelled'] True", printed
        screenshot(page, artifacts_dir / "12-after-stop.png", full_page=False)
        assert not chromium.page_errors, chromium.page_errors
    chat_server.wait_for_requests(3, timeout=5, finished=True)
    assert chat_server.in_flight == 0
    print(f"\nStop → kernel idle in {stop_s:.2f}s")
