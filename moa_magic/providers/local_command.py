"""How the embedded server is run: the child's argv (llama_cpp.server's own flags) and how many
CPU threads llama.cpp gets. Stateless; the process that runs it (start, self-check, stop) is
providers/local.py, the child's bootstrap providers/local_child.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

MODEL_ALIAS = "smollm2"
CHILD_SCRIPT = Path(__file__).with_name("local_child.py")
N_CTX = 2048
#: Set to override the number of CPU threads the server uses (default: all usable cores).
THREADS_ENV = "MOA_MAGIC_LOCAL_THREADS"


def cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads() -> tuple[int, int]:
    """(n_threads, n_threads_batch) for llama.cpp.

    Decoding a 135M model is latency-bound: every token is a few tiny matmuls with a thread
    barrier between them, so more threads mostly add synchronisation, and a spinning thread that
    loses its core to another process stalls the rest. Measured on 2 busy cores: 1 thread ~125
    tok/s, 2 threads 64-94 tok/s. So generation uses half the cores (1..4); prompt processing
    (batched, compute-bound) uses them all. MOA_MAGIC_LOCAL_THREADS overrides both.
    """
    env = os.environ.get(THREADS_ENV, "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), int(env)
    count = cores()
    return max(1, min(4, count // 2)), count


def server_command(model: Path, port: int) -> list[str]:
    """The child's argv (the flags are llama_cpp.server's own)."""
    n_gen, n_batch = threads()
    return [
        sys.executable, str(CHILD_SCRIPT),
        "--model", str(model),
        "--model_alias", MODEL_ALIAS,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", str(N_CTX),
        "--n_threads", str(n_gen),
        "--n_threads_batch", str(n_batch),
        # By default a new request *interrupts* the one being streamed (it just gets [DONE],
        # silently truncated). MoA sends several at once: queue them instead.
        "--interrupt_requests", "False",
        # mlock fails (with a warning) under the usual 8 MB RLIMIT_MEMLOCK; mmap is enough.
        "--use_mlock", "False",
    ]
