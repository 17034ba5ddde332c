"""Mixture-of-Agents in Jupyter: `%load_ext moa_magic`, then a `%%moa` cell.

Import stays light: the engine, aiohttp, encodings and price data load on first use.
"""

from .version import __version__

_LAZY = {
    "run": "core.runner",
    "arun": "core.runner",
    "last_result": "core.runner",
    "Chat": "core.chat",
    "batch": "core.batch",
    "last_batch": "core.batch",
    "BatchResult": "core.batch_result",
    "load_config": "config",
    "load": "core.load",
    "replay": "core.replay",
    "MoaResult": "core.result",
    "CallRecord": "core.result",
    "MoaError": "errors",
    "MoaUserError": "errors",
    "RunFailed": "errors",
}

__all__ = sorted(_LAZY) + ["__version__", "load_ipython_extension", "unload_ipython_extension"]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moa_magic' has no attribute {name!r}")
    import importlib

    # Results shown through the public API display as the static rendition (`_moa`, Out[n]):
    # the render side plugs its forms into the data types when it is imported.
    importlib.import_module(f"{__name__}.render.static")
    importlib.import_module(f"{__name__}.render.batch")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def load_ipython_extension(ipython):
    from .notebook.magics import load

    load(ipython)


def unload_ipython_extension(ipython):
    from .notebook.magics import unload

    unload(ipython)
