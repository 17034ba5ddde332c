"""https through a proxy (issue 11, "Proxies"), as a corporate network carries it: the `moa` CLI in a
fresh process reaches a TLS chat server on loopback through a loopback proxy's CONNECT tunnel, with
the certificate checked against a throwaway CA (trustme) that the environment names the way a user
names a corporate one (SSL_CERT_FILE / SSL_CERT_DIR: aiohttp builds its TLS contexts at import from
OpenSSL's default paths, so only a new process sees them). The server's name,
`api.moa-test.invalid`, resolves nowhere: only the proxy can reach it. And loopback never goes
through a proxy (plain http through one: tests/test_hostile.py)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys

import pytest
import trustme

from chat_server import ChatServer, Reply
from proxy_server import ForwardProxy

HOST = "api.moa-test.invalid"
USER, PASSWORD = "corp-user", "pr0xy-Secret-7f3a"
ENVIRONMENT = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR")


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def tls_server(ca):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(context)
    with ChatServer(ssl_context=context) as server:
        yield server
    assert not server.errors, f"the fake server itself failed: {server.errors!r}"


@pytest.fixture
def ca_file(ca, tmp_path):
    path = tmp_path / "corporate-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def moa(tls_server, tmp_path, monkeypatch):
    """`moa(env) -> CompletedProcess`: `moa --json --preset one q` against the TLS server by name,
    with only the proxy and CA variables of `env` (none of the caller's)."""
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    config = tmp_path / "moa.toml"
    config.write_text(
        f'[providers.p]\nbase_url = "https://{HOST}:{tls_server.port}/v1"\n'
        '[presets.one]\nlayers = [["p:a"]]\naggregator = "p:agg"\n'
        "[settings]\nretries = 0\nconnect_timeout = 5\nfirst_byte_timeout = 10\nchunk_timeout = 10\n",
        "utf-8",
    )
    monkeypatch.setenv("MOA_MAGIC_CONFIG", str(config))

    def run(env: dict) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "moa_magic", "--json", "--preset", "one", "q"],
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=120)

    return run


def failure_line(done: subprocess.CompletedProcess) -> str:
    """The run failed cleanly: exit 1, no traceback, one `moa:` line (returned)."""
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("moa:")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def with_credentials(url: str, user: str, password: str) -> str:
    return url.replace("http://", f"http://{user}:{password}@")


def trust(kind: str, ca_file, tmp_path) -> dict:
    """The environment naming the throwaway CA as a file, or as a hashed directory."""
    if kind == "SSL_CERT_FILE":
        return {"SSL_CERT_FILE": str(ca_file)}
    directory = tmp_path / "certs"
    directory.mkdir()
    shutil.copy(ca_file, directory / "corporate-ca.pem")
    subprocess.run(["openssl", "rehash", str(directory)], check=True, capture_output=True)
    return {"SSL_CERT_DIR": str(directory)}


@pytest.mark.parametrize("kind", [
    "SSL_CERT_FILE",
    pytest.param("SSL_CERT_DIR", marks=pytest.mark.skipif(
        shutil.which("openssl") is None, reason="hashing a CA directory needs the openssl command")),
])
def test_https_streams_through_the_proxy_tunnel_with_the_certificate_checked(
    kind, tls_server, ca_file, moa, tmp_path
):
    words = [f"w{i} " for i in range(40)]
    tls_server.script(model="a", reply=Reply(chunks=words, chunk_delay=0.005))
    with ForwardProxy(upstream=("127.0.0.1", tls_server.port)) as proxy:
        done = moa({"HTTPS_PROXY": proxy.url, **trust(kind, ca_file, tmp_path)})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["layers"][0][0]["text"] == "".join(words)  # 40 SSE events through the tunnel
    assert result["final"] == "agg says: q"
    assert proxy.seen and set(proxy.seen) == {f"CONNECT {HOST}:{tls_server.port}"}
    assert [r["body"]["stream"] for r in tls_server.chat_requests] == [True, True]


@pytest.mark.parametrize("proxy", [f"http://{USER}:{PASSWORD}@proxy.corp:31x8",
                                   f"http://{USER}:{PASSWORD}@[::1:3128",
                                   # a ':' in the user name cannot be sent in basic auth (RFC 7617)
                                   f"http://corp%3A{USER}:{PASSWORD}@proxy.corp:3128"])
def test_a_malformed_proxy_url_fails_in_one_line_naming_its_variable(proxy, tls_server, moa):
    line = failure_line(moa({"HTTPS_PROXY": proxy}))
    assert "HTTPS_PROXY = 'http://***@" in line and "is not a valid proxy URL" in line, line
    assert "unexpected" not in line and PASSWORD not in line
    assert tls_server.chat_requests == []


def test_a_socks_proxy_is_refused_in_one_line_not_ignored(tls_server, moa):
    line = failure_line(moa({"HTTPS_PROXY": f"socks5://{USER}:{PASSWORD}@proxy.corp:1080"}))
    assert "HTTPS_PROXY = 'socks5://***@proxy.corp:1080' is a socks5 proxy" in line, line
    assert "only http:// and https:// proxies" in line and PASSWORD not in line
    assert tls_server.chat_requests == []


def test_an_untrusted_certificate_fails_in_one_line_naming_it(tls_server, moa):
    with ForwardProxy(upstream=("127.0.0.1", tls_server.port)) as proxy:
        done = moa({"HTTPS_PROXY": proxy.url})
    line = failure_line(done)
    assert f"cannot connect to https://{HOST}:{tls_server.port}/v1 (p)" in line
    assert "TLS certificate is not trusted (unable to get local issuer certificate)" in line
    assert "SSL_CERT_FILE" in line
    assert proxy.seen == [f"CONNECT {HOST}:{tls_server.port}"]  # the tunnel was made, TLS refused
    assert tls_server.chat_requests == []


def test_no_proxy_naming_the_host_calls_it_directly(tls_server, ca_file, moa):
    with ForwardProxy(upstream=("127.0.0.1", tls_server.port)) as proxy:
        done = moa({"HTTPS_PROXY": proxy.url, "NO_PROXY": f"example.org,{HOST}",
                    "SSL_CERT_FILE": str(ca_file)})
    line = failure_line(done)
    # direct, so the name has to resolve, and .invalid never does
    assert f"cannot connect to https://{HOST}:{tls_server.port}/v1 (p): " in line
    assert "proxy" not in line and proxy.seen == []


def test_proxy_credentials_are_sent_and_never_shown_or_stored(tls_server, ca_file, moa, tmp_path):
    with ForwardProxy(upstream=("127.0.0.1", tls_server.port), credentials=(USER, PASSWORD)) as proxy:
        done = moa({"HTTPS_PROXY": with_credentials(proxy.url, USER, PASSWORD),
                    "SSL_CERT_FILE": str(ca_file)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["final"] == "agg says: q"
    assert proxy.refused == 0 and proxy.seen
    # the credentials went in CONNECT only, not inside the tunnel to the provider
    assert all("Proxy-Authorization" not in r["headers"] for r in tls_server.chat_requests)
    secrets = [PASSWORD.encode(), base64.b64encode(f"{USER}:{PASSWORD}".encode())]
    cache = os.path.join(os.environ["XDG_CACHE_HOME"], "moa-magic", "requests.sqlite3")
    assert os.path.getsize(cache) > 0  # the replies were stored: a file worth searching
    for text in (done.stdout, done.stderr):
        assert not any(secret.decode() in text for secret in secrets)
    for directory in (tmp_path, os.environ["XDG_CACHE_HOME"]):
        for root, _, files in os.walk(directory):
            for name in files:
                data = open(os.path.join(root, name), "rb").read()
                assert not any(secret in data for secret in secrets), name


@pytest.mark.parametrize("userinfo", [None, (USER, "wrong-Secret-91c2"), ("", "wrong-Secret-91c2")])
def test_a_proxy_refusing_credentials_is_one_line_naming_the_proxy(userinfo, tls_server, ca_file, moa):
    with ForwardProxy(upstream=("127.0.0.1", tls_server.port), credentials=(USER, PASSWORD)) as proxy:
        shown = proxy.url
        setting = shown if userinfo is None else with_credentials(shown, *userinfo)
        done = moa({"HTTPS_PROXY": setting, "SSL_CERT_FILE": str(ca_file)})
    line = failure_line(done)
    assert (f"the proxy {shown} (HTTPS_PROXY) refused to reach https://{HOST}:{tls_server.port}: "
            "HTTP 407 Proxy Authentication Required — check the user name and password in "
            "HTTPS_PROXY") in line
    assert "wrong-Secret" not in done.stdout + done.stderr
    assert proxy.refused == 1 and proxy.seen == [] and tls_server.chat_requests == []


def plain_http_config(port: int, tmp_path, monkeypatch) -> str:
    """The provider at plain http on a name only a proxy can reach; its base URL."""
    url = f"http://llm.moa-test.invalid:{port}/v1"
    config = tmp_path / "plain.toml"
    config.write_text(f'[providers.p]\nbase_url = "{url}"\n[presets.one]\nlayers = [["p:a"]]\n'
                      'aggregator = "p:agg"\n[settings]\nretries = 0\n', "utf-8")
    monkeypatch.setenv("MOA_MAGIC_CONFIG", str(config))
    return url


def test_proxy_credentials_work_for_plain_http_too(chat_server, moa, monkeypatch, tmp_path):
    url = plain_http_config(chat_server.port, tmp_path, monkeypatch)
    with ForwardProxy(upstream=("127.0.0.1", chat_server.port), credentials=(USER, PASSWORD)) as proxy:
        done = moa({"HTTP_PROXY": with_credentials(proxy.url, USER, PASSWORD)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["final"] == "agg says: q"
    assert proxy.refused == 0 and proxy.seen == [f"{url}/chat/completions"] * 2
    assert PASSWORD not in done.stdout + done.stderr


def test_proxy_credentials_echoed_back_are_never_shown(chat_server, moa, monkeypatch, tmp_path):
    """A server (or a proxy's error page) quoting the request's headers quotes the proxy's
    password in base64: as good as the password itself."""
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    chat_server.script(model="a", reply=Reply(status=400, error_body=(
        f"bad request; you sent Proxy-Authorization: Basic {token}, that is {PASSWORD}")))
    plain_http_config(chat_server.port, tmp_path, monkeypatch)
    with ForwardProxy(upstream=("127.0.0.1", chat_server.port), credentials=(USER, PASSWORD)) as proxy:
        done = moa({"HTTP_PROXY": with_credentials(proxy.url, USER, PASSWORD)})
    assert proxy.refused == 0 and chat_server.requests_for("a")
    line = failure_line(done)
    assert "you sent Proxy-Authorization: Basic ***, that is ***" in line
    for text in (done.stdout, done.stderr):
        assert PASSWORD not in text and token[:12] not in text and token[-12:] not in text


def test_a_plain_http_proxy_refusing_credentials_names_it_too(tls_server, moa, monkeypatch, tmp_path):
    plain_http_config(tls_server.port, tmp_path, monkeypatch)
    # refused before anything is forwarded, so the upstream's scheme does not matter
    with ForwardProxy(upstream=("127.0.0.1", tls_server.port), credentials=(USER, PASSWORD)) as proxy:
        done = moa({"HTTP_PROXY": with_credentials(proxy.url, USER, "wrong-Secret-91c2")})
    line = failure_line(done)
    assert (f"the proxy {proxy.url} (HTTP_PROXY) refused to reach "
            f"http://llm.moa-test.invalid:{tls_server.port}: HTTP 407") in line
    assert "wrong-Secret" not in done.stdout + done.stderr
    assert proxy.refused == 1 and proxy.seen == []


def test_a_proxy_that_is_not_there_is_named(tls_server, ca_file, moa):
    with socket.socket() as bound:  # bound, never listening: connections to it are refused
        bound.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{bound.getsockname()[1]}"
        done = moa({"HTTPS_PROXY": with_credentials(gone, USER, PASSWORD),
                    "SSL_CERT_FILE": str(ca_file)})
    line = failure_line(done)
    assert (f"cannot connect to the proxy {gone} (HTTPS_PROXY) to reach "
            f"https://{HOST}:{tls_server.port}: Connection refused") in line
    assert PASSWORD not in done.stdout + done.stderr


def test_the_embedded_models_probes_never_go_through_a_proxy(chat_server, monkeypatch):
    """A corporate proxy cannot reach this machine's 127.0.0.1: the local server's readiness probe
    (and self-check, same opener) must not be sent there, as urllib would unless NO_PROXY names it."""
    from moa_magic.providers import local

    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    with ForwardProxy(upstream=("127.0.0.1", chat_server.port)) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("ALL_PROXY", proxy.url)
        assert local._ready(chat_server.url)
    assert proxy.seen == []
