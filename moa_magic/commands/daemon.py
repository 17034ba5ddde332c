"""`moa daemon start [--idle MINUTES] | stop | status`: the opt-in warm process (moa_magic/warm/).

While it runs, every other `moa` command of this install (same interpreter, environment and
package files) is forked from it instead of starting cold. `stop` lets running commands finish.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time

from ..warm import client
from ..warm.server import ANOTHER_DAEMON

START_TIMEOUT_S = 60.0  # preloading takes ~1 s; a loaded 2-core machine can take much longer
# What the daemon process itself keeps of the environment of `moa daemon start`: what imports and
# the socket's location read. Keys and other secrets stay out of it: each command brings its own.
KEPT_ENV = ("HOME", "PATH", "TMPDIR", "TZ", "USER", "LOGNAME", "XDG_RUNTIME_DIR", "XDG_CACHE_HOME")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, as for every other bad input (exit 2)."""
        self.exit(2, f"moa daemon: {message} (usage: moa daemon start [--idle MINUTES] | stop | status)\n")


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"give a number of minutes above 0, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moa daemon",
                     description="A warm process that makes every `moa` command of this install "
                                 "start in milliseconds (opt-in; MOA_MAGIC_DAEMON=off bypasses it).")
    actions = parser.add_subparsers(dest="action", required=True, parser_class=_Parser)
    start = actions.add_parser("start", help="start it (nothing happens if one runs)")
    start.add_argument("--idle", type=_minutes, default=30.0, metavar="MINUTES",
                       help="exit after this long with no command (default 30)")
    actions.add_parser("stop", help="stop it; running commands finish first")
    actions.add_parser("status", help="pid, uptime, commands served, idle timeout, memory")
    return parser


def main(argv: list[str]) -> int:
    from ..errors import MoaUserError

    args = build_parser().parse_args(argv)
    try:
        if not client.supported():
            raise MoaUserError("moa daemon needs fork and Unix sockets (Linux, macOS, BSD); here every "
                               "command runs in its own process.")
        path = client.socket_path()
        if len(os.fsencode(path)) > client.MAX_SOCKET_PATH:
            raise MoaUserError(f"the daemon's socket path {path} is {len(os.fsencode(path))} bytes, over the "
                               f"{client.MAX_SOCKET_PATH} a Unix socket allows: set XDG_RUNTIME_DIR "
                               f"to a shorter directory.")
        return {"start": start, "stop": stop, "status": status}[args.action](path, args)
    except MoaUserError as exc:
        print(f"moa: {exc}", file=sys.stderr)
        return 2


def _running(path: str) -> dict | None:
    answer = client.ask(path, "status")
    if answer is None:
        return None
    sock, line = answer
    sock.close()
    return json.loads(line)


def start(path: str, args) -> int:
    running = _running(path)
    if running is not None:
        print(f"moa daemon: already running (pid {running['pid']}) at {path}")
        return 0
    folder = os.path.dirname(path)
    _private_folder(folder)
    log_path = path[:-len(".sock")] + ".log"
    env = {**client.import_time_env(),
           **{name: value for name, value in os.environ.items() if name in KEPT_ENV or name.startswith("LC_")}}
    try:  # not through a symbolic link someone put there
        log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise MoaUserError(f"cannot open the daemon's log {log_path} ({exc.strerror})") from None
    with open(log_fd, "ab") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "moa_magic.warm", "--socket", path, "--idle", repr(args.idle)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/", env=env,
            start_new_session=True,  # no terminal: Ctrl-C in this shell never reaches it
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while (running := _running(path)) is None:
        try:
            daemon.wait(timeout=0.05)  # the poll interval, cut short if the daemon ends
        except subprocess.TimeoutExpired:
            pass
        else:
            if daemon.returncode != ANOTHER_DAEMON:  # else a concurrent start's daemon is coming up
                print(f"moa: the daemon did not start: {_last_line(log_path)} (log: {log_path})",
                      file=sys.stderr)
                return 1
            threading.Event().wait(0.05)
        if time.monotonic() > deadline:
            if daemon.returncode is None:
                daemon.kill()
                daemon.wait()
            print(f"moa: the daemon did not answer within {START_TIMEOUT_S:g} s; log: {log_path}",
                  file=sys.stderr)
            return 1
    if daemon.returncode == ANOTHER_DAEMON:
        print(f"moa daemon: already running (pid {running['pid']}) at {path}")
    else:
        print(f"moa daemon: running (pid {running['pid']}) at {path}; exits after {args.idle:g} min idle")
    return 0


def stop(path: str, args) -> int:
    answer = client.ask(path, "stop")
    if answer is None:
        print("moa daemon: not running")
        return 0
    sock, line = answer
    try:
        running = int(line.split()[1])
        if running:
            print(f"moa daemon: stopping once {running} running command(s) have finished",
                  file=sys.stderr, flush=True)
        while sock.recv(256):  # the connection closes when the daemon process has ended
            pass
    finally:
        sock.close()
    print("moa daemon: stopped")
    return 0


def status(path: str, args) -> int:
    running = _running(path)
    if running is None:
        print(f"moa daemon: not running for this install (it would listen at {path})")
        return 1
    rss = running["rss_bytes"]
    print(f"moa daemon: running (pid {running['pid']}) at {path}\n"
          f"  up {_duration(running['uptime_s'])} · {running['runs_served']} command{'s' * (running['runs_served'] != 1)} served · "
          f"{running['running']} running · exits after {running['idle_min']:g} min idle · "
          f"RSS {'?' if rss is None else f'{rss / 2**20:.0f} MB'}")
    return 0


def _private_folder(folder: str) -> None:
    """The run directory, 0700 and ours: nobody else may connect to (or replace) a socket in it.
    Clients check the same (warm/client.py `_connect`)."""
    import stat

    from ..errors import MoaUserError

    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        info = os.lstat(folder)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise MoaUserError(f"{folder} is not a directory of your own (another user's, or a "
                               f"symbolic link): set XDG_RUNTIME_DIR to a directory of your own.")
        if info.st_mode & 0o077:
            os.chmod(folder, 0o700)
    except OSError as exc:
        raise MoaUserError(f"cannot create the daemon's directory {folder} ({exc.strerror or exc}); "
                           f"set XDG_RUNTIME_DIR to a writable directory.") from None


def _last_line(path: str) -> str:
    with open(path, "rb") as log:
        lines = log.read().decode("utf-8", "replace").strip().splitlines()
    return lines[-1].partition("]: ")[2] or lines[-1] if lines else "no message"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
