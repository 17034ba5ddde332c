"""The daemon behind `moa daemon start`: preload what a run needs, then fork one child per command.

Why a fork server and not a long-lived server that runs commands itself: a child is a fresh copy of
an already-imported process, so each command gets its own event loop, HTTP session, cache
connection, signal handling, stdio and environment, exactly as a cold `moa` would, and can crash or
be interrupted without touching the daemon or other commands. For fork to be safe the daemon stays
single-threaded and creates no event loop, aiohttp session, sqlite connection or worker thread
(checked before every fork); it waits in a plain `selectors` loop on the listening socket, its
clients and a self-pipe that signals (SIGCHLD, SIGTERM) wake it through `signal.set_wakeup_fd`.
One child is forked ahead of time, the spare (warm/child.py): a client's descriptors are handed to
it, and a new one is forked once a command has ended.

Its log (stdout and stderr, in the run directory) holds lifecycle lines only: never a command's
argv, environment or output (the child's stdio are the client's own file descriptors).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import gc
import json
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time

from . import child, client
from .preload import fork_safe, preload

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
HANDLED_SIGNALS = (signal.SIGCHLD, *STOP_SIGNALS)
ANOTHER_DAEMON = 3  # exit status: another daemon of this install holds the lock (a concurrent start)
CANNOT_START = 4


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} moa daemon [{os.getpid()}]: {message}", flush=True)


class Connection:
    """One client: a command being run (`child` its pid), a status request or a stop request."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""
        self.fds: list[int] = []  # descriptors received, until the `run` line they came with
        self.child: int | None = None
        self.waits_for_exit = False  # a `stop` client: its connection closes when the daemon ends

    def send(self, line: str) -> None:
        try:
            self.sock.sendall(line.encode() + b"\n")
        except OSError:  # the client is gone; its EOF is handled on the next read
            pass


class Daemon:
    """The selectors loop: accept clients, fork a child per `run`, relay signals and exit statuses."""

    def __init__(self, listener: socket.socket, path: str, idle_s: float, kept_fds: list[int]):
        self.listener, self.path, self.idle_s = listener, path, idle_s
        self.kept_fds = kept_fds  # the lock file: children close it too
        self.selector = selectors.DefaultSelector()
        self.connections: dict[int, Connection] = {}
        self.children: dict[int, Connection | None] = {}  # commands running, by pid
        self.spare: tuple[int, socket.socket] | None = None  # its pid, and the socket to hand off on
        self.started = time.monotonic()
        self.last_active = self.started
        self.runs_served = 0
        self.stopping: str | None = None
        self.wake_in, self.wake_out = os.pipe()
        for fd in (self.wake_in, self.wake_out):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_out)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, _note_signal)  # a Python handler, so the wakeup fd hears of it
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.selector.register(self.wake_in, selectors.EVENT_READ)

    def serve(self) -> None:
        self._fork_spare()
        while not (self.stopping and not self.children):
            for key, _ in self.selector.select(self._timeout()):
                if key.fileobj is self.listener:
                    self._accept()
                elif key.fileobj == self.wake_in:
                    self._on_signals()
                elif key.fd in self.connections:  # not dropped earlier in this round
                    self._on_readable(self.connections[key.fd])
            if self._idle() and time.monotonic() - self.last_active >= self.idle_s:
                self._stop(f"idle for {self.idle_s / 60:g} min")
        log(f"stopped ({self.stopping}); {self.runs_served} runs served")

    def _idle(self) -> bool:
        return not self.connections and not self.children

    def _timeout(self) -> float | None:
        if self.stopping or not self._idle():
            return None
        return max(0.0, self.last_active + self.idle_s - time.monotonic())

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        if not _same_user(sock):
            sock.close()
            return
        sock.setblocking(False)
        self.connections[sock.fileno()] = Connection(sock)
        self.selector.register(sock, selectors.EVENT_READ)

    def _on_readable(self, conn: Connection) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(conn.sock, 4096, 4)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if not data:
            self._drop(conn)
            return
        conn.buffer += data
        conn.fds += fds
        while b"\n" in conn.buffer and conn.sock.fileno() in self.connections:
            line, _, conn.buffer = conn.buffer.partition(b"\n")
            self._on_line(conn, line.decode("ascii", "replace"))

    def _on_line(self, conn: Connection, line: str) -> None:
        word, _, value = line.partition(" ")
        if word == "run" and conn.child is None and not self.stopping:
            conn.send("ready")  # the client's descriptors come only now: never to a hung daemon
        elif word == "fds" and len(conn.fds) == 4 and conn.child is None and not self.stopping:
            fds, conn.fds = conn.fds, []
            self._run(conn, fds)
        elif word == "signal" and conn.child is not None and value.isdigit():
            if int(value) in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                _kill(conn.child, int(value))
        elif word == "status":
            conn.send(json.dumps(self._status()))
            self._drop(conn)
        elif word == "stop":
            conn.send(f"stopping {len(self.children)}")
            conn.waits_for_exit = True
            self._stop("stop requested")
            # the connection stays open: its client sees it close when this process has exited
        else:
            self._drop(conn)  # nothing ran: a `run` client goes on in its own process

    def _run(self, conn: Connection, fds: list[int]) -> None:
        """Give the command to the spare, or else to a child forked for it."""
        fds.append(os.dup(conn.sock.fileno()))  # the child's own, for its `exit STATUS`
        spare, self.spare, pid = self.spare, None, None
        if spare is not None:
            if child.hand_off(spare[1], fds):
                pid = spare[0]
            spare[1].close()  # a spare that missed its hand-off sees the end, and exits
        if pid is None:
            pid = self._fork(lambda: child.become_command(fds))
        for fd in fds:
            os.close(fd)
        if pid is None:
            self._drop(conn)
            return
        conn.child = pid
        self.children[pid] = conn
        self.runs_served += 1
        conn.send(f"started {pid}")

    def _fork_spare(self) -> None:
        """The next command's process, forked now rather than when its client comes. After a
        command ended rather than when one starts: a fork then would take CPU from that command's
        own start, and a shell runs one command after another."""
        if self.spare is not None or self.stopping:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

        def be_the_spare():
            ours.close()
            child.wait_as_spare(theirs)

        pid = self._fork(be_the_spare)
        theirs.close()
        if pid is None:
            ours.close()
        else:
            self.spare = (pid, ours)

    def _fork(self, body) -> int | None:
        """A child that leaves the daemon and runs `body` (which ends the process); None: not safe."""
        if not fork_safe():
            log("refused to fork: more than one thread (a bug); clients run their commands themselves")
            return None
        # Until the child has its own handlers, a signal sent to it (a client's Ctrl-C right after
        # `run`) would run the daemon's handler there and wake the daemon's loop instead: blocked,
        # it waits for the child's handlers.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        daemon_pid = os.getpid()
        try:
            pid = os.fork()
            if pid == 0:
                try:
                    self._leave()
                    child.end_with_the_daemon(daemon_pid)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
                    body()
                finally:
                    os._exit(70)  # never back into the daemon's loop, whatever happened
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        return pid

    def _leave(self) -> None:
        """In a child: default signal handling, and none of the daemon's descriptors (sockets are
        closed through their objects: a later garbage collection must not close a reused number)."""
        signal.set_wakeup_fd(-1)
        for signum in HANDLED_SIGNALS:  # Ctrl-C too: Python's KeyboardInterrupt from the command on
            signal.signal(signum, signal.SIG_DFL)
        self.selector.close()
        for conn in self.connections.values():
            conn.sock.close()
            for fd in conn.fds:
                os.close(fd)
        self.listener.close()
        for fd in (self.wake_in, self.wake_out, *self.kept_fds):
            os.close(fd)

    def _on_signals(self) -> None:
        try:
            received = os.read(self.wake_in, 512)
        except BlockingIOError:
            received = b""
        if any(signum in received for signum in STOP_SIGNALS):
            self._stop("signal")
        self._reap()

    def _reap(self) -> None:
        """Collect ended children; tell a command's client its status (the command's own `exit`
        line came first unless a signal ended it), then fork the next spare. A spare that died
        waiting is replaced only after a command, so one that cannot start does not loop."""
        command_ended = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if self.spare is not None and pid == self.spare[0]:
                self.spare[1].close()
                self.spare = None
                continue
            code = os.waitstatus_to_exitcode(status)
            command_ended |= pid in self.children
            conn = self.children.pop(pid, None)
            self.last_active = time.monotonic()
            if conn is not None:
                conn.send(f"exit {128 - code if code < 0 else code}")  # a signal: as a shell says
                self._drop(conn)
        if command_ended:
            self._fork_spare()

    def _drop(self, conn: Connection) -> None:
        """Close a client; a command whose client went away (killed) gets SIGHUP."""
        if self.connections.pop(conn.sock.fileno(), None) is None:
            return
        for fd in conn.fds:  # descriptors sent with anything but `run`
            os.close(fd)
        if conn.child in self.children:
            _kill(conn.child, signal.SIGHUP)
            self.children[conn.child] = None
        self.selector.unregister(conn.sock)
        conn.sock.close()
        self.last_active = time.monotonic()

    def _stop(self, reason: str) -> None:
        """Accept no more commands; the loop ends once the running ones have."""
        if self.stopping:
            return
        self.stopping = reason
        if self.spare is not None:  # it sees its socket close, and exits; the loop waits for it
            pid, handoff = self.spare
            handoff.close()
            self.children[pid], self.spare = None, None
        self.selector.unregister(self.listener)
        self.listener.close()
        _unlink(self.path)
        for conn in list(self.connections.values()):
            if conn.child is None and not conn.waits_for_exit:
                self._drop(conn)

    def _status(self) -> dict:
        return {"pid": os.getpid(), "uptime_s": time.monotonic() - self.started,
                "runs_served": self.runs_served, "running": len(self.children),
                "idle_min": self.idle_s / 60, "rss_bytes": _rss_bytes()}


def _note_signal(signum, frame) -> None:
    """Nothing to do here: the byte set_wakeup_fd writes wakes the loop, which acts on it."""


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _same_user(sock: socket.socket) -> bool:
    """Linux: the peer's uid (SO_PEERCRED). Elsewhere the 0700 directory is the check."""
    if not hasattr(socket, "SO_PEERCRED"):
        return True
    ucred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", ucred)[1] == os.getuid()


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no /proc: the peak instead (kilobytes on Linux, bytes on macOS)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _listen(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    _unlink(path)  # a socket left by a daemon that was killed: we hold the lock now
    umask = os.umask(0o177)  # created 0600, with no moment when others could connect
    try:
        listener.bind(path)
    finally:
        os.umask(umask)
    listener.listen(128)
    listener.setblocking(False)
    return listener


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moa_magic.warm")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--idle", type=float, required=True, help="minutes")
    args = parser.parse_args(argv)
    lock = os.open(args.socket[:-len(".sock")] + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
                   0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            log("another daemon serves this install already")
            return ANOTHER_DAEMON
        raise
    preload()
    if client.socket_path() != args.socket:
        log("this install changed while the daemon started; start it again")
        return CANNOT_START
    if not fork_safe():
        log(f"preloading left {threading.active_count()} threads: cannot fork safely")
        return CANNOT_START
    daemon = Daemon(_listen(args.socket), args.socket, args.idle * 60, [lock])
    gc.freeze()  # what is loaded now stays put: children do not copy its pages by touching them
    log(f"started; serving {args.socket}; exits after {args.idle:g} min idle")
    try:
        daemon.serve()
    finally:
        _unlink(args.socket)  # no other daemon can have bound it: we still hold the lock
    return 0
