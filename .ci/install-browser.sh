#!/usr/bin/env bash
# Install what the browser tests (tests/browser, marker `browser`) need:
#   - Debian's chromium (Playwright drives it via executable_path=/usr/bin/chromium)
#   - jupyterlab, notebook 7 + playwright (the `browser` extra) into the active Python env
#   - an ipykernel kernelspec inside that env, so JupyterLab's "python3" kernel
#     is the env's own interpreter.
# Idempotent. Never runs `playwright install` (no browser downloads here).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$repo_root/.venv/bin/activate" ]; then
    # shellcheck disable=SC1091
    . "$repo_root/.venv/bin/activate"
fi
PY="${PYTHON:-python}"

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

if [ ! -x /usr/bin/chromium ]; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core
fi

if ! "$PY" -c 'import jupyterlab, notebook, playwright, nbformat, pytest_timeout' >/dev/null 2>&1; then
    "$PY" -m pip install -q -e ".[browser,test]"
fi

# Kernelspec inside the env (sys.prefix/share/jupyter/kernels/python3), pointing
# at this env's python. JupyterLab run from the env finds it first.
"$PY" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (ipykernel)" >/dev/null

/usr/bin/chromium --version 2>/dev/null  # the Debian wrapper prints a harmless "[: unexpected operator"
"$PY" -c 'import jupyterlab, playwright, importlib.metadata as m; print("jupyterlab", jupyterlab.__version__, "playwright", m.version("playwright"))'
