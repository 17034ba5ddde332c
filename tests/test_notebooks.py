"""Every notebook in notebooks/ runs unattended in a real kernel against the loopback server."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import FAKE_PRESET, FAKE_PROVIDER, venv_kernel

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))

# `default_preset = "fake"`: the notebooks use the default preset, which on a fresh machine is the
# embedded local model. `local` is redefined here so `--preset local` also runs against the server.
NOTEBOOK_TOML = "\n".join(['default_preset = "fake"\n', FAKE_PROVIDER, FAKE_PRESET]) + """
[presets.local]
description = "the embedded model, replaced by the fake server in the tests"
layers = [["fake:l1", "fake:l2"]]
aggregator = "fake:lagg"

[providers.local]
# evaluate.ipynb names the local model as its baseline and judge: the fake server answers here
base_url = "{url}"
"""


@pytest.fixture
def notebook_config(write_moa_toml):
    return write_moa_toml(NOTEBOOK_TOML)  # the kernel inherits MOA_MAGIC_CONFIG


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["quickstart.ipynb"] or NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, notebook_config, chat_server, tmp_path):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, kernel_name=venv_kernel(), timeout=120, startup_timeout=60,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for output in cell.outputs:
            assert output.output_type != "error", output
            if output.output_type == "stream":
                assert output.name != "stderr" or not output.text.strip(), output.text
    if path.name == "quickstart.ipynb":
        check_quickstart(nb, chat_server)
    if path.name == "replay.ipynb":
        check_replay(nb, chat_server)
    if path.name == "evaluate.ipynb":
        check_evaluate(nb, chat_server)


def check_evaluate(nb, chat_server):
    """Six questions, each a mixture + a baseline + two judge calls, all on the `local` names."""
    texts = [o.get("data", {}).get("text/plain", "") for c in nb.cells if c.cell_type == "code"
             for o in c.outputs]
    assert any("6 done" in t for t in texts), texts
    assert any("local:smollm2" in t and "win rate" in t for t in texts), texts
    baseline_calls = [r for r in chat_server.chat_requests if r["body"]["model"] == "smollm2"]
    assert len(baseline_calls) == 6 * 3  # one baseline and two judge calls per question


def check_replay(nb, chat_server):
    cells = {c.source.splitlines()[0]: c for c in nb.cells if c.cell_type == "code" and c.source}

    def html(first_line: str) -> str:
        outputs = cells[first_line].outputs
        return [o for o in outputs if "text/html" in o.get("data", {})][-1]["data"]["text/html"]

    bundled = cells["%moa replay demo-run.json --speed 8"].outputs
    assert all("application/vnd.jupyter.widget-view+json" not in o.get("data", {}) for o in bundled)
    assert "replay at ×8 of a run from" in html("%moa replay demo-run.json --speed 8")
    assert "preset local" in html("%moa replay demo-run.json --speed 8")
    printed = "".join(o.get("text", "") for o in cells["for call in _moa.layers[0]:"].outputs)
    assert printed.count("local:smollm2") == 3
    cached = "".join(o.get("text", "") for o in cells["print([call.cached for call in _moa.calls()], _moa.totals()[\"cost_usd\"])"].outputs)
    assert cached.strip() == "[True, True, True, True] 0.0"
    assert "replay at ×2 of a run from" in html("%moa replay my-run.json --speed 2")
    assert len(chat_server.chat_requests) == 4  # the first %%moa only: the rerun and replays sent nothing


def check_quickstart(nb, chat_server):
    cells = {c.source.splitlines()[0]: c for c in nb.cells if c.cell_type == "code" and c.source}
    run = cells["%%moa"].outputs
    # one output: the live tree was replaced in place by the finished view (no widget left)
    [only] = [o for o in run if o.output_type == "display_data"]
    assert set(only["data"]) == {"text/plain", "text/markdown", "text/html"}
    static = only["data"]["text/html"]
    assert "moa-view" in static and "agg says: In two sentences: why is the sky blue?" in static
    check_exported_html(nb)

    printed = "".join(o.get("text", "") for o in cells["print(_moa.final)"].outputs)
    assert "agg says: In two sentences" in printed
    assert "ocean tides" in str(cells["tides.prompt"].outputs[0]["data"]["text/plain"])
    assert "Preset local:" in cells["%moa show local"].outputs[0]["data"]["text/plain"]
    models = [r["body"]["model"] for r in chat_server.chat_requests]
    assert models.count("lagg") == 1 and models.count("l1") == 2  # --preset local --layers 3
    assert "this notebook: temperature" in cells["%config MoaMagics.temperature = 0.3"].outputs[0]["data"]["text/plain"]


def check_exported_html(nb):
    """`jupyter nbconvert --to html` of the executed notebook: every run's finished view, readable,
    and no widget error, repr or script."""
    from nbconvert import HTMLExporter

    runs = sum(1 for c in nb.cells if c.cell_type == "code" and c.source.startswith("%%moa")
               and "--dry-run" not in c.source.splitlines()[0])
    page, _ = HTMLExporter().from_notebook_node(nb)
    assert "VBox(" not in page and "Error displaying widget" not in page
    # no widget view in any output (nbclient keeps the closed tree's state in the metadata, so
    # the template still carries its widget loader; a notebook saved by JupyterLab has none)
    assert '<script type="application/vnd.jupyter.widget-view+json">' not in page
    assert page.count('<span class="moa-answer-label">Answer</span>') == runs
    assert len(re.findall(r'<svg [^>]*class="moa-timeline-svg"', page)) == runs  # attributes sorted
    assert "agg says: In two sentences: why is the sky blue?" in page
