"""`%%moa` and `%moa` in a real IPython shell against the loopback chat server."""

from __future__ import annotations

import _thread
import json
import subprocess
import sys
import threading

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from moa_magic.core import runner
from moa_magic.notebook.magics import MoaMagics
from moa_magic.options import RUN_OPTIONS

from chat_server import Reply, last_user_message
from helpers import (
    FAKE_PRESET, FAKE_PROVIDER, FAKEKEY_PROVIDER, NO_RETRIES, dom_classes, stair_aggregator, stair_server,
    main_thread_in, wait_until,
)

MAGIC_TOML = "\n".join([FAKE_PROVIDER, FAKEKEY_PROVIDER, NO_RETRIES, FAKE_PRESET]) + """
[presets.other]
description = "two proposers"
layers = [["fake:x", {{ model = "fake:y", temperature = 0.1 }}]]
aggregator = "fake:agg2"
system = "Be brief."

[presets.keyed]
layers = [["fakekey:a"]]
aggregator = "fakekey:agg"
"""


@pytest.fixture
def config(write_moa_toml):
    return write_moa_toml(MAGIC_TOML)


def magics(ip) -> MoaMagics:
    return ip.magics_manager.registry["MoaMagics"]


def run(ip, cell: str):
    """Run a cell; raise whatever it raised (a test shell that does not swallow errors)."""
    with capture_output() as cap:
        result = ip.run_cell(cell)
    result.raise_error()
    return cap


def run_error(ip, cell: str) -> tuple[BaseException, object]:
    with capture_output() as cap:
        result = ip.run_cell(cell)
    assert result.error_in_exec is not None, f"no error from {cell!r}"
    return result.error_in_exec, cap


def user_turns(server) -> list[str]:
    return [last_user_message(r["body"]) for r in server.chat_requests]


# --- extension life cycle ----------------------------------------------------------------------


def test_load_unload_reload(config, chat_server):
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "moa_magic")
    try:
        assert ip.find_cell_magic("moa") is not None and ip.find_line_magic("moa") is not None
        ip.run_line_magic("load_ext", "moa_magic")  # twice: still one instance
        for _ in range(2):
            ip.run_line_magic("reload_ext", "moa_magic")
        mine = [c for c in ip.configurables if type(c).__name__ == "MoaMagics"]
        assert len(mine) == 1 and ip.magics_manager.registry["MoaMagics"] is mine[0]
        run(ip, "%%moa --preset fake\nhello")
        assert ip.user_ns["_moa"].ok
    finally:
        ip.run_line_magic("unload_ext", "moa_magic")
    assert ip.find_cell_magic("moa") is None and ip.find_line_magic("moa") is None
    assert not [c for c in ip.configurables if type(c).__name__ == "MoaMagics"]
    assert "MoaMagics" not in dict.keys(ip.magics_manager.registry)
    ip.user_ns.pop("_moa", None)


def test_unload_before_the_preload_reaches_the_worker_leaves_it_stopped(monkeypatch):
    from moa_magic.notebook import magics as magics_module

    ip = InteractiveShell.instance()
    unloaded, preloads = threading.Event(), []
    preload = magics_module._preload

    def preload_after_unload(instance):  # the preload thread, held back until unload is done
        preloads.append(threading.current_thread())
        unloaded.wait(10)
        preload(instance)

    monkeypatch.setattr(magics_module, "_preload", preload_after_unload)
    ip.run_line_magic("load_ext", "moa_magic")
    ip.run_line_magic("unload_ext", "moa_magic")
    unloaded.set()
    wait_until(lambda: preloads, "the preload thread started")
    [thread] = preloads
    thread.join(10)
    assert not thread.is_alive()
    assert not runner.worker.started  # unload stopped it, and nothing started it again


def test_load_ext_returns_at_once_and_loads_the_first_run_beside():
    # which thread imported each heavy module: none may be the one `%load_ext` runs on
    code = (
        "import json, sys, threading, time\n"
        "heavy = {'aiohttp', 'moa_magic.core.engine', 'moa_magic.core.runner',"
        " 'moa_magic.render.static'}\n"
        "where = {}\n"
        "class Spy:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name in heavy:\n"
        "            where.setdefault(name, threading.current_thread().name)\n"
        "sys.meta_path.insert(0, Spy())\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "ip = InteractiveShell.instance()\n"
        "ip.run_line_magic('load_ext', 'moa_magic')\n"
        "deadline = time.monotonic() + 60\n"
        "while set(where) != heavy and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n"
        "print(json.dumps(where))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    where = json.loads(out.stdout)
    assert set(where) == {"aiohttp", "moa_magic.core.engine", "moa_magic.core.runner",
                          "moa_magic.render.static"}, out.stderr
    assert "MainThread" not in where.values(), where


def test_cell_help_comes_from_magic_arguments(shell):
    cap = run(shell, "%%moa?")
    text = cap.stdout + "".join(str(o.data) for o in cap.outputs)
    for flag in ("--preset", "--out NAME", "--temperature", "--max-tokens", "{{name}}"):
        assert flag in text
    for flags, _ in RUN_OPTIONS:
        assert flags[-1] in shell.find_cell_magic("moa").__doc__


# --- running ------------------------------------------------------------------------------------


def test_run_sets_moa_and_out_and_shows_static(shell, config, chat_server):
    cap = run(shell, "%%moa --preset fake --out answer\nWhy is the sky blue?")
    result = shell.user_ns["_moa"]
    assert shell.user_ns["answer"] is result
    assert result.ok and result.final == "agg says: Why is the sky blue?"
    assert len(chat_server.chat_requests) == 4
    # terminal shell: streamed text, no rich static output and no Out[] value
    assert "agg says: Why is the sky blue?" in cap.stdout
    assert "total: 4 calls" in cap.stdout
    assert shell.user_ns.get("_") is not result


def test_interpolation_double_braces_only(shell, config, chat_server):
    shell.user_ns.update(topic="tides", cfg={"lang": "French"})
    shell.user_ns["obj"] = type("Obj", (), {"name": "Moon"})()
    run(shell, "%%moa --preset fake\nExplain {{topic}} and {{ obj.name }} in {{cfg.lang}}; "
               "keep {x}, $topic, \\{{topic}} and {{#each}} as written")
    assert user_turns(chat_server)[0] == (
        "Explain tides and Moon in French; keep {x}, $topic, {{topic}} and {{#each}} as written"
    )


def test_line_is_not_expanded(shell, config, chat_server):
    shell.user_ns["x"] = "EXPANDED"
    run(shell, '%%moa --preset fake --system "{x} and $x" --aggregator-prompt \'Combine: {{x}}\'\nhi')
    system = chat_server.chat_requests[0]["body"]["messages"][0]
    assert system == {"role": "system", "content": "{x} and $x"}
    assert shell.user_ns["_moa"].template == "Combine: {{x}}"


def test_interpolation_refuses_private_attributes_and_unknown_names(shell, config, chat_server):
    shell.user_ns.update(x=1, _moa="last")
    for placeholder, message in [("{{nope}}", "no variable 'nope'"),
                                 ("{{x.__class__}}", "starting with '_'"),
                                 ("{{x.zz}}", "has no attribute or key 'zz'")]:
        error, _ = run_error(shell, f"%%moa --preset fake\n{placeholder}")
        assert type(error) is UsageError and message in str(error)
    assert chat_server.chat_requests == []
    run(shell, "%%moa --preset fake\n{{ _moa }}")
    assert user_turns(chat_server)[0] == "last"


def test_options_reach_the_requests(shell, config, chat_server):
    run(shell, "%%moa --preset fake -p fake:m1 -p fake:m2 -a fake:boss -l 3 -t 0.3 --max-tokens 77\nQ")
    models = [r["body"]["model"] for r in chat_server.chat_requests]
    assert sorted(models[:2]) == sorted(models[2:4]) == ["m1", "m2"] and models[4] == "boss"
    assert {r["body"]["temperature"] for r in chat_server.chat_requests} == {0.3}
    assert {r["body"]["max_tokens"] for r in chat_server.chat_requests} == {77}
    assert shell.user_ns["_moa"].shape == "3 layers: 2×2 proposers + aggregator"


def test_config_traits_are_defaults_and_flags_win(shell, config, chat_server):
    run(shell, "%config MoaMagics.preset = 'other'")
    run(shell, "%config MoaMagics.temperature = 1.5")
    run(shell, "%config MoaMagics.max_tokens = 33")
    run(shell, "%config MoaMagics.system = 'Pirate.'")
    run(shell, "%%moa\nQ")
    bodies = [r["body"] for r in chat_server.chat_requests]
    assert sorted(b["model"] for b in bodies) == ["agg2", "x", "y"]
    assert {b["temperature"] for b in bodies} == {1.5} and {b["max_tokens"] for b in bodies} == {33}
    assert bodies[0]["messages"][0] == {"role": "system", "content": "Pirate."}
    chat_server.reset()
    run(shell, "%%moa --preset fake -t 0.2\nQ")
    bodies = [r["body"] for r in chat_server.chat_requests]
    assert sorted(b["model"] for b in bodies) == ["a", "agg", "b", "c"]
    assert {b["temperature"] for b in bodies} == {0.2} and {b["max_tokens"] for b in bodies} == {33}


@pytest.mark.parametrize("line, allowed", [
    ("MoaMagics.temperature = 3", "from 0 to 2"),
    ("MoaMagics.max_tokens = 0", "at least 1"),
    ("MoaMagics.preset = 'no such; thing'", "preset name"),
    ("MoaMagics.config_file = '/no/such/moa.toml'", "existing moa.toml"),
])
def test_config_trait_validation(shell, line, allowed, caplog):
    """%config reports a TraitError as a logged error (traitlets' behaviour); the value stays."""
    trait = line.split(".")[1].split()[0]
    before = getattr(magics(shell), trait)
    run(shell, f"%config {line}")
    assert allowed in caplog.text
    assert getattr(magics(shell), trait) == before


def test_config_file_trait(shell, config, chat_server, monkeypatch, tmp_path):
    monkeypatch.delenv("MOA_MAGIC_CONFIG")
    error, _ = run_error(shell, "%%moa --preset fake\nQ")
    assert isinstance(error, UsageError)
    run(shell, f"%config MoaMagics.config_file = {str(config)!r}")
    run(shell, "%%moa --preset fake\nQ")
    assert shell.user_ns["_moa"].ok


def test_widgets_frontend_through_the_magic(shell, config, chat_server, monkeypatch):
    monkeypatch.setattr(MoaMagics, "frontend", lambda self: "widgets")
    cap = run(shell, "%%moa --preset fake\nQ")
    tree = magics(shell).last_tree
    assert tree is not None and tree.final_widget.value.startswith("<p>agg says: Q")
    # one output: the widget, then the finished view put in its place (same display id)
    live, finished = cap.outputs
    assert "application/vnd.jupyter.widget-view+json" in live.data and not live.update
    assert finished.update and finished.transient["display_id"] == live.transient["display_id"]
    assert set(finished.data) == {"text/plain", "text/markdown", "text/html"}
    assert "agg says: Q" in finished.data["text/html"]
    assert "moa-view" in finished.data["text/html"]
    # the tree's widgets are closed once their view is replaced
    assert tree.widget.comm is None and tree.final_widget.comm is None


def test_kernel_without_tree_prints_progress_then_static(shell, config, chat_server, monkeypatch):
    monkeypatch.setattr(shell, "kernel", object(), raising=False)
    run(shell, "%config MoaMagics.show_tree = False")
    assert magics(shell).frontend() == "text"
    cap = run(shell, "%%moa --preset fake\nQ")
    assert "✓ L1.1" in cap.stdout and "agg says" not in cap.stdout  # the answer is not streamed
    assert "agg says: Q" in cap.outputs[-1].data["text/html"]
    run(shell, "%config MoaMagics.show_tree = True")
    assert magics(shell).frontend() == "widgets"


# --- user errors: UsageError, and no request --------------------------------------------------


@pytest.mark.parametrize("cell, message", [
    ("%%moa --preset fake\n   \n", "prompt is empty"),
    ("%%moa --preset nope\nQ", "Unknown preset 'nope'"),
    ("%%moa --bogus\nQ", "unrecognized arguments: --bogus"),
    ("%%moa -t hot\nQ", "invalid float value"),
    ("%%moa --preset fake -t 5\nQ", "from 0 to 2"),
    ("%%moa --preset fake -p nocolon\nQ", "not of the form provider:model"),
    ("%%moa --preset fake -p zzz:m\nQ", "Unknown provider 'zzz'"),
    ("%%moa --preset keyed\nQ", "MOA_TEST_KEY"),
    ("%%moa --preset fake\nTell me about {{undefined_thing}}", "no variable 'undefined_thing'"),
    ("%%moa --preset fake --out 'not a name'\nQ", "--out needs a Python variable name"),
    ('%%moa --preset "fake\nQ', "Cannot read the options"),
])
def test_user_errors_are_usage_errors_before_any_request(shell, config, chat_server, cell, message):
    error, cap = run_error(shell, cell)
    assert type(error) is UsageError, repr(error)
    assert message in str(error)
    assert chat_server.chat_requests == []


def test_argparse_error_includes_usage(shell, config):
    error, _ = run_error(shell, "%%moa --layers many\nQ")
    assert "%%moa [--preset PRESET]" in str(error) and "argument -l/--layers" in str(error)
    assert "::" not in str(error)


def test_usage_error_shows_one_line_without_traceback(shell, config, capsys):
    result = shell.run_cell("%%moa --preset nope\nQ")
    err = capsys.readouterr().err
    assert isinstance(result.error_in_exec, UsageError)
    assert err.startswith("UsageError: Unknown preset 'nope'") and "Traceback" not in err


# --- failed and interrupted runs ----------------------------------------------------------------


def test_run_without_final_answer(shell, config, chat_server):
    chat_server.script(reply=Reply(status=500))
    error, cap = run_error(shell, "%%moa --preset fake --out partial\nQ")
    assert type(error) is UsageError
    assert str(error).startswith("No final answer (failed): layer 1: 0 of 3 proposers succeeded")
    assert "partial run is in _moa" in str(error)
    result = shell.user_ns["_moa"]
    assert shell.user_ns["partial"] is result
    assert result.status == "failed" and all(r.status == "failed" for r in result.layers[0])
    assert result.aggregator.status == "skipped"


def test_interrupt_cancels_stores_partial_result_and_ends_in_one_line(shell, config, chat_server, monkeypatch):
    monkeypatch.setattr(MoaMagics, "frontend", lambda self: "widgets")
    chat_server.script(model="a", reply=Reply(text="quick"))
    chat_server.script(reply=Reply(hang=True))

    def interrupt():  # once a's quick answer is in, while b and c hang
        chat_server.wait_for_requests(3, timeout=10)  # this run has started: last_result() is it
        wait_until(lambda: runner.last_result().layers[0][0].status == "done"
                   and main_thread_in(runner.wait), "a answered")
        _thread.interrupt_main()

    threading.Thread(target=interrupt, daemon=True).start()
    error, cap = run_error(shell, "%%moa --preset fake --out partial\nQ")
    # a UsageError: IPython prints this one line, no KeyboardInterrupt traceback
    assert type(error) is UsageError
    assert str(error) == "Run cancelled (interrupted): the partial result is in _moa and partial."
    result = shell.user_ns["_moa"]
    assert shell.user_ns["partial"] is result
    assert "Traceback" not in cap.stderr + cap.stdout and "KeyboardInterrupt" not in cap.stderr
    assert result.status == "cancelled"
    assert [r.status for r in result.layers[0]] == ["done", "cancelled", "cancelled"]
    tree = magics(shell).last_tree
    assert ">cancelled<" in tree.header.value
    assert "moa-status-cancelled" in dom_classes(tree.nodes[(1, 1)].section)
    assert tree.layer_sections[0].selected_index == 0
    static = cap.outputs[-1]
    assert static.update and "cancelled" in static.data["text/plain"]
    assert 'data-status="cancelled"' in static.data["text/html"]
    # every request was cancelled: nothing is left in flight
    chat_server.wait_for_requests(3, timeout=5, finished=True)
    assert chat_server.in_flight == 0


# --- %moa subcommands ------------------------------------------------------------------------------


def test_moa_list_shows_key_status_never_the_key(shell, config, monkeypatch):
    monkeypatch.setenv("MOA_TEST_KEY", "sk-very-secret-value")
    cap = run(shell, "%moa list")
    data = cap.outputs[0].data
    for form in ("text/plain", "text/html"):
        assert "sk-very-secret-value" not in data[form]
        assert "MOA_TEST_KEY set" in data[form] and "OPENAI_API_KEY not set" in data[form]
        assert "fake" in data[form] and "other" in data[form]


def test_moa_list_marks_the_default_and_probes_local_servers(shell, config, chat_server, monkeypatch):
    """A server on this machine shows whether it answers now, not a ✓ for a key it does not need."""
    import socket

    with socket.socket() as closed:  # a loopback port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{port}")
    monkeypatch.setattr(MoaMagics, "preset", "")
    config.write_text('default_preset = "other"\n' + config.read_text())
    data = run(shell, "%moa list").outputs[0].data
    text = data["text/plain"]
    fake_at = chat_server.url.split("//")[1].split("/")[0]
    assert f"✓ fake        answers at {fake_at}" in text
    assert f"✗ ollama      nothing answers at 127.0.0.1:{port}" in text
    assert "* other " in text and "* fake " not in text
    assert "<code>other</code> <b>(default)</b>" in data["text/html"]


def test_moa_show(shell, config):
    cap = run(shell, "%moa show other")
    text = cap.outputs[0].data["text/plain"]
    assert "Preset other:" in text and "two proposers" in text
    assert "fake:x, fake:y (temperature 0.1)" in text and "fake:agg2" in text
    assert "Be brief." in text and "the MoA paper's default" in text
    assert "<table>" in cap.outputs[0].data["text/html"]
    error, _ = run_error(shell, "%moa show nope")
    assert type(error) is UsageError and "Presets: fake, " in str(error)


def test_moa_show_defaults_to_the_default_preset(shell, config):
    run(shell, "%config MoaMagics.preset = 'other'")
    run(shell, "%config MoaMagics.temperature = 0.4")
    text = run(shell, "%moa show").outputs[0].data["text/plain"]
    assert "Preset other:" in text and "this notebook: temperature" in text


def test_moa_last(shell, config, chat_server, monkeypatch):
    monkeypatch.setattr(runner, "_last_result", None)
    error, _ = run_error(shell, "%moa last")
    assert type(error) is UsageError and "No run yet" in str(error)
    run(shell, "%%moa --preset fake\nQ")
    # a terminal (this shell has no kernel): every proposer's text by layer, then the answer
    printed = run(shell, "%moa last").stdout
    assert printed.index("── L1.1 fake:a · done") < printed.index("a says: Q") < printed.index(
        "── L1.3 fake:c") < printed.index("── Answer") < printed.index("agg says: Q")
    monkeypatch.setattr(MoaMagics, "frontend", lambda self: "widgets")
    cap = run(shell, "%moa last")  # a notebook: the finished view
    assert "agg says: Q" in cap.outputs[0].data["text/html"] and "moa-view" in cap.outputs[0].data["text/html"]


def test_show_proposers_in_a_terminal(shell, config, chat_server):
    """`--show-proposers` (terminal IPython): each layer's texts in order, then the answer."""
    out = run(shell, "%%moa --preset fake --show-proposers\nQ").stdout
    assert out.index("══ Layer 1 ══") < out.index("── L1.1 fake:a") < out.index("a says: Q")
    assert out.index("a says: Q") < out.index("── L1.2 fake:b") < out.index("b says: Q")
    assert out.index("c says: Q") < out.index("══ Answer ══") < out.index("agg says: Q")
    assert "══ Layer" not in run(shell, "%%moa --preset fake\nQ").stdout


def test_staircase_in_a_terminal(shell, write_moa_toml, chat_server):
    """--staircase with --show-proposers: the steps' lines on lines of their own, the answer, the
    last layer (it ended while the answer was written), the staircase; `%moa last` shows it too."""
    stair_server(write_moa_toml, chat_server, stair_aggregator(3))
    out = run(shell, "%%moa --preset stair --staircase --staircase-chunk 4 --show-proposers\nQ").stdout
    lines = out.splitlines()
    assert [line for line in lines if "⋯ aggregator" in line][:2] == [
        line for line in lines if line.startswith("  ⋯ aggregator staircase step ")][:2]
    assert out.index("══ Answer ══") < out.index("══ Layer 1 ══") < out.index("── Staircase:")
    assert "step 1 · chars 1–3 · saw L1.1 " in out and "│  s1" in out
    last = run(shell, "%moa last").stdout
    assert last.index("── Answer") < last.index(" s1 s2 s3 end.") < last.index("── Staircase:")
    assert "step 4 · chars 10–14 · saw L1.1 " in last


def test_moa_result_displays_with_its_reprs(shell, config, chat_server):
    run(shell, "%%moa --preset fake\nQ")
    data, _ = shell.display_formatter.format(shell.user_ns["_moa"])
    assert {"text/plain", "text/html", "text/markdown"} <= set(data)
    assert data["text/plain"].startswith("MoA · preset fake")
    assert "agg says: Q" in data["text/html"]
    assert "MoA · preset fake" in run(shell, "_moa").stdout


def test_moa_usage(shell, config, chat_server):
    from moa_magic.accounting import usage

    usage.reset_session()  # the ledger is the process's: earlier tests' runs are in it
    run(shell, "%%moa --preset fake\nQ")
    shown = run(shell, "%moa usage").outputs[-1].data
    assert shown["text/plain"].startswith("moa session: 1 runs (1 done, 0 failed, 0 cancelled) · 4 calls")
    for model in ("fake:a", "fake:b", "fake:c", "fake:agg"):
        assert f"<td style='text-align:left'>{model}</td><td style='text-align:right'>1</td>" in shown["text/html"]


def test_dry_run(shell, config, chat_server):
    shown = run(shell, "%%moa --preset fake --dry-run\nQ").outputs[-1].data["text/plain"]
    assert shown.startswith("moa estimate · preset fake · 2 layers: 3 proposers + aggregator · nothing sent")
    assert "\ntotal           4 " in shown
    assert chat_server.chat_requests == []


def test_moa_help_and_version(shell):
    out = run(shell, "%moa help").stdout
    assert "%moa list" in out and "--preset" in out and "MoaMagics.temperature" in out
    assert "MoaMagics.show_tree" in out
    assert run(shell, "%moa").stdout == out  # bare %moa is help
    from moa_magic import __version__

    assert run(shell, "%moa version").stdout.strip() == f"moa-magic {__version__}"


def test_unknown_subcommand(shell):
    error, _ = run_error(shell, "%moa frobnicate")
    assert type(error) is UsageError
    assert str(error).startswith("Unknown %moa command 'frobnicate'; valid: list, show, last, usage, cache, replay, chat, help, version.")
    error, _ = run_error(shell, "%moa --preset fake what is this")
    assert "%%moa [options] on the first line" in str(error)
