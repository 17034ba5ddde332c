"""The `moa` side of the warm process: find this install's daemon, hand it the command, relay
signals, exit with the command's status.

Nothing beyond what a bare `python` has loaded, apart from `_socket` (the C half of `socket`:
`socket` itself builds enums at import, ~3 ms): this runs before every warm command, and when no
daemon serves this install, `moa` pays for a fingerprint and one failed `stat`
(`bench/bench_startup.py`). So no hashlib (the fingerprint is hashed with integer arithmetic), no
json (the header is `marshal`, which the interpreter itself uses for bytecode) and no `signal`
(`_signal` is what Python's start-up already imported).

The protocol, on a Unix stream socket whose name carries the fingerprint (`socket_path`):
- `run\\n`, answered `ready\\n` (a hung daemon never gets the client's terminal), then `fds\\n`
  with four file descriptors (stdin, stdout, stderr, and the read end of a pipe that
  carries the header: argv, cwd, environment, umask, sys.path, stdio encodings, marshalled; both
  ends run the same interpreter, as the fingerprint makes sure). The daemon itself never reads
  the header, so the client's environment (API keys) is only ever in the child's memory. Then the
  client may send `signal N\\n` (Ctrl-C, SIGTERM, SIGHUP it received). The daemon answers
  `started PID\\n` once a child took the command, and the child `exit STATUS\\n` as its last act
  (the daemon too, when it reaps the child: the first one counts, and after a signal death only
  the daemon's comes). A connection that ends before `started` means nothing ran: the client
  runs cold.
- `status\\n`: one JSON line (pid, uptime, runs served, idle timeout, RSS), then the daemon closes.
- `stop\\n`: `stopping N\\n` (N commands still running), then the connection stays open until the
  daemon process has exited.
"""

from __future__ import annotations

import os
import sys

DISABLE_ENV = "MOA_MAGIC_DAEMON"
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# sizeof(sockaddr_un.sun_path) minus its terminating NUL
MAX_SOCKET_PATH = 107 if sys.platform.startswith("linux") else 103
FORWARDED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
# How long a client waits for the daemon to take its command before running it itself: forking
# takes milliseconds, so only a hung (or SIGSTOPped) daemon makes a command wait this long.
START_TIMEOUT_S = 3.0
# Environment read at import by the modules the daemon preloads (aiohttp's TLS contexts read the CA
# bundle, the *_NO_EXTENSIONS switches pick C or Python code, the locale sets default encodings,
# PYTHON* steer the interpreter): a daemon only serves clients whose values are the same.
IMPORT_TIME_ENV = ("SSL_CERT_FILE", "SSL_CERT_DIR", "AIOHTTP_NOSENDFILE", "PYDANTIC_DISABLE_PLUGINS",
                   "LANG", "LC_ALL", "LC_CTYPE")
FINGERPRINT_MODULUS = 2**61 - 1


def supported() -> bool:
    """fork, AF_UNIX and passing file descriptors (socket.send_fds): Linux, macOS, the BSDs."""
    return os.name == "posix" and hasattr(os, "fork")


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() == "off"


def user_cache_dir() -> str:
    """platformdirs.user_cache_path("moa-magic") (where the request cache lives), without importing
    platformdirs (~10 ms): absolute $XDG_CACHE_HOME, else ~/Library/Caches (macOS), else ~/.cache."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.expanduser("~/Library/Caches" if sys.platform == "darwin" else "~/.cache")
    return os.path.join(base, "moa-magic")


def run_dir() -> str:
    """Where daemons keep their sockets and logs: $XDG_RUNTIME_DIR/moa-magic, else the cache dir's run/."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        return os.path.join(runtime, "moa-magic")
    return os.path.join(user_cache_dir(), "run")


def import_time_env() -> dict[str, str]:
    """The variables of this environment that the preloaded modules read at import."""
    return {name: value for name, value in os.environ.items()
            if name in IMPORT_TIME_ENV or name.startswith("PYTHON") or name.endswith("_NO_EXTENSIONS")}


def fingerprint() -> str:
    """What a command's process would import and how: the interpreter, its flags and path, this
    package's files (an edited module makes older daemons unreachable; they end when idle) and the
    environment read at import. sys.path[0] is left out: it is the script's directory, or the
    working directory under `python -m`, and the child gets the client's sys.path anyway."""
    parts = [sys.executable, sys.version, repr(sys.path[1:]), repr(tuple(sys.flags)), PACKAGE_DIR]
    parts += sorted(f"{name}={value}" for name, value in import_time_env().items())
    files = []
    folders = [PACKAGE_DIR]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name != "__pycache__":  # bytecode: written by the daemon's own imports
                        folders.append(entry.path)
                else:
                    stat = entry.stat()
                    files.append(f"{entry.path}\0{stat.st_mtime_ns}\0{stat.st_size}")
    parts += sorted(files)
    # The bytes as one number modulo a Mersenne prime (a polynomial hash): no hashlib to import
    # (~4 ms). It need not resist forgery, only the 0700 run directory's owner makes sockets there;
    # two installs share a name by chance with odds of about 2**-61.
    number = int.from_bytes("\n".join(parts).encode("utf-8", "surrogateescape"), "big")
    return f"{number % FINGERPRINT_MODULUS:016x}"


def socket_path() -> str:
    return os.path.join(run_dir(), f"{fingerprint()}.sock")


def run_warm(argv: list[str]) -> int | None:
    """Run this command in the daemon: its exit status, or None when it must run here (no daemon
    of this install, disabled, unsupported, or the daemon went away before starting it)."""
    if disabled() or not supported() or (argv and argv[0] == "daemon"):
        return None
    sock = _connect(socket_path())
    if sock is None:
        return None
    try:
        return _relay(sock)
    finally:
        sock.close()


def _connect(path: str):
    """A `_socket.socket` connected to this user's daemon at `path`, or None: none runs there, or
    what listens there is not ours. The command's keys and terminal go through this socket, so the
    run directory must be a real directory of ours that nobody else can enter, the socket file ours,
    and the process at the other end ours (SO_PEERCRED): else another user could have put it there."""
    import _socket
    import stat

    uid = os.getuid()
    try:
        if len(os.fsencode(path)) > MAX_SOCKET_PATH or not hasattr(_socket, "SCM_RIGHTS"):
            return None
        folder, socket_file = os.lstat(os.path.dirname(path)), os.lstat(path)
    except (OSError, ValueError):  # none running; ValueError: a NUL in the environment's paths
        return None
    if not (stat.S_ISDIR(folder.st_mode) and folder.st_uid == uid and not folder.st_mode & 0o077
            and stat.S_ISSOCK(socket_file.st_mode) and socket_file.st_uid == uid):
        return None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
        if _peer_uid(sock) == uid:
            return sock
    except OSError:  # a socket left by a daemon that was killed
        pass
    sock.close()
    return None


def _peer_uid(sock) -> int | None:
    """The uid of the process that listens on a connected Unix socket, or None where we cannot ask."""
    import _socket

    if hasattr(_socket, "SO_PEERCRED"):  # Linux: struct ucred {pid, uid, gid}
        credentials = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    elif hasattr(_socket, "LOCAL_PEERCRED"):  # macOS, FreeBSD: struct xucred {version, uid, ...}
        credentials = sock.getsockopt(0, _socket.LOCAL_PEERCRED, 76)  # level 0: SOL_LOCAL
    else:
        return None
    return int.from_bytes(credentials[4:8], sys.byteorder)


class _SignalBeforeStart(BaseException):
    """Ctrl-C, SIGTERM or SIGHUP before the daemon said `started`: nothing has run, nothing will."""


def _relay(sock) -> int | None:
    """Hand the command over and relay until it ends; None: the daemon did not take it in time
    (it went away, or hangs, e.g. stopped with SIGSTOP), and nothing ran: the command runs here.
    The header is the commit point: it is written only once the daemon said `started`, and a child
    whose header pipe ends empty exits without running anything."""
    import _signal
    import _socket

    state = {"started": False}

    def forward(signum, frame):
        if not state["started"]:
            raise _SignalBeforeStart(signum)
        try:
            sock.sendall(f"signal {signum}\n".encode())
        except OSError:
            pass

    header = _header()
    handlers = {signum: _signal.signal(signum, forward)
                for signum in (getattr(_signal, name) for name in FORWARDED_SIGNALS)}
    header_in, header_out = os.pipe()
    try:
        # what socket.send_fds sends, without importing socket (and array): the descriptors as C ints
        fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2, header_in))
        sock.settimeout(START_TIMEOUT_S)
        lines = _lines(sock)
        try:
            sock.sendall(b"run\n")
            if next(lines, "") != "ready":  # a daemon that went away or hangs gets no descriptor
                return _restored(handlers, None)
            sock.sendmsg([b"fds\n"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        except OSError:  # a standard stream is closed (EBADF), or the daemon went away
            return _restored(handlers, None)
        finally:
            os.close(header_in)
        if not next(lines, "").startswith("started "):
            return _restored(handlers, None)
        state["started"] = True
        sock.settimeout(None)
        with open(header_out, "wb", closefd=False) as pipe:
            pipe.write(header)
    except _SignalBeforeStart as interrupted:
        _restored(handlers, None)
        _signal.raise_signal(interrupted.args[0])  # as it would have ended a cold `moa`
        return None
    except OSError:  # the child is gone before reading its header
        pass
    finally:
        os.close(header_out)
    for line in lines:
        word, _, value = line.partition(" ")
        if word == "exit":
            return int(value)
    print("moa: the warm process (`moa daemon`) went away before the command ended; run it "
          "again, or with MOA_MAGIC_DAEMON=off.", file=sys.stderr)
    return 1


def _restored(handlers: dict, value):
    """Python's own signal handling back (the command runs here); `value`."""
    import _signal

    for signum, handler in handlers.items():
        _signal.signal(signum, handler)
    return value


def _lines(sock):
    """The daemon's lines as they come, until the connection ends (or a recv times out)."""
    buffer = b""
    while True:
        while b"\n" in buffer:
            line, _, buffer = buffer.partition(b"\n")
            yield line.decode("ascii", "replace")
        try:
            data = sock.recv(256)
        except OSError:  # TimeoutError included
            return
        if not data:
            return
        buffer += data


def _header() -> bytes:
    import marshal

    umask = os.umask(0)
    os.umask(umask)
    return marshal.dumps({
        "argv": sys.argv, "cwd": os.getcwd(), "environ": dict(os.environ), "umask": umask,
        "path": sys.path, "stdio": [_stream_spec(stream) for stream in (sys.stdin, sys.stdout, sys.stderr)],
    })


def _stream_spec(stream) -> dict | None:
    """How Python set this standard stream up, so the child builds its own the same way."""
    if stream is None:
        return None
    return {"encoding": stream.encoding, "errors": stream.errors,
            "line_buffering": stream.line_buffering, "write_through": stream.write_through}


def ask(path: str, command: str) -> tuple[object, str] | None:
    """Send `status` or `stop` to the daemon at `path`: (the open `_socket.socket`, its first line),
    or None when no daemon answers there. The caller closes the socket."""
    sock = _connect(path)
    if sock is None:
        return None
    try:
        sock.sendall(f"{command}\n".encode())
    except OSError:
        sock.close()
        return None
    sock.settimeout(START_TIMEOUT_S)
    line = next(_lines(sock), None)
    if line is None:
        sock.close()
        return None
    sock.settimeout(None)
    return sock, line
