"""The embedded server's process: watchdogs that end it with its owner, then llama_cpp.server.

Run as a script (by path, so it needs nothing importable but llama_cpp) by `local_command.server_command`;
argv holds llama_cpp.server's own flags. See providers/local.py for why the watchdogs exist.
"""

import os
import sys
import threading
import time

# Run by path, so this file's folder is sys.path[0]: drop it, our module names must not shadow any.
del sys.path[0]
_parent = int(os.environ.pop("MOA_MAGIC_PARENT_PID", "0") or 0)


def _stdin_watch():
    # Our stdin is a pipe whose only writer is the parent: EOF means the parent is gone.
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    os._exit(0)


def _ppid_watch():
    while True:
        if _parent and os.getppid() != _parent:
            os._exit(0)
        time.sleep(1.0)


threading.Thread(target=_stdin_watch, name="moa-stdin-watch", daemon=True).start()
threading.Thread(target=_ppid_watch, name="moa-ppid-watch", daemon=True).start()

# llama_cpp.server reads its settings from env vars too (pydantic-settings, no prefix, e.g.
# API_KEY, MODEL, N_CTX, and HOST/PORT override the flags): a user's unrelated API_KEY would make
# the server demand auth. Drop every variable named like a setting; the flags say it all.
from llama_cpp.server.settings import ModelSettings, ServerSettings
_names = {n.lower() for n in ModelSettings.model_fields} | {n.lower() for n in ServerSettings.model_fields}
_names |= {"host", "port", "config_file"}
for _k in list(os.environ):
    if _k.lower() in _names:
        del os.environ[_k]

# A trailing assistant message is a prefix to continue, as llama.cpp's own llama-server does by
# default ("assistant prefill"): llama_cpp.server would close that turn and open a new one. The
# prompt is the model's own chat template up to the reply's start, then the prefix (staircase
# streaming, core/staircase.py, continues its answer so).
from llama_cpp import llama_chat_format as _chat_format

_render = _chat_format.Jinja2ChatFormatter.__call__


def _render_with_prefill(self, *, messages, **kwargs):
    if len(messages) < 2 or messages[-1].get("role") != "assistant":
        return _render(self, messages=messages, **kwargs)
    response = _render(self, messages=messages[:-1], **kwargs)
    response.prompt += messages[-1].get("content") or ""
    return response


_chat_format.Jinja2ChatFormatter.__call__ = _render_with_prefill

import runpy
sys.argv[0] = "llama_cpp.server"
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
