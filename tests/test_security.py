"""Keys never leak, model text never drives the terminal.

A known key is set on provider `fakekey` (api_key_env = MOA_TEST_KEY); every kind of fault happens,
some with server messages that echo the key in full or in part, and every output is scanned: the
result (JSON, repr, str, text/Markdown/HTML renditions), events, errors, the live widget tree,
log records of every logger at DEBUG, the terminal renderer's streams and the `moa` CLI.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys

import pytest
from aiohttp import web

import moa_magic
from chat_server import Reply
from moa_magic.providers import client, redact
from moa_magic.core import runner
from moa_magic.errors import RunFailed
from moa_magic.render.static import result_text
from moa_magic.render.terminal import TerminalRenderer, terminal_safe

SECRET = "sk-live-SECRET123"
# Pieces a scan must not find either: the whole key and its secret part.
FORBIDDEN = [SECRET, "SECRET123", "ECRET12"]

SETTINGS = """
[settings]
retries = 1
connect_timeout = 1
first_byte_timeout = 0.5
chunk_timeout = 0.5
call_timeout = 3
backoff_base = 0.01
backoff_max = 0.02
"""


@pytest.fixture
def keyed(moa_config, monkeypatch):
    monkeypatch.setenv("MOA_TEST_KEY", SECRET)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    dead_port = sock.getsockname()[1]
    sock.close()
    moa_config.write_text(
        moa_config.read_text()
        + f'\n[providers.deadkey]\nbase_url = "http://127.0.0.1:{dead_port}/v1"\n'
        + 'api_key_env = "MOA_TEST_KEY"\n'
        + SETTINGS
    )
    return moa_config


def _echo_server_patch(chat_server, monkeypatch):
    """Replies the fake cannot script: 200 bodies that echo the key in odd places."""
    original = chat_server._respond

    async def respond(request, body, reply):
        model = body.get("model")
        auth = request.headers.get("Authorization", "")
        key = auth.removeprefix("Bearer ")
        if model == "json-error":
            return web.json_response({"error": {"message": f"Key {key} is disabled", "code": 401}})
        if model == "bad-json":
            return web.Response(text=f'{{"key": "{key}", ', content_type="application/json")
        if model == "html":
            return web.Response(text=f"<html><body>Sign in, {key}</body></html>",
                                content_type="text/html")
        if model == "plain":
            return web.Response(text=f"you sent {auth}", content_type="text/plain")
        if model == "bad-chunk":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(f'data: {{"auth": "{auth}", \n\n'.encode())
            await resp.write_eof()
            return resp
        return await original(request, body, reply)

    monkeypatch.setattr(chat_server, "_respond", respond)


FAULTS = {
    "401 partial echo": Reply(status=401, error_body={"error": {
        "message": "Incorrect API key provided: sk-live-***. You can find your API key at "
                   "https://platform.openai.com/account/api-keys.", "code": "invalid_api_key"}}),
    "401 full echo": Reply(status=401, error_body={"error": {
        "message": f"Incorrect API key provided: {SECRET}.", "code": "invalid_api_key"}}),
    "401 masked middle": Reply(status=401, error_body={"error": {
        "message": "Incorrect API key provided: sk-live-SECR*****T123."}}),
    "403 text": Reply(status=403, error_body=f"Forbidden for Bearer {SECRET}"),
    "429": Reply(status=429, headers={"Retry-After": "0"},
                 error_body={"error": {"message": f"Rate limit for key {SECRET}"}}),
    "500": Reply(status=500, error_body={"detail": f"crash while checking {SECRET}"}),
    "502 html": Reply(status=502, error_body=f"<html><h1>Bad Gateway</h1><p>{SECRET}</p></html>"),
    "400 context": Reply(status=400, error_body={"error": {
        "message": f"This model's maximum context length is 8192 tokens (key {SECRET})."}}),
    "error chunk": Reply(error_chunk={"message": f"key {SECRET} revoked mid-stream"}, error_after=1),
    "break": Reply(text="one two three four", break_after=2),
    "malformed": Reply(malformed_after=1),
    "no done": Reply(no_done=True, finish_reason=None),
    "empty choices": Reply(empty_choices=True),
    "html page": Reply(html_page=True),
    "hang": Reply(hang=True),
    "stall": Reply(text="a b c", chunk_delay=1.0),
}


def _run_and_collect(prompt, proposers, aggregator, caplog):
    """Run once with every renderer attached; return (result, every output as one string)."""
    from moa_magic.render.widgets import TreeRenderer

    progress, answer = io.StringIO(), io.StringIO()
    events = []
    options = dict(preset="fake", proposers=proposers, aggregator=aggregator)
    plan, _ = runner.prepare(prompt, **options)
    tree = TreeRenderer.for_plan(plan, interval=0.01)
    outputs = []
    try:
        result = moa_magic.run(
            prompt, listeners=[TerminalRenderer(progress, answer), events.append, tree], **options
        )
    except RunFailed as exc:
        result = exc.result
        outputs += [str(exc), repr(exc)]
    tree.close()

    def walk(widget):
        yield widget
        for child in getattr(widget, "children", ()):
            yield from walk(child)

    for widget in walk(tree.widget):
        outputs += [str(getattr(widget, "value", "")), repr(getattr(widget, "titles", ""))]
    outputs += [
        json.dumps(result.to_dict(), ensure_ascii=False),
        json.dumps(result.to_dict()),
        repr(result), str(result), result_text(result),
        result._repr_html_(), result._repr_markdown_(),
        progress.getvalue(), answer.getvalue(),
        *(repr(e) for e in events),
        *(repr(r) for r in result.calls()),
        *(caplog.text.splitlines()),
        *(r.getMessage() for r in caplog.records),
    ]
    return result, "\n".join(outputs)


def _assert_clean(blob: str) -> None:
    for piece in FORBIDDEN:
        assert piece not in blob, f"{piece!r} leaked: ...{blob[max(0, blob.find(piece) - 200):][:400]}"


@pytest.mark.parametrize("fault", list(FAULTS))
def test_no_fault_leaks_the_key(chat_server, keyed, caplog, fault):
    caplog.set_level(logging.DEBUG)  # every logger, moa_magic and aiohttp included
    chat_server.script(model="a", reply=FAULTS[fault])
    chat_server.script(model="agg", reply=FAULTS[fault])
    result, blob = _run_and_collect(
        f"fault {fault}", ["fakekey:a", "fakekey:b"], "fakekey:agg", caplog
    )
    # the key really was sent, so the scan means something
    assert chat_server.requests_for("a")[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert result.layers[0][0].status == "failed"
    assert result.status == "failed" and result.aggregator.status == "failed"
    _assert_clean(blob)


def test_echoing_replies_and_unexpected_errors_do_not_leak_the_key(
    chat_server, keyed, caplog, monkeypatch
):
    caplog.set_level(logging.DEBUG)
    _echo_server_patch(chat_server, monkeypatch)
    original = client._read_whole

    def exploding(text, provider, on_delta, reply):  # a bug that quotes the key
        if provider.name == "fakekey" and "weird" in text:
            raise RuntimeError(f"surprise with {provider.api_key()} inside")
        return original(text, provider, on_delta, reply)

    monkeypatch.setattr(client, "_read_whole", exploding)
    chat_server.script(model="weird", reply=Reply(text="weird", json_instead_of_sse=True))
    proposers = ["fakekey:json-error", "fakekey:bad-json", "fakekey:html", "fakekey:plain",
                 "fakekey:bad-chunk", "fakekey:weird", "deadkey:x", "fakekey:fine"]
    result, blob = _run_and_collect("echo", proposers, "fakekey:agg", caplog)
    errors = {r.model: r.error for r in result.layers[0]}
    assert errors["fakekey:json-error"] == "fakekey reported an error: Key *** is disabled"
    assert errors["fakekey:plain"].endswith("you sent Bearer ***")
    assert errors["fakekey:weird"] == "unexpected error: RuntimeError: surprise with *** inside"
    assert "cannot connect" in errors["deadkey:x"]
    assert result.ok and result.layers[0][-1].ok
    assert "unexpected error in call fakekey:weird" in caplog.text  # logged, with a traceback
    _assert_clean(blob)


def test_partial_key_echo_stays_readable_but_a_full_echo_is_scrubbed(chat_server, keyed):
    chat_server.script(model="a", reply=FAULTS["401 partial echo"])
    chat_server.script(model="b", reply=FAULTS["401 full echo"])
    result = moa_magic.run("x", preset="fake", proposers=["fakekey:a", "fakekey:b", "fakekey:c"],
                           aggregator="fakekey:agg")
    a, b, _ = result.layers[0]
    assert a.error.startswith(
        "HTTP 401 from fakekey: Incorrect API key provided: sk-live-***. You can find"
    )
    assert b.error == (
        "HTTP 401 from fakekey: Incorrect API key provided: ***. — check the key in MOA_TEST_KEY"
    )


def test_redact_scrubs_the_key_and_long_pieces_of_it():
    key = "sk-proj-Abcdefghijklmnopqrstuvwxyz0123456789"
    assert redact.redact(f"a {key} b {key}", key) == "a *** b ***"
    assert redact.redact(f"tail {key[-20:]} head {key[:15]}", key) == "tail *** head ***"
    # what OpenAI echoes (prefix and the last four) stays: it identifies the key, not reveals it
    assert redact.redact("sk-proj-********6789", key) == "sk-proj-********6789"
    assert redact.redact("nothing here", key) == "nothing here"
    assert redact.redact("no key set", None) == "no key set"


def test_the_cli_never_prints_the_key(chat_server, keyed):
    for model, fault in [("a", "401 full echo"), ("b", "error chunk"), ("agg", "500")]:
        chat_server.script(model=model, reply=FAULTS[fault])
    env = dict(os.environ, MOA_MAGIC_CONFIG=str(keyed), MOA_TEST_KEY=SECRET)
    for extra in (["--json"], [], ["--list"]):
        done = subprocess.run(
            [sys.executable, "-m", "moa_magic", "--preset", "fake", "-p", "fakekey:a", "-p",
             "fakekey:b", "-a", "fakekey:agg", *extra, "leak?"],
            capture_output=True, text=True, env=env, timeout=60,
        )
        assert "Traceback" not in done.stderr
        _assert_clean(done.stdout + done.stderr)
    assert chat_server.requests_for("a")[0]["headers"]["Authorization"] == f"Bearer {SECRET}"


# --------------------------------------------------------------------------------------------
# Terminal: model text cannot move the cursor, retitle the window or plant a hyperlink.

HOSTILE_CHUNKS = [
    "plain ",
    "\x1b[31mred\x1b[0m ",
    "\x1b]8;;https://evil.example/\x1b\\click here\x1b]8;;\x1b\\ ",
    "\x1b]0;pwned title\x07",
    "\x1b[2J\x1b[H",  # clear screen, cursor home
    "bell\x07 back\x08space\rcr \x9b31mC1-CSI ",
    "\x1b[1",  # an escape sequence split across two deltas
    ";31mtail",
]


def _assert_inert(text: str) -> None:
    assert not any(ch in text for ch in "\x1b\x07\x08\r\x9b\x00"), repr(text)


def test_model_text_is_stripped_in_the_terminal(chat_server, moa_config):
    chat_server.script(model="agg", chunks=HOSTILE_CHUNKS)
    chat_server.script(model="b", status=400,
                       error_body={"error": {"message": "bad \x1b]8;;http://evil/\x07link\x1b]8;;\x07"}})
    progress, answer = io.StringIO(), io.StringIO()
    result = moa_magic.run("ansi", preset="fake", listeners=[TerminalRenderer(progress, answer)])
    assert result.final == "".join(HOSTILE_CHUNKS)  # the record keeps the raw text
    shown = answer.getvalue()
    _assert_inert(shown)
    _assert_inert(progress.getvalue())
    assert "evil" not in progress.getvalue() and "bad link" in progress.getvalue()
    assert "evil.example" not in shown and "pwned" not in shown
    assert shown.startswith("plain red click here bell backspacecr 31mC1-CSI ")
    _assert_inert(result_text(result))


def test_a_doctored_saved_run_replayed_on_the_terminal_stays_inert(chat_server, moa_config, tmp_path):
    """A saved file is untrusted: its model names and error go to the progress lines of
    `moa replay` (stderr) as plain text."""
    moa_magic.run("q", preset="fake").save(tmp_path / "run.json")
    data = json.loads((tmp_path / "run.json").read_text("utf-8"))
    for record in [*data["layers"][0], data["aggregator"]]:
        record["model"] = "fake:\x1b]0;pwned title\x07m\x1b[2J"
    data["status"], data["error"] = "failed", "gone \x1b]8;;https://evil.example/\x07here\x1b]8;;\x07"
    (tmp_path / "run.json").write_text(json.dumps(data), "utf-8")
    done = subprocess.run([sys.executable, "-m", "moa_magic", "replay", str(tmp_path / "run.json"),
                           "--speed", "50"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    _assert_inert(done.stdout)
    _assert_inert(done.stderr)
    assert "… aggregator fake:m" in done.stderr and "pwned" not in done.stderr
    assert "moa: the recorded run ended failed: gone here" in done.stderr


def test_the_clis_last_line_quotes_a_servers_error_inert(chat_server, moa_config):
    """A failed run's one `moa:` line quotes the proposers' errors: a server's text."""
    for model in "abc":
        chat_server.script(model=model, status=400,
                           error_body={"error": {"message": "bad \x1b]0;pwned title\x07 request"}})
    done = subprocess.run([sys.executable, "-m", "moa_magic", "--preset", "fake", "q"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    _assert_inert(done.stderr)
    assert done.stderr.splitlines()[-1].endswith("HTTP 400 from fake: bad  request")
    chat = subprocess.run([sys.executable, "-m", "moa_magic", "chat", "--preset", "fake"], input="q\n",
                          capture_output=True, text=True, timeout=60)
    assert chat.returncode == 0 and "(this turn is not in the history)" in chat.stderr
    _assert_inert(chat.stderr)


@pytest.mark.parametrize("text", HOSTILE_CHUNKS + ["".join(HOSTILE_CHUNKS)])
def test_terminal_safe_leaves_no_control_characters(text):
    _assert_inert(terminal_safe(text))
    assert all(ch in "\t\n" or ch.isprintable() for ch in terminal_safe(text))


def test_a_saved_notebook_never_holds_the_key(chat_server, tmp_path, monkeypatch):
    """Run the quickstart-like cells in a real kernel with a keyed provider that fails with an
    echo of the key, then scan every byte of the saved notebook (outputs and widget state)."""
    import nbformat
    from nbclient import NotebookClient
    from helpers import venv_kernel

    secret = "sk-live-NOTEBOOK-7c1d9e2f4a6b"
    config = tmp_path / "moa.toml"
    config.write_text(
        f'default_preset = "keyed"\n[providers.keyed]\nbase_url = "{chat_server.url}"\n'
        'api_key_env = "MOA_TEST_KEY"\n[settings]\nretries = 0\n'
        '[presets.keyed]\nlayers = [["keyed:a", "keyed:b"]]\naggregator = "keyed:agg"\n',
        "utf-8",
    )
    monkeypatch.setenv("MOA_MAGIC_CONFIG", str(config))
    monkeypatch.setenv("MOA_TEST_KEY", secret)
    chat_server.script(model="b", status=401,
                       error_body={"error": {"message": f"Incorrect API key provided: {secret}"}})
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%load_ext moa_magic"),
        nbformat.v4.new_code_cell("%moa list"),
        nbformat.v4.new_code_cell("%%moa\nWhat is the key?"),
        nbformat.v4.new_code_cell("_moa"),
        nbformat.v4.new_code_cell("print(_moa.to_dict())\n%moa usage"),
    ])
    NotebookClient(nb, kernel_name=venv_kernel(), timeout=120,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    saved = tmp_path / "saved.ipynb"
    nbformat.write(nb, saved)
    text = saved.read_text("utf-8")
    assert "Incorrect API key provided: ***" in text  # the failure is shown...
    assert "MOA_TEST_KEY set" in text
    assert secret not in text and secret[8:20] not in text  # ...without the key


HOSTILE_NAME = "evil\x1b]0;pwned\x07\x1b[2J"


@pytest.mark.parametrize("command", [
    ["--preset", "evil", "q"],  # the config's preset names are listed in the message
    ["--preset", "uses-provider", "q"],  # an unknown provider, named by the config
    ["--config", "{missing}", "q"],
    ["chat", "--config", "{missing}"],
    ["replay", "{missing}"],
    ["batch", "{missing}", "--out", "{out}"],
    ["cache", "info", "--config", "{missing}"],
    ["serve", "--config", "{missing}", "--port", "0"],
])
def test_a_moa_error_line_quoting_config_or_a_path_is_inert(tmp_path, command):
    """A `moa:` line for bad input quotes config values and paths, untrusted: one line, exit 2,
    no escape sequence reaches the terminal."""
    config = tmp_path / "moa.toml"
    config.write_text(
        f'[presets."{HOSTILE_NAME}"]\nlayers = [["local:x"]]\naggregator = "local:y"\n\n'
        f'[presets.uses-provider]\nlayers = [["{HOSTILE_NAME}:x"]]\naggregator = "local:y"\n'
        .replace("\x1b", "\\u001b").replace("\x07", "\\u0007"), "utf-8")
    paths = {"missing": str(tmp_path / f"{HOSTILE_NAME}.toml"), "out": str(tmp_path / "out.jsonl")}
    done = subprocess.run([sys.executable, "-m", "moa_magic", *(a.format(**paths) for a in command)],
                          capture_output=True, text=True, timeout=60, input="q\n",
                          env=dict(os.environ, MOA_MAGIC_CONFIG=str(config)))
    assert done.returncode == 2, done.stderr
    _assert_inert(done.stderr)
    [line] = done.stderr.splitlines()
    assert line.startswith("moa: ") and "evil" in line


def _hostile_toml(text: str) -> str:
    """`text` with HOSTILE_NAME's control characters written as TOML escapes."""
    return text.replace("\x1b", "\\u001b").replace("\x07", "\\u0007")


# A config whose every listed name is hostile: a preset, its description, a model, a provider.
HOSTILE_PRESET = f"{HOSTILE_NAME}<img src=x onerror=alert(1)>"
HOSTILE_LISTING = _hostile_toml(
    f'[providers."{HOSTILE_NAME}<b>"]\nbase_url = "https://llm.example/v1"\napi_key_env = "EVIL_KEY"\n\n'
    f'[presets."{HOSTILE_PRESET}"]\ndescription = "{HOSTILE_NAME} described"\n'
    f'layers = [["local:{HOSTILE_NAME}"]]\naggregator = "local:y"\n'
)


def _assert_listing_inert(text: str) -> None:
    _assert_inert(text)
    assert "evil]0;pwned" not in text  # the OSC sequence is gone whole, not only its ESC
    assert "evil" in text and "described" in text


def test_moa_list_prints_hostile_config_names_inert(tmp_path):
    config = tmp_path / "moa.toml"
    config.write_text(HOSTILE_LISTING, "utf-8")
    done = subprocess.run([sys.executable, "-m", "moa_magic", "--list"], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, MOA_MAGIC_CONFIG=str(config)))
    assert done.returncode == 0, done.stderr
    _assert_listing_inert(done.stdout)


def test_moa_list_and_show_in_the_magic_are_inert_as_text_and_html(shell, tmp_path, monkeypatch):
    from IPython.utils.capture import capture_output

    from helpers import assert_inert_html

    config = tmp_path / "moa.toml"
    config.write_text(HOSTILE_LISTING, "utf-8")
    monkeypatch.setenv("MOA_MAGIC_CONFIG", str(config))
    with capture_output() as cap:
        shell.run_cell("%moa list").raise_error()
        shell.run_cell(f"%moa show {HOSTILE_PRESET}").raise_error()
    assert len(cap.outputs) == 2
    for output in cap.outputs:
        _assert_listing_inert(output.data["text/plain"])
        assert_inert_html(output.data["text/html"])
        assert "&lt;img src=x onerror=alert(1)&gt;" in output.data["text/html"]


@pytest.mark.parametrize("cell", [
    "%%moa --preset nope\nq",  # the config's preset names are listed in the message
    "%moa cache info",  # a config file that cannot be read, named by its path
    "%%moa --preset fake\nq",  # no final answer: the proposers' errors, a server's text
])
def test_the_magics_usage_errors_reach_a_terminal_inert(shell, write_moa_toml, chat_server, tmp_path,
                                                       monkeypatch, cell):
    """In terminal IPython a UsageError is printed as it is: its quotes of config values, paths and
    servers' errors lose their escape sequences at the magics' edge."""
    from IPython.core.error import UsageError
    from IPython.utils.capture import capture_output

    from helpers import FAKE_PRESET, FAKE_PROVIDER, NO_RETRIES

    write_moa_toml("\n".join([FAKE_PROVIDER, FAKE_PRESET, NO_RETRIES]) + _hostile_toml(
        f'[presets."{HOSTILE_NAME}"]\nlayers = [["fake:x"]]\naggregator = "fake:y"\n'
    ).replace("{", "{{").replace("}", "}}"))
    if cell.startswith("%moa cache"):
        monkeypatch.setenv("MOA_MAGIC_CONFIG", str(tmp_path / f"{HOSTILE_NAME}.toml"))
    chat_server.script(status=400, error_body={"error": {"message": f"bad {HOSTILE_NAME} request"}})
    with capture_output() as cap:
        outcome = shell.run_cell(cell)
    error = outcome.error_in_exec
    assert type(error) is UsageError
    _assert_inert(str(error))
    _assert_inert(cap.stderr)
    assert "evil" in str(error) and "]0;pwned" not in str(error)
    assert cap.stderr.startswith("UsageError: ") and "Traceback" not in cap.stderr
