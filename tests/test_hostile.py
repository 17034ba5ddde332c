"""Hostile model output, servers and configs (issue 11), against the real loopback server and a
loopback forward proxy: nothing leaks, nothing hangs, nothing crashes."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from markdown_it import MarkdownIt

import moa_magic
from chat_server import ChatServer, Reply
from moa_magic.catalog import catalog_html, catalog_text
from moa_magic.config import load_config
from moa_magic.core import runner
from moa_magic.errors import ConfigError, RunFailed
from moa_magic.providers import client
from moa_magic.render.static import result_html, result_markdown, result_text
from moa_magic.render.widgets import TreeRenderer
from proxy_server import ForwardProxy

FAST = """
[settings]
retries = 0
connect_timeout = 2
first_byte_timeout = 3
chunk_timeout = 3
call_timeout = 20
"""


def write_config(tmp_path, monkeypatch, body: str):
    path = tmp_path / "moa.toml"
    path.write_text(body + FAST, "utf-8")
    monkeypatch.setenv("MOA_MAGIC_CONFIG", str(path))
    return path


def one_call(url: str, tmp_path, monkeypatch, extra: str = ""):
    """A run with one proposer `p:a` and aggregator `p:agg` at `url`; (result, error or None)."""
    write_config(tmp_path, monkeypatch, f'[providers.p]\nbase_url = "{url}"\n{extra}\n'
                 '[presets.one]\nlayers = [["p:a"]]\naggregator = "p:agg"\n')
    try:
        return moa_magic.run("q", preset="one"), None
    except RunFailed as exc:
        return exc.result, exc


# --- images in model output ----------------------------------------------------------------------

LEAK = "http://127.0.0.1:9/leak?d=secret"
HOSTILE_IMAGES = (
    f"Plain ![a]({LEAK}1) and ![ref][r] and [![inner]({LEAK}3)](https://example.org/) and "
    f"![proto](//127.0.0.1:9/leak4) and ![ent](&#104;ttp://127.0.0.1:9/leak5) and "
    f"![same](/files/leak6.png) and ![rel](leak7.png)\n\n"
    f"| col | img |\n|---|---|\n| x | ![t]({LEAK}8) |\n\n"
    f"[r]: {LEAK}2\n"
)


PERMISSIVE = MarkdownIt("commonmark", {"html": True}).enable("table")


def _no_image(html_text: str) -> None:
    assert "<img" not in html_text.lower(), html_text
    assert not re.search(r"\bsrc\s*=", html_text, re.I), html_text


def test_images_from_model_text_never_load_in_any_rendition(chat_server, moa_config, monkeypatch):
    chat_server.script(reply=Reply(text=HOSTILE_IMAGES))
    tree = TreeRenderer.for_plan(runner.prepare("q", preset="fake")[0])
    result = moa_magic.run("q", preset="fake", listeners=[tree])
    htmls = [result_html(result), tree.final_widget.value,
             *(w.value for w in tree.text_widgets.values())]
    for page in htmls:
        _no_image(page)
        for n in range(1, 9):  # every image is still there, as a link or a placeholder naming it
            assert f"leak{n}" in page or f"leak?d=secret{n}" in page, (n, page)
    # the text/markdown output, rendered by a permissive renderer (raw HTML on) has no image
    markdown = result_markdown(result)
    _no_image(PERMISSIVE.render(markdown))
    assert "leak?d=secret1" in markdown and "&lt;" not in HOSTILE_IMAGES
    # the HTML keeps a clickable link for a top-level image, and none nested inside a link
    assert f'href="{LEAK}1"' in result_html(result).replace("&amp;", "&")
    assert '<span class="moa-image">[image: inner' in result_html(result)


def test_images_never_load_through_moa_last_in_a_real_shell(chat_server, moa_config, monkeypatch):
    chat_server.script(reply=Reply(text=HOSTILE_IMAGES))
    ip = InteractiveShell.instance()
    monkeypatch.setattr(ip, "kernel", object(), raising=False)  # a kernel: rich outputs
    ip.run_line_magic("load_ext", "moa_magic")
    try:
        with capture_output() as cap:
            ip.run_cell("%%moa --preset fake\nq").raise_error()
            ip.run_cell("%moa last").raise_error()
        bundles = [o.data for o in cap.outputs if "text/html" in o.data]
        assert len(bundles) == 2  # the run's static rendition, then %moa last
        for bundle in bundles:
            _no_image(bundle["text/html"])
            _no_image(PERMISSIVE.render(bundle["text/markdown"]))
    finally:
        ip.run_line_magic("unload_ext", "moa_magic")


# --- secrets in URLs -----------------------------------------------------------------------------


def test_credentials_in_a_base_url_are_sent_as_basic_auth_and_never_shown(
    chat_server, tmp_path, monkeypatch
):
    url = chat_server.url.replace("http://", "http://alice:pa55-w0rd-very-secret@")
    result, error = one_call(url, tmp_path, monkeypatch)
    assert error is None and result.ok
    expected = "Basic " + base64.b64encode(b"alice:pa55-w0rd-very-secret").decode()
    assert {r["headers"].get("Authorization") for r in chat_server.chat_requests} == {expected}
    cfg = load_config()
    for shown in (catalog_text(cfg), catalog_html(cfg), json.dumps(result.to_dict())):
        assert "pa55-w0rd" not in shown
    assert "***@127.0.0.1" in catalog_text(cfg)
    # a failing call's error names the URL without the password
    dead = "http://alice:pa55-w0rd-very-secret@127.0.0.1:9/v1"
    result, error = one_call(dead, tmp_path, monkeypatch)
    assert "cannot connect to http://***@127.0.0.1:9/v1" in result.layers[0][0].error
    assert "pa55" not in str(error) and "pa55" not in json.dumps(result.to_dict())


def test_a_server_echoing_the_basic_authorization_header_does_not_leak_it(
    chat_server, tmp_path, monkeypatch
):
    """The header is the URL's credentials in base64: echoed, it is as good as the password."""
    sent = "Basic " + base64.b64encode(b"alice:pa55-w0rd-very-secret").decode()
    chat_server.script(model="a", reply=Reply(status=400, error_body=f"bad request; you sent "
                                                                     f"Authorization: {sent}"))
    url = chat_server.url.replace("http://", "http://alice:pa55-w0rd-very-secret@")
    result, error = one_call(url, tmp_path, monkeypatch)
    assert chat_server.requests_for("a")[0]["headers"]["Authorization"] == sent
    shown = result.layers[0][0].error
    assert shown.startswith("HTTP 400 from p: bad request; you sent Authorization: Basic ***")
    for text in (shown, str(error), json.dumps(result.to_dict())):
        assert sent.split()[1][:12] not in text and sent.split()[1][-12:] not in text


def test_the_cli_list_never_shows_url_credentials(tmp_path, monkeypatch):
    write_config(tmp_path, monkeypatch,
                 '[providers.p]\nbase_url = "https://bob:hunter2-xyz@llm.example/v1"\n')
    listing = subprocess.run([sys.executable, "-m", "moa_magic", "--list"], capture_output=True,
                             text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert "hunter2" not in listing.stdout + listing.stderr
    assert "https://***@llm.example/v1" in listing.stdout


def test_url_credentials_with_an_api_key_are_refused_at_load(tmp_path, monkeypatch):
    write_config(tmp_path, monkeypatch, '[providers.p]\nbase_url = "http://u:hunter2-xyz@h/v1"\n'
                 'api_key_env = "P_KEY"\n')
    with pytest.raises(ConfigError) as info:
        load_config()
    message = str(info.value)
    assert "only one can be sent" in message and "hunter2" not in message and "\n" not in message


def test_an_env_override_with_credentials_and_a_key_fails_clearly(chat_server, moa_config, monkeypatch):
    monkeypatch.setenv("MOA_TEST_KEY", "sk-test-0123456789abcdef")
    monkeypatch.setenv("MOA_FAKEKEY_BASE_URL", chat_server.url.replace("//", "//u:hunter2-xyz@"))
    with pytest.raises(RunFailed):
        moa_magic.run("q", proposers=["fakekey:a"], aggregator="fake:agg", preset="fake")
    record = moa_magic.last_result().layers[0][0]
    assert "only one can be sent" in record.error and "unexpected" not in record.error
    assert "hunter2" not in record.error and chat_server.requests_for("a") == []


def test_a_key_pasted_into_api_key_env_is_not_echoed(tmp_path, monkeypatch):
    write_config(tmp_path, monkeypatch,
                 '[providers.p]\nbase_url = "http://h/v1"\napi_key_env = "sk-live-abcdefghijklmnop"\n')
    with pytest.raises(ConfigError) as info:
        load_config()
    assert "abcdefgh" not in str(info.value) and "NAME of an environment variable" in str(info.value)


# --- redirects -----------------------------------------------------------------------------------


def test_redirects_are_followed_only_within_the_origin(chat_server, tmp_path, monkeypatch):
    with ChatServer() as elsewhere:
        target = f"{elsewhere.url}/chat/completions"
        for status in (301, 302, 307, 308):
            chat_server.script(reply=Reply(status=status, headers={"Location": target}), times=1)
            result, error = one_call(chat_server.url, tmp_path, monkeypatch)
            message = result.layers[0][0].error
            assert f"HTTP {status} redirect from {chat_server.root_url}" in message, message
            assert elsewhere.root_url in message
        assert elsewhere.requests == []
    # within the same origin the same request is sent again
    chat_server.reset()
    chat_server.script(model="a", times=1, reply=Reply(
        status=307, headers={"Location": "/v1/chat/completions?moved=1"}))
    result, error = one_call(chat_server.url, tmp_path, monkeypatch)
    assert error is None and result.layers[0][0].text == "a says: q"
    first, second = chat_server.requests_for("a")
    assert first["body"] == second["body"]


# --- proxies -------------------------------------------------------------------------------------


@pytest.fixture
def proxied(chat_server, monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy",
                 "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with ForwardProxy(upstream=("127.0.0.1", chat_server.port)) as proxy:
        yield proxy


def test_the_environment_proxy_is_used_except_for_loopback_and_no_proxy(chat_server, proxied, tmp_path, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", proxied.url)
    # a name that resolves nowhere: only the proxy can reach it
    url = f"http://llm.moa-test.invalid:{chat_server.port}/v1"
    result, error = one_call(url, tmp_path, monkeypatch)
    assert error is None and result.final == "agg says: q"
    assert proxied.seen == [f"{url}/chat/completions"] * 2
    # loopback and NO_PROXY hosts are called directly
    proxied.seen.clear()
    result, error = one_call(chat_server.url, tmp_path, monkeypatch)  # 127.0.0.1: direct
    assert error is None and proxied.seen == []
    monkeypatch.setenv("no_proxy", "example.org,.moa-test.invalid")
    result, error = one_call(f"http://llm.moa-test.invalid:{chat_server.port}/v1", tmp_path,
                             monkeypatch)
    assert proxied.seen == [] and "cannot connect" in result.layers[0][0].error


# --- bodies, surrogates, SSE ---------------------------------------------------------------------


def _completion(text: str) -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": "stop"}]}).encode()


def test_a_json_reply_in_several_writes_and_over_a_mebibyte_is_read_whole(
    chat_server, tmp_path, monkeypatch
):
    body = _completion("split reply " * 3)
    chat_server.script(model="a", reply=Reply(raw=[body[:20], body[20:]], raw_gap=0.05,
                                              raw_content_type="application/json"))
    big = "w" * (3 * 2**20)
    chat_server.script(model="agg", reply=Reply(raw=[_completion(big)],
                                                raw_content_type="application/json"))
    result, error = one_call(chat_server.url, tmp_path, monkeypatch)
    assert error is None
    assert result.layers[0][0].text == "split reply " * 3 and result.final == big


def test_a_reply_past_the_size_limit_is_a_clear_error(chat_server, tmp_path, monkeypatch):
    monkeypatch.setattr(client, "BODY_MAX", 2**20)
    chat_server.script(model="a", reply=Reply(raw=[_completion("w" * (2**20 + 10))],
                                              raw_content_type="application/json"))
    result, error = one_call(chat_server.url, tmp_path, monkeypatch)
    assert result.layers[0][0].error == "the reply is too large to read (more than 1 MiB)"


LONE = "x\ud800y\udc00z"


def test_lone_surrogates_are_made_safe_for_every_sink(chat_server, moa_config, monkeypatch):
    chat_server.script(model="a", reply=Reply(text=LONE))
    chat_server.script(model="b", reply=Reply(text=LONE, json_instead_of_sse=True))
    chat_server.script(model="agg", reply=Reply(text="final " + LONE))
    result = moa_magic.run("q", preset="fake")
    assert result.layers[0][0].text == result.layers[0][1].text == "x\ufffdy\ufffdz"
    for text in (json.dumps(result.to_dict(), ensure_ascii=False), result_text(result),
                 result_html(result), result_markdown(result)):
        text.encode("utf-8")
    for args in (["--json"], []):
        done = subprocess.run([sys.executable, "-m", "moa_magic", "--preset", "fake", *args, "q"],
                              capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        out = done.stdout.decode("utf-8")
        final = json.loads(out)["final"] if args else out
        assert "final x\ufffdy\ufffdz" in final


SSE_CASES = [
    # (raw pieces, expected text); the chunk JSON is `c(text)`
    ("CRLF", [b'data: {C1}\r\n\r\ndata: {C2}\r\n\r\ndata: [DONE]\r\n\r\n'], "onetwo"),
    ("lone CR", [b'data: {C1}\r\rdata: {C2}\r\rdata: [DONE]\r\r'], "onetwo"),
    ("CR|LF split", [b'data: {C1}\r', b'\n\r', b'\ndata: {C2}\n\ndata: [DONE]\n\n'], "onetwo"),
    ("BOM, no space, comments, unknown fields",
     [b'\xef\xbb\xbf: hi\nid: 7\nretry: 10\nfoo: bar\ndata:{C1}\n\n', b'nocolon\ndata: {C2}\n\n',
      b'data: [DONE]\n\n'], "onetwo"),
    ("data split over lines", [b'data: {"choices": [{"index": 0,\ndata: "delta": {"content":'
                               b' "one"}}]}\n\ndata: [DONE]\n\n'], "one"),
    ("UTF-8 split mid-character", [b'data: {"choices": [{"delta": {"content": "\xc3',
                                   b'\xa9t\xc3\xa9"}}]}\n\ndata: [DONE]\n\n'], "été"),
    ("other event types carry no text",
     [b'event: ping\ndata: not json\n\nevent: meta\ndata: {C2}\n\ndata: {C1}\n\ndata: [DONE]\n\n'],
     "one"),
    ("an unfinished last event is discarded",
     [b'data: {C1}\n\ndata: {"choices": [{"delta": {}, "finish_reason": "stop"}]}\n\n'
      b'data: {C2}\n'], "one"),
]


def test_sse_is_parsed_as_the_whatwg_spec_says(chat_server, tmp_path, monkeypatch):
    def chunk(text: str) -> bytes:
        return json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}).encode()

    wrong = {}
    for name, raw, expected in SSE_CASES:
        pieces = [p.replace(b"{C1}", chunk("one")).replace(b"{C2}", chunk("two")) for p in raw]
        chat_server.script(model="a", reply=Reply(raw=pieces, raw_gap=0.02), times=1)
        result, error = one_call(chat_server.url, tmp_path, monkeypatch)
        record = result.layers[0][0]
        if record.error is not None or record.text != expected:
            wrong[name] = (record.text, record.error)
    assert wrong == {}


# --- config values -------------------------------------------------------------------------------

BAD_CONFIGS = [
    ("[settings]\nmax_concurrency = 0\n", "[settings] max_concurrency must be a whole number from 1"),
    ("[settings]\nbackoff_max = nan\n", "[settings] backoff_max must be a number from 0"),
    ("[settings]\ncall_timeout = inf\n", "[settings] call_timeout must be a number"),
    ("[settings]\nretries = -1\n", "[settings] retries must be a whole number from 0"),
    ('[providers.y]\nbase_url = "http://h/v1"\nmax_concurrency = 0\n',
     "[providers.y] max_concurrency must be a whole number from 1 to 1024"),
    ('[presets.x]\nlayers = [[{ model = "fake:a", max_tokens = -5 }]]\naggregator = "fake:a"\n',
     "model 'fake:a': max_tokens must be a whole number of at least 1"),
    ('[presets.x]\nlayers = [[{ model = "fake:a", temperature = nan }]]\naggregator = "fake:a"\n',
     "temperature must be a number from 0 to 2"),
    ('[presets.x]\nlayers = [["fake:a"]]\naggregator = { model = "fake:a", seed = -9223372036854775808 }\n'
     '[settings]\nmin_ok = 2000\n', "[settings] min_ok must be a whole number from 0 to 1024"),
    ('[prices."fake:a"]\ninput = nan\noutput = 1\n', "input (USD per million tokens) must be"),
    ('[providers.y]\nbase_url = "http://"\n', "base_url has no host name"),
    ('[providers.y]\nbase_url = "http://h:99999/v1"\n', "base_url is not a valid URL"),
    ('[providers.y]\nbase_url = "http://h /v1"\n', "must not contain spaces"),
    ('[providers.y]\nbase_url = "https://h/v1?x=1"\n', "must not have a ?query"),
]


@pytest.mark.parametrize("text, message", BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_bad_config_values_exit_2_with_one_line(text, message, moa_config):
    moa_config.write_text(moa_config.read_text() + text)
    done = subprocess.run([sys.executable, "-m", "moa_magic", "--preset", "fake", "q"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and str(moa_config) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_config_file_that_is_not_utf8_is_one_line(moa_config):
    moa_config.write_bytes(moa_config.read_bytes() + b"# caf\xe9\n")
    done = subprocess.run([sys.executable, "-m", "moa_magic", "--preset", "fake", "q"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not UTF-8" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_malformed_base_url_override_is_refused_before_any_request(chat_server, moa_config,
                                                                      monkeypatch):
    monkeypatch.setenv("MOA_FAKE_BASE_URL", "http://u:hunter2-xyz@127.0.0.1:notaport/v1")
    done = subprocess.run([sys.executable, "-m", "moa_magic", "--preset", "fake", "q"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "$MOA_FAKE_BASE_URL" in done.stderr
    assert "hunter2" not in done.stderr and chat_server.chat_requests == []


# --- {{name}} interpolation ----------------------------------------------------------------------

INTERPOLATION_SETUP = """
class Boom:
    @property
    def prop(self):
        raise ValueError("property\\nbroke")
    def __str__(self):
        raise RuntimeError("str broke")
class NotText:
    def __str__(self):
        return 42
boom, not_text = Boom(), NotText()
"""


@pytest.mark.parametrize("placeholder, reason", [
    ("{{boom.prop}}", "ValueError: property broke"),
    ("{{boom}}", "RuntimeError: str broke"),
    ("{{not_text}}", "TypeError: __str__ returned non-string"),
])
def test_interpolation_failures_are_one_line_usage_errors(placeholder, reason, moa_config,
                                                          chat_server):
    from IPython.core.error import UsageError

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "moa_magic")
    try:
        ip.run_cell(INTERPOLATION_SETUP).raise_error()
        with capture_output():
            outcome = ip.run_cell(f"%%moa --preset fake\nsummarise {placeholder}")
        error = outcome.error_in_exec
        assert isinstance(error, UsageError), repr(error)
        assert reason in str(error) and "\n" not in str(error)
        assert chat_server.chat_requests == []
    finally:
        ip.run_line_magic("unload_ext", "moa_magic")


# --- resources -----------------------------------------------------------------------------------


def test_provider_limits_hold_across_concurrent_runs(chat_server, moa_config):
    moa_config.write_text(moa_config.read_text().replace(
        '[providers.fakekey]', 'max_concurrency = 2\n\n[providers.fakekey]'))
    chat_server.default_reply = Reply(delay=0.05)

    async def many():
        return await asyncio.gather(*(moa_magic.arun(f"q{i}", preset="fake") for i in range(20)))

    results = asyncio.run(many())
    assert all(r.ok for r in results)
    assert chat_server.max_in_flight == 2


def test_the_overall_limit_holds_across_runs(chat_server, moa_config):
    moa_config.write_text(moa_config.read_text() + "\n[settings]\nmax_concurrency = 3\n")
    chat_server.default_reply = Reply(delay=0.05)

    async def many():
        return await asyncio.gather(*(moa_magic.arun(f"q{i}", preset="fake") for i in range(10)))

    assert all(r.ok for r in asyncio.run(many()))
    assert chat_server.max_in_flight == 3


def test_widget_count_stays_flat_over_many_runs_in_a_shell(chat_server, moa_config, monkeypatch):
    from ipywidgets.widgets import widget

    ip = InteractiveShell.instance()
    monkeypatch.setattr(ip, "kernel", object(), raising=False)  # a kernel: the magic shows the tree
    ip.run_line_magic("load_ext", "moa_magic")
    try:
        counts = []
        for i in range(60):
            with capture_output():
                ip.run_cell(f"%%moa --preset fake\nrun {i}").raise_error()
            counts.append(len(widget._instances))
        # every run's tree is closed once the finished view replaces it: nothing piles up
        tree = ip.magics_manager.registry["MoaMagics"].last_tree
        assert tree.widget.comm is None
        assert counts[-1] == counts[30] == counts[45], counts
    finally:
        ip.run_line_magic("unload_ext", "moa_magic")


def test_a_server_echoing_a_password_with_non_ascii_letters_does_not_leak_it(
    chat_server, tmp_path, monkeypatch
):
    """The basic-auth header carries the password in UTF-8: read back from it in another encoding,
    the password to redact was a different string and the echoed one showed."""
    password = "päss-wörd-very-secret"
    chat_server.script(model="a", reply=Reply(status=400, error_body=f"wrong password {password}"))
    url = chat_server.url.replace("http://", "http://alice:p%C3%A4ss-w%C3%B6rd-very-secret@")
    result, error = one_call(url, tmp_path, monkeypatch)
    sent = chat_server.requests_for("a")[0]["headers"]["Authorization"]
    assert base64.b64decode(sent.split()[1]).decode() == f"alice:{password}"
    shown = result.layers[0][0].error
    assert shown.startswith("HTTP 400 from p: wrong password ***"), shown
    for text in (shown, str(error), json.dumps(result.to_dict(), ensure_ascii=False)):
        assert "wörd" not in text
