"""The warm process (`moa daemon`, moa_magic/warm/): real daemons, real `moa` subprocesses, the
loopback chat server. A command must behave exactly as it does cold; every test ends with no
daemon and no command process left (the `daemon` fixture stops it, and kills what is left)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from chat_server import Reply
from helpers import FAKE_PRESET, FAKE_PROVIDER, FAKEKEY_PROVIDER

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc to find the daemon's children")

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 60.0  # for things that happen "soon": generous, a busy 2-core CI machine is slow
QUESTION = "What is a Mixture-of-Agents?"
KEY_PRESET = """\
[presets.keyed]
layers = [["fakekey:a", "fakekey:b"]]
aggregator = "fakekey:agg"
"""


def moa(*args: str, env: dict, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moa_magic", *args], env=env, capture_output=True,
                          timeout=timeout, **kwargs)


def wait_until(condition, what: str, timeout: float = DEADLINE_S):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        threading.Event().wait(0.02)  # the poll interval of a deadline, not a guess at a duration
    return value


def alive(pid: int) -> bool:
    """Running, not a zombie (an orphaned daemon's zombie may wait long for its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


class Daemon:
    """`moa daemon …` in one environment; `env` is what its clients run with."""

    def __init__(self, env: dict):
        self.env = env
        self.cwd: Path | None = None
        self.pids: set[int] = set()

    def command(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return moa("daemon", *args, env=env or self.env, cwd=self.cwd, text=True)

    def start(self, *args: str, env: dict | None = None) -> int:
        done = self.command("start", *args, env=env)
        assert done.returncode == 0, done.stderr
        pid = int(re.search(r"\(pid (\d+)\)", done.stdout)[1])
        self.pids.add(pid)
        return pid

    def status(self, env: dict | None = None) -> dict | None:
        """pid, runs served and the socket path, or None (and exit 1) when none serves `env`."""
        done = self.command("status", env=env)
        if done.returncode == 1:
            assert "not running for this install" in done.stdout
            return None
        assert done.returncode == 0, done.stderr
        found = re.search(r"\(pid (\d+)\) at (\S+)\n.* (\d+) commands? served · (\d+) running", done.stdout)
        return {"pid": int(found[1]), "socket": found[2], "served": int(found[3]), "running": int(found[4])}

    def served(self, env: dict | None = None) -> int:
        return self.status(env)["served"]

    def log(self) -> str:
        return "".join(path.read_text() for path in Path(self.env["XDG_RUNTIME_DIR"]).rglob("*.log"))

    def close(self) -> list[str]:
        """Stop every daemon this test started; what had to be killed instead (a test failure)."""
        problems = []
        if self.status() is not None:
            done = self.command("stop")
            if done.returncode != 0:
                problems.append(f"`moa daemon stop` failed: {done.stderr}")
        for pid in self.pids:
            stragglers = [pid, *children_of(pid)]
            try:
                wait_until(lambda: not any(map(alive, stragglers)), "the daemon ends", timeout=20)
            except AssertionError:
                problems.append(f"killed daemon {pid} and its children {stragglers[1:]}")
                for straggler in stragglers:
                    try:
                        os.kill(straggler, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        return problems


@pytest.fixture
def runtime_dir():
    """A short $XDG_RUNTIME_DIR: a Unix socket's path has at most 107 bytes."""
    path = tempfile.mkdtemp(prefix="moa-run-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def client_env(runtime_dir, moa_config) -> dict:
    env = dict(os.environ, XDG_RUNTIME_DIR=runtime_dir,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("MOA_MAGIC_DAEMON", None)
    return env


@pytest.fixture
def daemon(client_env):
    handle = Daemon(client_env)
    yield handle
    problems = handle.close()
    assert not problems, problems


def without_timings(value):
    """A --json result without the measured durations (`latency_s`, `layer_seconds`, ...)."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not k.endswith(("_s", "_seconds"))}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def test_a_command_gives_the_same_output_cold_and_warm(daemon, client_env, chat_server):
    daemon.start()
    cold_env = dict(client_env, MOA_MAGIC_DAEMON="off")
    cases = {
        "run": ["--preset", "fake", "--no-cache", "--quiet", QUESTION],
        "json": ["--preset", "fake", "--no-cache", "--quiet", "--json", QUESTION],
        "--version": ["--version"],
        "usage error (argparse)": ["--preset", "fake", "--layers", "two", QUESTION],
        "usage error (moa)": ["--preset", "no-such-preset", QUESTION],
        "failed run": ["--preset", "fake", "--no-cache", "--quiet", "--json", "--fail", QUESTION],
        "chat on stdin": ["chat", "--preset", "fake", "--no-cache", "--quiet"],
    }
    for name, args in cases.items():
        failing = "--fail" in args
        args = [arg for arg in args if arg != "--fail"]
        chat_server.default_reply = Reply(status=400) if failing else Reply()
        stdin = b"first turn\nsecond turn\n" if args[0] == "chat" else b""
        before = daemon.served()
        cold, warm = moa(*args, env=cold_env, input=stdin), moa(*args, env=client_env, input=stdin)
        assert daemon.served() == before + 1, f"{name}: the warm command did not run in the daemon"
        assert (warm.returncode, warm.stderr) == (cold.returncode, cold.stderr), name
        if "--json" in args:
            assert without_timings(json.loads(warm.stdout)) == without_timings(json.loads(cold.stdout))
        else:
            assert warm.stdout == cold.stdout, name
        assert cold.returncode == {"failed run": 1}.get(name, 2 if "error" in name else 0), name
        if name == "failed run":
            assert cold.stderr.startswith(b"moa: No final answer") and json.loads(cold.stdout)["status"] == "failed"
        if name == "chat on stdin":
            assert cold.stdout == b"agg says: first turn\nagg says: second turn\n"


def test_stdin_cwd_config_save_umask_and_keys_are_the_clients(daemon, client_env, chat_server, tmp_path):
    """The child takes the client's stdin, working directory, umask and environment; a key that
    only the daemon's starter had is not used, and the daemon process does not even hold it."""
    daemon_secret = "sk-daemon-only-7f3e"
    pid = daemon.start(env=dict(client_env, MOA_TEST_KEY=daemon_secret))
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.toml").write_text(
        "\n".join([FAKE_PROVIDER, FAKEKEY_PROVIDER, KEY_PRESET]).format(url=chat_server.url))
    env = {k: v for k, v in client_env.items() if k != "MOA_MAGIC_CONFIG"}
    args = ["--config", "mine.toml", "--preset", "keyed", "--no-cache", "--quiet", "--save"]

    done = moa(*args, "private.json", "-", env=dict(env, MOA_TEST_KEY="sk-client-1a2b"), cwd=work,
               input=b"What came on stdin?", umask=0o077)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"agg says: What came on stdin?\n"
    assert {r["headers"]["Authorization"] for r in chat_server.chat_requests} == {"Bearer sk-client-1a2b"}
    assert stat.S_IMODE((work / "private.json").stat().st_mode) == 0o600
    assert json.loads((work / "private.json").read_text())["prompt"] == "What came on stdin?"
    done = moa(*args, "shared.json", "Q", env=dict(env, MOA_TEST_KEY="sk-client-1a2b"), cwd=work,
               umask=0o022)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE((work / "shared.json").stat().st_mode) == 0o644

    chat_server.reset()
    done = moa(*args, "none.json", "Q", env=env, cwd=work)
    assert done.returncode == 2 and b"MOA_TEST_KEY" in done.stderr, done.stderr
    assert chat_server.chat_requests == []
    assert daemon.served() == 3
    assert daemon_secret.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    assert daemon_secret not in daemon.log()


def test_ctrl_c_interrupts_a_warm_command_as_a_cold_one(daemon, client_env, chat_server, tmp_path):
    daemon.start()
    outcomes = []
    for mode in ("off", "on"):
        chat_server.reset()
        chat_server.script(model="b", hang=True)
        saved = tmp_path / f"partial-{mode}.json"
        client = subprocess.Popen(
            [sys.executable, "-m", "moa_magic", "--preset", "fake", "--no-cache", "--quiet",
             "--save", str(saved), QUESTION],
            env=dict(client_env, MOA_MAGIC_DAEMON=mode), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            chat_server.wait_for_requests(3, timeout=DEADLINE_S)  # the run is under way
            client.send_signal(signal.SIGINT)
            stdout, stderr = client.communicate(timeout=DEADLINE_S)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        result = json.loads(saved.read_text())
        outcomes.append((client.returncode, stderr.splitlines()[-1:], result["status"]))
        chat_server.wait_idle(timeout=DEADLINE_S)
    assert outcomes[0] == outcomes[1] == (130, [b"moa: interrupted"], "cancelled")
    assert daemon.served() == 1


def test_a_killed_client_takes_its_command_with_it(daemon, client_env, chat_server):
    pid = daemon.start()
    chat_server.default_reply = Reply(hang=True)
    client = subprocess.Popen([sys.executable, "-m", "moa_magic", "--preset", "fake", "--no-cache",
                               QUESTION], env=client_env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        chat_server.wait_for_requests(1, timeout=DEADLINE_S)
        [command] = children_of(pid)
    finally:
        client.kill()
        client.wait()
    wait_until(lambda: not alive(command), "the command ends after its client was killed")
    chat_server.wait_idle(timeout=DEADLINE_S)  # and its requests were dropped
    assert daemon.status()["served"] == 1


def test_a_command_runs_in_the_spare_forked_before_it_came(daemon, client_env, chat_server):
    """The daemon forks the next command's process ahead of time; the command takes it over
    (no fork of its own), and the next spare is forked once the command has ended."""
    pid = daemon.start()
    [spare] = wait_until(lambda: children_of(pid), "the daemon forks its spare")
    release = threading.Event()
    chat_server.default_reply = Reply(pause_before={0: release})
    client = subprocess.Popen([sys.executable, "-m", "moa_magic", "--preset", "fake", "--no-cache",
                               "--quiet", QUESTION], env=client_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        chat_server.wait_for_requests(1, timeout=DEADLINE_S)
        assert children_of(pid) == [spare]  # the command is the spare, and no spare meanwhile
    finally:
        release.set()
        stdout, stderr = client.communicate(timeout=DEADLINE_S)
    assert client.returncode == 0 and stdout == f"agg says: {QUESTION}\n".encode(), stderr
    [following] = wait_until(lambda: [c for c in children_of(pid) if c != spare], "the next spare")
    assert not alive(spare)
    assert daemon.served() == 1


def test_another_install_or_environment_runs_cold(daemon, client_env, tmp_path):
    """A daemon serves only clients with its fingerprint: the same package files (an edited
    module makes it unreachable), interpreter and import-time environment."""
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "moa_magic", copy / "moa_magic", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(client_env, PYTHONPATH=str(copy))
    # `python -m` imports from its working directory first: not from the tree the tests run in
    daemon.env, daemon.cwd = env, tmp_path
    daemon.start()
    run = ["--preset", "fake", "--no-cache", "--quiet", QUESTION]
    assert moa(*run, env=env, cwd=tmp_path).returncode == 0
    assert daemon.served() == 1

    for other in (dict(env, SSL_CERT_DIR=str(tmp_path)), dict(env, MOA_MAGIC_DAEMON="off")):
        done = moa(*run, env=other, cwd=tmp_path)
        assert done.returncode == 0 and done.stdout == b"agg says: " + QUESTION.encode() + b"\n"
    assert daemon.status(dict(env, SSL_CERT_DIR=str(tmp_path))) is None
    assert daemon.served() == 1

    edited = copy / "moa_magic" / "figures.py"
    times = edited.stat()
    os.utime(edited, ns=(times.st_atime_ns, times.st_mtime_ns + 5_000_000_000))
    try:
        assert moa(*run, env=env, cwd=tmp_path).returncode == 0
        assert daemon.status() is None  # for the edited package there is no daemon
    finally:
        os.utime(edited, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert daemon.served() == 1


def test_the_socket_is_private_and_the_log_holds_no_command(daemon, client_env, runtime_dir):
    secret = "sk-test-LOGSECRET"
    daemon.start(env=dict(client_env, MOA_TEST_KEY=secret))
    folder = Path(runtime_dir) / "moa-magic"
    [sock] = folder.glob("*.sock")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    done = moa("--preset", "fake", "--no-cache", "prompt-LOGSECRET", env=dict(client_env, MOA_TEST_KEY=secret))
    assert done.returncode == 0 and b"prompt-LOGSECRET" in done.stdout
    assert daemon.served() == 1
    log = daemon.log()
    assert "LOGSECRET" not in log and "--preset" not in log
    assert re.findall(r"moa daemon \[\d+\]: (\w+)", log) == ["started"], log


def test_status_start_twice_and_stop(daemon, client_env, chat_server, runtime_dir):
    assert daemon.status() is None
    done = daemon.command("stop")
    assert (done.returncode, done.stdout) == (0, "moa daemon: not running\n")
    pid = daemon.start()
    done = daemon.command("start")
    assert done.returncode == 0 and f"already running (pid {pid})" in done.stdout
    assert daemon.status()["pid"] == pid

    # `stop` lets a running command finish, and takes no new one meanwhile
    release = threading.Event()
    chat_server.default_reply = Reply(pause_before={0: release})
    running = subprocess.Popen([sys.executable, "-m", "moa_magic", "--preset", "fake", "--no-cache",
                                "--quiet", QUESTION], env=client_env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    stopping = None
    try:
        chat_server.wait_for_requests(3, timeout=DEADLINE_S)
        stopping = subprocess.Popen([sys.executable, "-m", "moa_magic", "daemon", "stop"],
                                    env=client_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_until(lambda: not list((Path(runtime_dir) / "moa-magic").glob("*.sock")),
                   "the stopping daemon removes its socket")
        assert alive(pid) and stopping.poll() is None
        chat_server.default_reply = Reply()
        assert moa("--preset", "fake", "--no-cache", "--quiet", "meanwhile", env=client_env).returncode == 0
    finally:
        release.set()
        stdout, _ = running.communicate(timeout=DEADLINE_S)
        if stopping is not None:
            stopped, _ = stopping.communicate(timeout=DEADLINE_S)
    assert running.returncode == 0 and stdout == b"agg says: " + QUESTION.encode() + b"\n"
    assert stopping.returncode == 0 and stopped.endswith(b"moa daemon: stopped\n")
    wait_until(lambda: not alive(pid), "the daemon ends")  # its sockets close as it exits
    assert "stopped (stop requested); 1 runs served" in daemon.log()


def test_an_idle_daemon_ends_and_removes_its_socket(daemon, runtime_dir):
    pid = daemon.start("--idle", "0.01")  # 0.6 s
    wait_until(lambda: not alive(pid), "the idle daemon exits")
    assert not list((Path(runtime_dir) / "moa-magic").glob("*.sock"))
    assert "stopped (idle for 0.01 min); 0 runs served" in daemon.log()


@pytest.mark.parametrize("args", [["bogus"], [], ["start", "--idle", "-1"], ["start", "--idle", "nan"],
                                  ["start", "--idle", "0"], ["stop", "now"]])
def test_bad_input_is_one_line_and_exit_2(args, client_env):
    done = moa("daemon", *args, env=client_env, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("moa daemon: "), done.stderr


def test_a_socket_path_too_long_is_refused_and_commands_run_cold(client_env, tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 40)
    deep.mkdir(parents=True)
    env = dict(client_env, XDG_RUNTIME_DIR=str(deep))
    done = moa("daemon", "start", env=env, text=True)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1
    assert "XDG_RUNTIME_DIR" in done.stderr and "bytes" in done.stderr
    assert moa("--preset", "fake", "--no-cache", "--quiet", QUESTION, env=env).returncode == 0


def test_the_run_directory_follows_the_cache_directory_without_platformdirs(monkeypatch, tmp_path):
    import platformdirs

    from moa_magic.warm import client

    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    for cache_home in (str(tmp_path / "cache"), "relative/cache", None):
        if cache_home is None:
            monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        else:
            monkeypatch.setenv("XDG_CACHE_HOME", cache_home)
        expected = platformdirs.user_cache_path("moa-magic", appauthor=False)
        assert client.user_cache_dir() == str(expected)
        assert client.run_dir() == str(expected / "run")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert client.run_dir() == str(tmp_path / "moa-magic")


def test_concurrent_commands_each_get_their_own_output_and_status(daemon, client_env):
    pid = daemon.start()
    prompts = [f"question number {n}" for n in range(4)]
    commands = [subprocess.Popen([sys.executable, "-m", "moa_magic", "--preset", "fake", "--no-cache",
                                  "--quiet", *(["--layers", "0"] if n == 3 else []), prompt],
                                 env=client_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for n, prompt in enumerate(prompts)]
    outcomes = [(command.communicate(timeout=DEADLINE_S)[0], command.returncode) for command in commands]
    assert outcomes[:3] == [(f"agg says: {prompt}\n".encode(), 0) for prompt in prompts[:3]]
    assert outcomes[3] == (b"", 2)
    assert daemon.served() == 4
    assert len(os.listdir(f"/proc/{pid}/task")) == 1  # still one thread: the next fork is safe


def test_a_killed_daemon_leaves_a_socket_that_commands_and_start_get_past(daemon, client_env, runtime_dir):
    pid = daemon.start()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid), "the killed daemon is gone")
    assert list((Path(runtime_dir) / "moa-magic").glob("*.sock"))  # nobody removed it
    done = moa("--preset", "fake", "--no-cache", "--quiet", QUESTION, env=client_env)
    assert done.returncode == 0 and done.stdout == f"agg says: {QUESTION}\n".encode()
    assert daemon.status() is None
    assert daemon.start() != pid
    assert moa("--preset", "fake", "--no-cache", "--quiet", QUESTION, env=client_env).returncode == 0
    assert daemon.served() == 1


def test_two_starts_at_once_give_one_daemon(daemon, client_env):
    starts = [subprocess.Popen([sys.executable, "-m", "moa_magic", "daemon", "start"], env=client_env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    outputs = [start.communicate(timeout=120) for start in starts]
    assert [start.returncode for start in starts] == [0, 0], outputs
    pids = {int(re.search(r"\(pid (\d+)\)", out)[1]) for out, _ in outputs}
    daemon.pids |= pids
    assert pids == {daemon.status()["pid"]}
    assert any("already running" in out for out, _ in outputs)


IMPOSTOR = """\
import os, socket, sys
os.setuid(int(sys.argv[2]))  # after start-up: the interpreter may live where that user cannot read
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen(8)
print("ready", flush=True)
while True:
    conn, _ = listener.accept()
    data, fds, _, _ = socket.recv_fds(conn, 65536, 16)
    for fd in fds:
        os.close(fd)
    conn.close()
    if data == b"END":
        break
    if data or fds:  # a client that connected, saw who listens and left sent nothing
        print(f"got {len(data)} bytes and {len(fds)} descriptors", flush=True)
"""


def impostor_gets(path: Path, run, user: int) -> list[str]:
    """What a listener at `path` (bound as `user`, then moved there) receives while `run()` runs."""
    staging = Path(tempfile.mkdtemp(prefix="moa-other-"))
    try:
        os.chown(staging, user, -1)
        listener = subprocess.Popen([sys.executable, "-c", IMPOSTOR, str(staging / "s"), str(user)],
                                    stdout=subprocess.PIPE, text=True)
        try:
            assert listener.stdout.readline() == "ready\n"
            os.rename(staging / "s", path)
            run()
            with socket.socket(socket.AF_UNIX) as sentinel:  # queued behind whatever the client sent
                sentinel.connect(str(path))
                sentinel.sendall(b"END")
            return listener.communicate(timeout=DEADLINE_S)[0].splitlines()
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.wait()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root: plays another user")
def test_a_socket_of_another_user_gets_nothing_and_the_command_runs_cold(daemon, client_env, runtime_dir):
    """Another user who can write to a shared XDG_RUNTIME_DIR binds the socket name of our install:
    the client sends it neither the command, nor its terminal, nor its keys (it runs cold). Each
    layer is checked alone: the run directory's owner, the socket file's owner, the listening peer."""
    nobody = 65534
    path = Path(daemon.command("status").stdout.rpartition("listen at ")[2].rstrip(")\n"))
    folder = path.parent
    os.chmod(runtime_dir, 0o711)  # as a shared runtime directory is
    run = ["--preset", "fake", "--no-cache", "--quiet", QUESTION]
    env = dict(client_env, MOA_TEST_KEY="sk-victim-key")

    def command_runs_cold():
        done = moa(*run, env=env)
        assert done.returncode == 0 and done.stdout == f"agg says: {QUESTION}\n".encode(), done.stderr

    def reset(owner: int):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(mode=0o700)
        os.chown(folder, owner, -1)

    reset(nobody)  # the other user made our run directory
    assert impostor_gets(path, command_runs_cold, nobody) == []
    reset(0)  # ours, but the socket file is theirs
    assert impostor_gets(path, command_runs_cold, nobody) == []
    reset(0)  # ours, the file made ours too: only the peer's credentials tell
    assert impostor_gets(path, lambda: (os.lchown(path, 0, 0), command_runs_cold()), nobody) == []
    # a symbolic link for the run directory, to a private directory with a listener of ours
    shutil.rmtree(folder)
    target = Path(runtime_dir) / "elsewhere"
    target.mkdir(mode=0o700)
    folder.symlink_to(target)
    assert impostor_gets(target / path.name, command_runs_cold, 0) == []
    done = daemon.command("start")
    assert done.returncode == 2 and "symbolic link" in done.stderr and len(done.stderr.splitlines()) == 1


def raw_run(path: str, argv: list[str], env: dict, then: bytes = b"", stdin: int | None = None) -> socket.socket:
    """A client speaking the protocol itself (warm/client.py): `run` with `stdin` (else /dev/null),
    stdout and stderr on /dev/null and `then` in the same message, the header already in its pipe."""
    import marshal

    spec = {"encoding": "utf-8", "errors": "strict", "line_buffering": False, "write_through": False}
    header = marshal.dumps({"argv": ["moa", *argv], "cwd": "/", "environ": env, "umask": 0o022,
                            "path": sys.path, "stdio": [spec] * 3})
    header_in, header_out = os.pipe()
    os.write(header_out, header)
    os.close(header_out)
    null = os.open(os.devnull, os.O_RDWR)
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect(path)
        sock.sendall(b"run\n")
        assert sock.recv(6) == b"ready\n"
        socket.send_fds(sock, [b"fds\n" + then], [null if stdin is None else stdin, null, null, header_in])
    finally:
        os.close(null)
        os.close(header_in)
    return sock


def exit_status(sock: socket.socket, deadline: float) -> int | None:
    """The first `exit N` the client is told, or None if the connection ends (or the deadline
    passes) without one."""
    received = b""
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            if not (data := sock.recv(4096)):
                break
            received += data
    except TimeoutError:
        pass
    sock.close()
    found = re.findall(rb"^exit (\d+)$", received, re.M)
    return int(found[0]) if found else None


def test_a_signal_right_after_run_ends_the_command_and_not_the_daemon(daemon, client_env):
    """The client's Ctrl-C or SIGTERM may reach a child the moment it is forked, before it has
    left the daemon's signal handling: the command must end by it, the daemon must not. The
    commands wait on a stdin that never comes, so only the signal can end them."""
    pid = daemon.start()
    path = daemon.status()["socket"]
    signums = [signal.SIGTERM, signal.SIGINT] * 10
    silent_in, silent_out = os.pipe()
    try:
        clients = [raw_run(path, ["--preset", "fake", "--quiet", "-"], client_env,
                           f"signal {signum}\n".encode(), stdin=silent_in) for signum in signums]
        deadline = time.monotonic() + DEADLINE_S
        assert [exit_status(sock, deadline) for sock in clients] == [128 + signum for signum in signums]
    finally:
        os.close(silent_in)
        os.close(silent_out)  # what still runs (a lost signal) reads the end of its stdin
    assert alive(pid) and daemon.served() == len(signums)


def test_a_stopped_daemon_makes_commands_run_cold_and_never_late(daemon, client_env, chat_server):
    """A daemon that does not answer (here SIGSTOPped) costs a command a few seconds, then it runs
    cold; once the daemon goes on, it does not run that command a second time."""
    pid = daemon.start()
    os.kill(pid, signal.SIGSTOP)
    try:
        done = moa("--preset", "fake", "--no-cache", "--quiet", QUESTION, env=client_env, timeout=DEADLINE_S)
        assert done.returncode == 0 and done.stdout == f"agg says: {QUESTION}\n".encode(), done.stderr
        requests = len(chat_server.chat_requests)
        assert requests > 0
    finally:
        os.kill(pid, signal.SIGCONT)
    # the daemon goes on with the abandoned connection first (one queue), without running it
    assert moa("--version", env=client_env).returncode == 0
    assert daemon.served() == 1
    assert len(chat_server.chat_requests) == requests and alive(pid)


CRASHING_SITECUSTOMIZE = """\
import atexit, sys
import moa_magic.cli

def crashing_main(run=moa_magic.cli.main):
    if sys.argv[1:2] != ["crash-for-test"]:
        return run()
    kind, marker = sys.argv[2:4]
    atexit.register(lambda: open(marker, "w").write("exit handlers ran"))  # an embedded server's shutdown
    raise KeyboardInterrupt if kind == "interrupt" else RuntimeError("a bug in a command")

moa_magic.cli.main = crashing_main
"""


@pytest.mark.parametrize("kind", ["bug", "interrupt"])
def test_a_crashing_warm_command_runs_its_exit_handlers_as_a_cold_one(kind, daemon, client_env, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(CRASHING_SITECUSTOMIZE)
    env = dict(client_env, PYTHONPATH=os.pathsep.join([str(tmp_path), client_env["PYTHONPATH"]]))
    daemon.env = env
    daemon.start()
    outcomes = []
    for mode in ("off", "on"):
        marker = tmp_path / f"atexit-{mode}"
        done = moa("crash-for-test", kind, str(marker), env=dict(env, MOA_MAGIC_DAEMON=mode), text=True)
        as_the_shell_sees = 128 - done.returncode if done.returncode < 0 else done.returncode
        outcomes.append((as_the_shell_sees, done.stderr.splitlines()[-1:], marker.exists()))
    assert daemon.served() == 1
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[1][2], outcomes


def test_a_killed_daemon_takes_its_running_command_with_it(daemon, client_env, chat_server):
    pid = daemon.start()
    chat_server.default_reply = Reply(hang=True)
    client = subprocess.Popen([sys.executable, "-m", "moa_magic", "--preset", "fake", "--no-cache",
                               QUESTION], env=client_env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    command = None
    try:
        chat_server.wait_for_requests(1, timeout=DEADLINE_S)
        [command] = children_of(pid)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(command), "the command ends with its daemon")
        _, stderr = client.communicate(timeout=DEADLINE_S)
    finally:
        if command is not None and alive(command):  # an orphan: the fixture no longer finds it
            os.kill(command, signal.SIGKILL)
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 1
    assert stderr.splitlines()[-1].startswith("moa: the warm process (`moa daemon`) went away"), stderr
    chat_server.wait_idle(timeout=DEADLINE_S)  # and its requests were dropped
