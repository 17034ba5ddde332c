"""What a process forked by the daemon (warm/server.py) does once it has left the daemon's loop:
wait as the spare for the next client, then become that client's command.

Why a spare: forking a ~150 MB process, then in the child starting the worker loop and its HTTP
session and making a first request (slower than any later one), put ~12 ms between a client's
arrival and its first request. The daemon forks the next child ahead of time instead; that child
starts its worker thread (after the fork: a fork copies only the calling thread, so the daemon
itself never has one), rehearses one call on loopback, and then only waits for a client's
descriptors. Nothing it prepares depends on the client: the environment, working directory, umask
and stdio are the client's from `become_command` on, as in a child forked for the command itself.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

HANDOFF_FDS = 5  # the client's stdin, stdout, stderr, its header's pipe, and the connection itself
REHEARSAL_TIMEOUT_S = 5.0
REHEARSAL_REPLY = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                   b'data: {"choices": [{"index": 0, "delta": {"content": "ok"}}]}\n\n'
                   b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
                   b"data: [DONE]\n\n")


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def end_with_the_daemon(daemon_pid: int) -> None:
    """In a child just forked: the daemon's death sends it SIGHUP (Linux), as a closed terminal
    ends a cold `moa`; a command left running would be an orphan nobody waits for (an embedded
    llama server, a paid run). A daemon that died before the request is seen in the parent's pid."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGHUP)
    if os.getppid() != daemon_pid:
        os._exit(0)


def wait_as_spare(handoff: socket.socket) -> None:
    """Warm up, then take the next client's descriptors from the daemon (`hand_off`); the daemon
    closing `handoff` instead means it stops: end without a command."""
    from ..core.runner import warm_up, worker

    warm_up()
    rehearsal = worker.submit(_rehearse_a_call())
    try:
        rehearsal.result(timeout=REHEARSAL_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - without it the command only starts a few ms later
        rehearsal.cancel()
        print(f"moa daemon [{os.getpid()}]: the spare's rehearsal failed ({type(exc).__name__}); "
              f"commands start a few ms later", file=sys.stderr, flush=True)
    try:
        _, fds, _, _ = socket.recv_fds(handoff, 16, HANDOFF_FDS)
    except OSError:
        fds = []
    handoff.close()
    if len(fds) != HANDOFF_FDS:
        os._exit(0)
    become_command(fds)


async def _rehearse_a_call() -> None:
    """One streamed chat call through the HTTP client to a throwaway loopback listener: the first
    request of a forked process took ~5 ms more than the next (memory pages copied on their first
    write, parts of aiohttp built on first use); the spare pays that before a client waits."""
    import asyncio

    from ..config import Provider, RunSettings
    from ..providers.client import stream_chat

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(REHEARSAL_REPLY)
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}/v1"
        await stream_chat(Provider(name="rehearsal", base_url=url), url,
                          {"model": "rehearsal", "messages": [{"role": "user", "content": "hi"}]},
                          RunSettings(retries=0), on_delta=lambda text: None)
    finally:
        listener.close()
        await listener.wait_closed()


def hand_off(handoff: socket.socket, fds: list[int]) -> bool:
    """Send a client's descriptors (in `HANDOFF_FDS` order) to the spare; False if it is gone."""
    try:
        socket.send_fds(handoff, [b"run"], fds)
    except OSError:
        return False
    return True


def become_command(fds: list[int]) -> None:
    """Take over the client's stdio, environment, cwd, umask and argv, then run the command as
    `moa` would (`cli.run_here` exits the process). Before the exit itself the command closes
    the client's stdio and tells the client its status on the connection: tearing down a large
    process takes ~7 ms, which readers of its output and the daemon's reap would otherwise add
    to every command."""
    import marshal

    *stdio, header_fd, connection = fds
    with open(header_fd, "rb") as pipe:
        header = pipe.read()
    if not header:  # the client gave up waiting for `started` and runs the command itself
        os._exit(0)
    header = marshal.loads(header)
    for target, fd in enumerate(stdio):
        os.dup2(fd, target)
        os.close(fd)
    _rebuild_stdio(header["stdio"])
    os.environ.clear()
    os.environ.update(header["environ"])
    os.umask(header["umask"])
    sys.argv, sys.path = header["argv"], header["path"]
    try:
        os.chdir(header["cwd"])
    except OSError as exc:
        print(f"moa: cannot enter the working directory {header['cwd']} ({exc.strerror})",
              file=sys.stderr, flush=True)
        os._exit(1)
    from ..cli import run_here

    def tell_client(code: int) -> None:
        # the client's stdio first: whoever reads its output waits for their end, not for ours
        for fd in range(3):
            os.close(fd)
        try:
            os.write(connection, f"exit {code}\n".encode())
        except OSError:  # the client is gone
            pass

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python's own start-up does
    run_here(before_exit=tell_client)


def _rebuild_stdio(specs: list[dict | None]) -> None:
    """sys.stdin/stdout/stderr on the client's descriptors as Python's start-up builds them:
    the client's encoding and errors, line buffering on a tty (always for stderr), unbuffered
    under -u / PYTHONUNBUFFERED (write_through)."""
    import io

    names = ("stdin", "stdout", "stderr")
    for fd, (name, spec) in enumerate(zip(names, specs)):
        if spec is None:
            stream = None
        else:
            unbuffered = spec["write_through"] and fd != 0
            binary = io.open(fd, "rb" if fd == 0 else "wb", buffering=0 if unbuffered else -1,
                             closefd=False)
            (binary if unbuffered else binary.raw).name = f"<{name}>"
            stream = io.TextIOWrapper(binary, encoding=spec["encoding"], errors=spec["errors"],
                                      newline="\n", line_buffering=spec["line_buffering"],
                                      write_through=spec["write_through"])
            stream.mode = "r" if fd == 0 else "w"
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
