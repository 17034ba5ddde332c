"""Plumbing shared by the test modules: the fake providers' moa.toml blocks, hostile model text and
its checks, the kernel to run notebooks in, a widget's CSS classes, waiting for runs to end.

A plain module, not a conftest (tests/browser has a conftest of its own, and two conftests clash on
import); `tests/conftest.py` puts this directory on `sys.path`. In the TOML blocks `{url}` is the
ChatServer's base URL (filled in by the `write_moa_toml` fixture).
"""

from __future__ import annotations

import asyncio
import re
import sys
import threading
import time

FAKE_PROVIDER = """\
[providers.fake]
base_url = "{url}"
"""

# a provider whose key is read from MOA_TEST_KEY (unset unless a test sets it)
FAKEKEY_PROVIDER = """\
[providers.fakekey]
base_url = "{url}"
api_key_env = "MOA_TEST_KEY"
"""

FAKE_PRESET = """\
[presets.fake]
layers = [["fake:a", "fake:b", "fake:c"]]
aggregator = "fake:agg"
"""

NO_RETRIES = """\
[settings]
retries = 0
backoff_base = 0
"""



def prices_toml(**models: tuple[float, float]) -> str:
    """`[prices."fake:NAME"]` tables, USD per million tokens: `prices_toml(a=(1, 2), agg=(3, 4))`."""
    return "".join(
        f'\n[prices."fake:{name}"]\ninput = {price_in}\noutput = {price_out}\n'
        for name, (price_in, price_out) in models.items()
    )

# The moa.toml of the `moa_config` fixture: providers `fake` and `fakekey` pointing at a
# ChatServer, and preset `fake` (3 proposers + aggregator).
MOA_TOML = "\n".join([FAKE_PROVIDER, FAKEKEY_PROVIDER, FAKE_PRESET])

HOSTILE = (
    "Hello <script>alert(1)</script>\n\n"
    "<img src=x onerror=alert(1)>\n\n"
    "[x](javascript:alert(1)) [y](JaVa&#115;cript:alert(2)) [z](data:text/html,<b>hi</b>)\n\n"
    "![p](data:image/png;base64,AAAA) [v](vbscript:msgbox) <javascript:alert(3)>\n\n"
    "[ref]: javascript:alert(4)\n\n[ref]\n\n"
    "\x1b[31mred\x1b[0m and a [good link](https://example.com/a?b=1)"
)


def assert_inert_html(text: str) -> None:
    lower = text.lower()
    assert "<script" not in lower
    assert not re.search(r"<[^>]*\bonerror\s*=", lower), text
    assert not re.search(r"<[^>]*\bon[a-z]+\s*=", lower), text
    assert not re.search(r"""(href|src)\s*=\s*["']?\s*(javascript|vbscript|data):""", lower), text
    assert "<img" not in lower  # the only image in HOSTILE has a data: URL


def assert_inert_markdown(text: str) -> None:
    assert "<" not in text.replace("&lt;", "")  # no raw HTML can form
    assert not re.search(r"\]\(\s*<?\s*(javascript|vbscript|data)", text, re.I), text
    assert not re.search(r"^\s{0,3}\[[^\]]*\]:\s*javascript", text, re.I | re.M), text


def venv_kernel() -> str:
    """The `python3` kernelspec must run this interpreter (the venv's, where moa_magic is installed)."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    assert spec.argv[0] == sys.executable or spec.argv[0].startswith(sys.prefix), (
        f"kernel python3 runs {spec.argv[0]}, not this venv's python; "
        f"run `python -m ipykernel install --sys-prefix`"
    )
    return "python3"


def dom_classes(widget) -> set[str]:
    """A widget's CSS classes (ipywidgets keeps them in the `_dom_classes` trait, no public getter)."""
    return set(widget._dom_classes)


# --- staircase streaming (core/staircase.py): three proposers streaming STAIR_WORDS, one every
# 50 ms, and an aggregator on a provider that continues an assistant prefix

STAIR_PRESET = """\
[presets.stair]
layers = [["fake:a", "fake:b", "fake:c"]]
aggregator = "fake:agg"
max_tokens = 64
"""
STAIR_TOML = "\n".join([FAKE_PROVIDER + 'prefill = "trailing"\n', NO_RETRIES, STAIR_PRESET])
STAIR_WORDS = [f" w{i}" for i in range(12)]


def answer_so_far(body: dict) -> str:
    """The assistant prefix a staircase step asks the server to continue ('' for the first step)."""
    last = body["messages"][-1]
    return last["content"] if last["role"] == "assistant" else ""


def stair_aggregator(steps_before_stop: int):
    """The aggregator writes ' s1', ' s2', ... (cut by its step's max_tokens), then ' end.', then
    nothing more (as a model does whose answer is complete)."""
    from chat_server import Reply

    def reply(body: dict) -> Reply:
        prefix = answer_so_far(body)
        if prefix.endswith("end."):
            return Reply(text="")
        step = prefix.count(" s") + 1
        if step <= steps_before_stop:
            return Reply(text=f" s{step}", finish_reason="length")
        return Reply(text=" end.")

    return reply


def stair_server(write_moa_toml, chat_server, aggregator):
    """`chat_server` as the stair preset's proposers (STAIR_WORDS) and `aggregator`'s replies."""
    from chat_server import Reply

    write_moa_toml(STAIR_TOML)
    chat_server.default_reply = Reply(chunks=STAIR_WORDS, chunk_delay=0.05)
    chat_server.script(model="agg", reply=aggregator)
    return chat_server


def staircase_requests(server, proposer_words: dict[str, list[str]], answer: str) -> list[dict]:
    """What each aggregator ("agg") request of a staircase run held, read from the server's side:
    its span of the final `answer` (its assistant prefix up to the next one's) and, per proposer
    label (L1.1, L1.2, ... in the order of `proposer_words`), the characters of that proposer's
    streamed words its references held: the longest prefix of them found there. The proposers'
    texts must not share a prefix (give each words of its own)."""
    requests = server.requests_for("agg")
    prefixes = [answer_so_far(r["body"]) for r in requests] + [answer]
    steps = []
    for number, (request, before, after) in enumerate(zip(requests, prefixes, prefixes[1:]), start=1):
        references = request["body"]["messages"][0]["content"]
        saw = {}
        for index, words in enumerate(proposer_words.values(), start=1):
            shown = [len("".join(words[:k])) for k in range(len(words) + 1)
                     if "".join(words[:k]).strip() in references]
            saw[f"L1.{index}"] = max(shown)
        steps.append({"step": number, "start": len(before), "end": len(after), "saw": saw})
    return steps


def seen_figure(chars: int, total: int) -> str:
    """How the staircase renditions state what a step saw of a proposer's `total` characters."""
    return f"all {total}" if chars >= total else f"{chars}/{total} ({round(chars / total * 100)}%)"


def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    """Poll `condition()` until it holds: a state to reach, however slow the machine, with
    `timeout` only bounding a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout:g} s")
        time.sleep(0.005)


def main_thread_in(function) -> bool:
    """Whether the main thread is inside `function` now. A test's Ctrl-C must wait for the main
    thread to be in `runner.wait`: on a loaded machine the worker can stream the first replies
    before the main thread has even returned from submitting the run."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if frame.f_code is function.__code__:
            return True
        frame = frame.f_back
    return False


def wait_for_runs_to_end(timeout: float = 60.0) -> None:
    """Until every task on moa_magic's worker loop has ended: every run started so far has wound
    down and recorded itself in the session ledger. A Ctrl-C hands the engine only
    `runner.CANCEL_GRACE_S` before the caller goes on, so on a slow machine a cancelled run can
    still be winding down. `timeout` bounds a hang: a run that never ends is a bug."""
    runner = sys.modules.get("moa_magic.core.runner")
    if runner is None or not runner.worker.started:
        return

    async def others_ended() -> None:
        current = asyncio.current_task()
        await asyncio.gather(*(t for t in asyncio.all_tasks() if t is not current),
                             return_exceptions=True)

    ended = asyncio.run_coroutine_threadsafe(others_ended(), runner.worker.loop())
    try:
        ended.result(timeout)
    except TimeoutError:
        ended.cancel()
        raise AssertionError(f"a run on the worker loop did not end within {timeout:g} s") from None
