"""Start-up and shut-down of the `moa` command against the loopback server.

    python bench/bench_startup.py [--layers 3] [--proposers 6] [--delay 0.2] [--runs 5]

Runs `python -m moa_magic` as a fresh process (as a user's shell would) with every call answered
after `--delay` seconds, and prints, best and median of `--runs`:

- process start -> first request at the server (goal <= 150 ms): everything before the network,
  beside the floor measured in the same run: a fresh interpreter that only imports aiohttp (for
  the cold command) or nothing (for the warm one);
- last byte the server sent -> process exit: what lingers after the answer;
- command wall / critical path (goal <= 1.10), the critical path being the sum over layers of
  the slowest call as the server saw it (its first request in, its last byte out).

Both sides read CLOCK_MONOTONIC (`time.monotonic`), which one machine shares between processes.
The same command then runs warm, forked from a `moa daemon` started once in the bench's environment
(stopped at the end), interleaved with the cold runs, and the daemon's fork itself is timed.
Then the same for the first `%%moa` in a fresh IPython shell (a subprocess): cell start -> first
request, and the run's wall / critical path; once right after `%load_ext`, once 1 s after it (as
when they are two cells: the extension imports the HTTP client meanwhile).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loopback import ROOT, ChatServer, Reply  # noqa: E402 - also puts tests/ and the tree on sys.path

TOML = """\
[providers.fake]
base_url = "{url}"
max_concurrency = 64

[presets.fake]
layers = [["fake:a"]]
aggregator = "fake:agg"
max_tokens = 64
"""

MAGIC_SCRIPT = """\
import sys, time
from IPython.testing.globalipapp import start_ipython
ip = start_ipython()
ip.run_line_magic("load_ext", "moa_magic")
time.sleep({pause})
print("CELL", time.monotonic(), flush=True)
ip.run_cell_magic("moa", "--preset fake -l {layers} {proposers}", "How does a Mixture-of-Agents work?")
print("END", time.monotonic(), flush=True)
"""


def critical_path(requests: list[dict], layers: int, proposers: int) -> float:
    """Per layer (requests in arrival order), from its first request in to its last byte out."""
    total, at = 0.0, 0
    for size in [proposers] * (layers - 1) + [1]:
        group = requests[at:at + size]
        at += size
        total += max(r["t_end"] for r in group) - min(r["t_start"] for r in group)
    return total


def one_command(server: ChatServer, env: dict, layers: int, proposers: int) -> tuple[float, float, float, float]:
    """Start -> first request, last byte -> exit, wall / critical, first request -> last byte / critical."""
    server.reset()
    server.default_reply = REPLY
    flags = [arg for i in range(proposers) for arg in ("-p", f"fake:m{i}")]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "moa_magic", "--preset", "fake", "-l", str(layers), *flags,
         "--quiet", "How does a Mixture-of-Agents work?"],
        env=env, capture_output=True, text=True,
    )
    ended = time.monotonic()
    assert done.returncode == 0, done.stderr
    requests = server.wait_for_requests(layers * proposers - proposers + 1, finished=True)
    first = min(r["t_start"] for r in requests)
    last = max(r["t_end"] for r in requests)
    critical = critical_path(requests, layers, proposers)
    return first - started, ended - last, (ended - started) / critical, (last - first) / critical


def first_cell(server: ChatServer, env: dict, layers: int, proposers: int, pause: float) -> tuple[float, float]:
    server.reset()
    server.default_reply = REPLY
    flags = " ".join(f"-p fake:m{i}" for i in range(proposers))
    script = MAGIC_SCRIPT.format(layers=layers, proposers=flags, pause=pause)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    marks = dict(line.split() for line in done.stdout.splitlines() if line.startswith(("CELL", "END")))
    cell, end = float(marks["CELL"]), float(marks["END"])
    requests = server.wait_for_requests(layers * proposers - proposers + 1, finished=True)
    first = min(r["t_start"] for r in requests)
    return first - cell, (end - cell) / critical_path(requests, layers, proposers)


def start_floor(env: dict, imports: str = "") -> float:
    """A fresh interpreter that only imports `imports`: with "aiohttp", the least any aiohttp
    client takes to its first request (aiohttp builds its TLS contexts at import, reading the CA
    bundle twice); with nothing, the least any `moa` process takes, a warm one included (this
    venv's editable-install hook is part of it: a regular install has none)."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", f"import time{imports and ', ' + imports}; "
                           "print(time.monotonic())"], env=env, capture_output=True, text=True, check=True)
    return float(done.stdout) - started


FORK_SCRIPT = """\
import os, statistics, time
from moa_magic.warm.preload import preload
preload()
times = []
for _ in range(20):
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    times.append(time.perf_counter() - started)
    os.waitpid(pid, 0)
print(min(times) * 1000, statistics.median(times) * 1000)
"""


# The modules a command imports that the daemon has not: each is imported again by every warm command.
UNLOADED_SCRIPT = """\
import atexit, subprocess, sys
def report():
    preloaded = subprocess.run([sys.executable, "-c", "import sys; from moa_magic.warm.preload import "
                                "preload; preload(); print(*sys.modules)"], capture_output=True,
                               text=True, check=True).stdout.split()
    print(*sorted(set(sys.modules) - set(preloaded) - {{"__main__"}}), file=sys.stderr)
atexit.register(report)
sys.argv = {argv!r}
from moa_magic.cli import run_here
run_here()
"""


def unloaded_modules(env: dict, layers: int, proposers: int) -> str:
    argv = ["moa", "--preset", "fake", "-l", str(layers), "-p", "fake:m0", "--quiet", "-t", "0", "Q"]
    done = subprocess.run([sys.executable, "-c", UNLOADED_SCRIPT.format(argv=argv)], env=env,
                          capture_output=True, text=True, check=True)
    return done.stderr.strip() or "none"


def daemon(env: dict, action: str) -> None:
    subprocess.run([sys.executable, "-m", "moa_magic", "daemon", action], env=env, check=True,
                   stdout=subprocess.DEVNULL)


def print_rows(title: str, rows: list[tuple], floor_label: str, floors: list[float]) -> None:
    print(title)
    for label, index, goal in (("start -> first request", 0, "goal <= 150 ms"),
                               ("last byte -> exit", 1, "")):
        values = [r[index] * 1000 for r in rows]
        print(f"  {label:24} best {min(values):6.1f} ms · median {statistics.median(values):6.1f} ms"
              + (f" ({goal})" if goal else ""))
    print(f"  {floor_label:24} best {min(floors) * 1000:6.1f} ms · median "
          f"{statistics.median(floors) * 1000:6.1f} ms (the floor: start -> first request / floor, "
          f"median {statistics.median(r[0] for r in rows) / statistics.median(floors):.2f})")
    ratios = [r[2] for r in rows]
    print(f"  {'command wall / critical':24} best {min(ratios):6.3f}    · median "
          f"{statistics.median(ratios):6.3f}    (goal <= 1.10)")
    inner = [r[3] for r in rows]
    print(f"  {'first request -> last byte / critical':24} best {min(inner):6.3f} · median "
          f"{statistics.median(inner):6.3f} (the run itself, without start-up and exit)")


REPLY = Reply()


def main() -> int:
    global REPLY
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--proposers", type=int, default=6)
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    REPLY = Reply(delay=args.delay, text="a short answer")

    # a short runtime directory: a Unix socket's path has at most 107 bytes
    with ChatServer() as server, tempfile.TemporaryDirectory() as tmp, \
            tempfile.TemporaryDirectory(prefix="moa-run-") as run_dir:
        config = Path(tmp) / "moa.toml"
        config.write_text(TOML.format(url=server.url))
        env = dict(os.environ, MOA_MAGIC_CONFIG=str(config), XDG_CACHE_HOME=tmp, XDG_RUNTIME_DIR=run_dir,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   PYTHONPYCACHEPREFIX=str(Path(tmp) / "pycache"))
        # As on a user's machine, where pip compiled the package: modules load from bytecode (the
        # warm-up run writes it, outside the tree), not from source on every start.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        cold_env = dict(env, MOA_MAGIC_DAEMON="off")
        one_command(server, cold_env, args.layers, args.proposers)  # warm-up: the OS file cache
        daemon(env, "start")
        try:
            one_command(server, env, args.layers, args.proposers)
            rows, warm_rows, aiohttp_floors, python_floors = [], [], [], []
            for _ in range(args.runs):  # interleaved, so all see the same machine
                rows.append(one_command(server, cold_env, args.layers, args.proposers))
                warm_rows.append(one_command(server, env, args.layers, args.proposers))
                aiohttp_floors.append(start_floor(env, "aiohttp"))
                python_floors.append(start_floor(env))
        finally:
            daemon(env, "stop")
        forks = subprocess.run([sys.executable, "-c", FORK_SCRIPT], env=env, capture_output=True,
                               text=True, check=True).stdout.split()
        unloaded = unloaded_modules(cold_env, args.layers, args.proposers)
        # `%load_ext` then at once the cell, and with the pause of a user running them as two cells
        cells = {pause: [first_cell(server, env, args.layers, args.proposers, pause)
                         for _ in range(max(1, args.runs // 2))] for pause in (0.0, 1.0)}

    shape = f"{args.layers} layers × {args.proposers} proposers, {args.delay * 1000:.0f} ms per call, {args.runs} runs"
    print_rows(f"`moa` as a fresh process: {shape}", rows, "python + import aiohttp", aiohttp_floors)
    print_rows(f"`moa` forked from a warm `moa daemon`: {shape}", warm_rows, "python alone", python_floors)
    print(f"  {'fork in the daemon':24} best {float(forks[0]):6.1f} ms · median {float(forks[1]):6.1f} ms")
    print(f"  {'imported after the fork':24} {unloaded}")
    for pause, runs in cells.items():
        print(f"first %%moa in a fresh IPython shell, {pause:.0f} s after %load_ext ({len(runs)} runs):")
        print(f"  {'cell start -> request':24} best {min(c[0] for c in runs) * 1000:6.1f} ms · median "
              f"{statistics.median(c[0] for c in runs) * 1000:6.1f} ms")
        print(f"  {'cell wall / critical':24} best {min(c[1] for c in runs):6.3f}    · median "
              f"{statistics.median(c[1] for c in runs):6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
