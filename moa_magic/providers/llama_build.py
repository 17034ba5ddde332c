"""Which llama.cpp build the embedded server needs, and the one-line fix when a build crashes.

llama-cpp-python ships no wheels on PyPI, so pip compiles llama.cpp, by default for the build
machine's own CPU; such a build can crash (AMX on some Xeons: SIGSEGV on any multi-token prompt).
The README's install command and .ci/run build with `PORTABLE_CMAKE_ARGS`; tests check they agree.
"""

from __future__ import annotations

import signal
import sys

#: llama.cpp's build flags for any x86-64 CPU with AVX2 (2013 on): native flags off, so no AMX or
#: AVX-512 code path that crashes on some CPUs. The README's install command and .ci/run use them.
PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
#: For CPUs without AVX2 (a portable build then dies with SIGILL).
BASELINE_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF"
LLAMA_REQUIREMENT = "llama-cpp-python[server]==0.3.36"


def rebuild_command(cmake_args: str = PORTABLE_CMAKE_ARGS) -> str:
    """The pip command that rebuilds llama.cpp for this Python with `cmake_args`.

    --no-cache-dir: pip's wheel cache keys a built wheel by version, not by CMAKE_ARGS, so without
    it pip would reinstall the same crashing build.
    """
    return (
        f'CMAKE_ARGS="{cmake_args}" {sys.executable} -m pip install --force-reinstall --no-deps '
        f'--no-cache-dir "{LLAMA_REQUIREMENT}"'
    )


def how_it_ended(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"crashed ({signal.Signals(-returncode).name})"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def fix_for(returncode: int) -> str:
    if returncode == -signal.SIGILL:
        # An instruction this CPU lacks: rebuild without AVX2.
        return rebuild_command(BASELINE_CMAKE_ARGS)
    if returncode < 0 and returncode != -signal.SIGKILL and returncode != -signal.SIGTERM:
        return rebuild_command()
    return "see the log; the next run starts a new server"
