"""`%%moa` (run the cell as a prompt) and `%moa` (list, show, last, usage, cache, replay, help, version).

Loading is light: this module imports IPython and traitlets only; the engine, aiohttp and the
renderers (ipywidgets, markdown-it) load on a side thread meanwhile (`_preload`).

Errors a user can fix (bad option, unknown preset/provider/model, missing key, empty cell, unknown
`{{name}}`) are `UsageError`s raised before any request: IPython prints one line, no traceback.
A run that ends without a final answer also ends in a one-line `UsageError` — after the tree and
the static rendition show what happened and `_moa` holds the partial result. An interrupt
(KeyboardInterrupt) cancels every request, marks the run cancelled, stores `_moa`, and ends the cell
with a one-line UsageError (no traceback; the kernel still stops a Run All there).

Elsewhere: the `%moa` subcommands are notebook/subcommands.py, `--chat` notebook/chat.py, `--over`
notebook/batch.py, the `{{name}}` substitution moa_magic/template.py. What stays here is over 400
lines on purpose: the two magics, their `%config` traits and the one-output display of a run
(`show_run`) share one object's state.
"""

from __future__ import annotations

import functools
import keyword
import queue
import re
import sys
import textwrap
import threading
from pathlib import Path

from IPython.core import magic_arguments
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, no_var_expand
from IPython.display import display
from traitlets import Bool, Float, Int, TraitError, Unicode, validate

from ..errors import MoaUserError
from ..template import fill
from ..limits import max_tokens_problem, temperature_problem
from .chat import with_chat_options
from ..options import RUN_OPTIONS, SAVE_OPTION, SHOW_PROPOSERS_OPTION, run_options

SUBCOMMANDS = ("list", "show", "last", "usage", "cache", "replay", "chat", "help", "version")

# `%unload_ext` and a preload still on its way take turns: unload stops the worker loop, and a
# preload that comes later must not start it again.
_LIFECYCLE = threading.Lock()


def _user_errors_as_usage_errors(func):
    """The magics' edge: a `MoaUserError` from anywhere below becomes IPython's one-line UsageError.

    Every message leaving the magics passes here, also a UsageError raised below: they quote config
    values, file names, model names and servers' errors, all untrusted, and terminal IPython prints
    them as they are, so their escape sequences are removed here."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (MoaUserError, UsageError) as exc:
            from ..render.terminal import terminal_safe

            raise UsageError(terminal_safe(str(exc))) from None

    return wrapper


def _with_run_options(func):
    """Apply the shared RUN_OPTIONS (options.py) as magic_arguments, in their order."""
    for flags, kwargs in reversed(RUN_OPTIONS):
        func = magic_arguments.argument(*flags, **kwargs)(func)
    return func


class _Pump:
    """Text written by the run's worker thread, printed by the main thread.

    ipykernel routes a thread's output by where the thread started (the first cell that ran
    anything), so the worker never prints: it queues, and the waiting cell prints.
    """

    def __init__(self, target=None):
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._target = target

    def write(self, text: str) -> int:
        self._queue.put(text)
        return len(text)

    def flush(self) -> None:
        pass

    def __call__(self) -> None:
        parts = []
        while True:
            try:
                parts.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if parts:
            target = self._target or sys.stdout
            target.write("".join(parts))
            target.flush()


@magics_class
class MoaMagics(Magics):
    """Mixture-of-Agents magics. Defaults via `%config MoaMagics.<trait> = value`."""

    preset = Unicode(
        "",
        help="Preset for %%moa cells without --preset. Empty: the config's default_preset, else the "
        "first auto preset whose API key is set, else the embedded local model.",
    ).tag(config=True)
    temperature = Float(
        None, allow_none=True,
        help="Sampling temperature for every call, from 0 to 2. None: the preset's values.",
    ).tag(config=True)
    max_tokens = Int(
        None, allow_none=True,
        help="Max tokens per call, at least 1. None: the preset's values.",
    ).tag(config=True)
    system = Unicode(
        None, allow_none=True, help="System prompt for every call. None: the preset's.",
    ).tag(config=True)
    config_file = Unicode(
        "",
        help="Path of a moa.toml. Empty: $MOA_MAGIC_CONFIG, ./moa.toml, then the user config dir.",
    ).tag(config=True)
    cache = Bool(
        None, allow_none=True,
        help="The request cache. True: answer every call from it when it holds the reply; False: "
        "never read or write it; None: the config's [settings] cache, by default only calls at "
        "temperature 0 or with a seed. --cache / --no-cache on a cell win.",
    ).tag(config=True)
    show_tree = Bool(
        True,
        help="Show the live widget tree in Jupyter. False: plain-text progress, then the static "
        "rendition. Terminal IPython always prints plain text.",
    ).tag(config=True)

    @validate("temperature", "max_tokens")
    def _check_limits(self, proposal):
        """The run's limits, as `limits.py` states them; None keeps the preset's value."""
        name, value = proposal["trait"].name, proposal["value"]
        problem = {"temperature": temperature_problem, "max_tokens": max_tokens_problem}[name]
        if value is not None and problem(value):
            raise TraitError(
                f"MoaMagics.{name} {problem(value)} (or None for the preset's value), got {value!r}."
            )
        return value

    @validate("preset")
    def _check_preset(self, proposal):
        value = proposal["value"].strip()
        if value and not re.fullmatch(r"[A-Za-z0-9_.\-]+", value):
            raise TraitError(
                f"MoaMagics.preset must be a preset name like 'local' or 'openai' (see `%moa list`), "
                f"or '' for the default, got {proposal['value']!r}."
            )
        return value

    @validate("config_file")
    def _check_config_file(self, proposal):
        value = proposal["value"].strip()
        if value and not Path(value).expanduser().is_file():
            raise TraitError(
                f"MoaMagics.config_file must be the path of an existing moa.toml, or '' to search "
                f"the usual places; {value!r} is not a file."
            )
        return value

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self.last_tree = None  # the last run's TreeRenderer (widget mode), for inspection
        self.unloaded = False  # set by `unload`, under _LIFECYCLE

    # --- %%moa -----------------------------------------------------------------------------------

    @no_var_expand
    @magic_arguments.magic_arguments(name="%moa")
    @_with_run_options
    @magic_arguments.argument(
        "--out", metavar="NAME",
        help="also store the result in this variable (the last result is always in _moa)",
    )
    @magic_arguments.argument(*SAVE_OPTION[0], **SAVE_OPTION[1])
    @with_chat_options
    @magic_arguments.argument(
        "--over", metavar="NAME",
        help="run the cell as a template over the rows of the list or DataFrame NAME: {{column}} "
             "(or {{row}} for a list of strings) per row; the batch result goes to _moa_batch",
    )
    @magic_arguments.argument(
        "--max-concurrency", type=int, metavar="N", help="with --over: calls in flight at once",
    )
    @magic_arguments.argument(*SHOW_PROPOSERS_OPTION[0], **SHOW_PROPOSERS_OPTION[1])
    @cell_magic("moa")
    @_user_errors_as_usage_errors
    def moa_cell(self, line, cell):
        """Run the cell as a prompt through a Mixture-of-Agents: proposers, then an aggregator.

        %%moa [options]
        Your question. {{name}} inserts the variable `name` ({{ obj.attr }} works too);
        single braces stay as written, \\{{x}} is a literal {{x}}.

        A live view shows the answer and every layer's proposers as they stream; when the run ends
        it becomes the finished view (answer, grid, changes, agreement, timeline, prompt sent),
        plain HTML that saved and exported notebooks keep. In a terminal, --show-proposers prints
        every proposer's text too. The result is in `_moa`
        (and in --out NAME): `_moa.final`, `_moa.layers`, `_moa.totals()`, `_moa.to_dict()`.
        Defaults: %config MoaMagics.preset / temperature / max_tokens / system / config_file /
        cache / show_tree; flags win. --save PATH writes the run for `%moa replay PATH`. Other
        commands: %moa list | show PRESET | last | usage | cache info|clear | replay PATH | help |
        version.
        """
        args = self._parse(line)
        if args is None:  # --help was printed
            return None
        if args.out is not None and (not args.out.isidentifier() or keyword.iskeyword(args.out)):
            raise UsageError(f"--out needs a Python variable name, got {args.out!r}.")
        if args.over is not None:
            from .batch import run_over

            return run_over(self, args, cell, run_options(args, **self._defaults()))
        # blank lines around the prompt are layout, not content (indentation of the first line is kept)
        prompt = fill(re.sub(r"\A(?:[ \t]*\n)+", "", cell or "").rstrip(), self.shell.user_ns,
                      "the notebook")
        options = run_options(args, **self._defaults())
        from .chat import chat_cell, check_history_options

        if args.chat is not None:
            return chat_cell(self, args, prompt, options)
        check_history_options(args)
        from ..core import runner

        if not args.dry_run:
            runner.warm_up()  # the HTTP client imports while the config and plan are read
        if args.dry_run:
            display(runner.estimate_run(prompt, **options))
            return None
        if args.save is not None:
            from ..core.saved import check_save_path

            check_save_path(args.save)
        plan, cfg = runner.prepare(prompt, **options)
        self._run(plan, cfg, prompt, args.out, args.save, show_proposers=args.show_proposers)
        return None

    def _parse(self, line: str):
        from IPython.utils.process import arg_split

        try:
            # posix splitting, so `--system "Be brief."` loses its quotes (magic_arguments'
            # own parse_argstring keeps them); Windows uses CommandLineToArgvW rules.
            argv = arg_split(line, posix=not sys.platform.startswith("win"), strict=True)
            return self.moa_cell.parser.parse_args(argv)
        except UsageError as exc:
            usage = textwrap.dedent(self.moa_cell.parser.format_usage().replace("::", "", 1)).strip()
            raise UsageError(f"{exc}\n{usage}\n(see %%moa? for every option)") from None
        except SystemExit:  # -h/--help: argparse printed the help already
            return None
        except ValueError as exc:  # unbalanced quotes in the line
            raise UsageError(f"Cannot read the options: {exc}.") from None

    def _defaults(self) -> dict:
        chosen = {
            "preset": self.preset or None,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "system": self.system,
            "config": self.config_file or None,
            "cache": self.cache,
        }
        return {k: v for k, v in chosen.items() if v is not None}

    def frontend(self) -> str:
        """'widgets' (a Jupyter kernel with show_tree), 'text' (a kernel, no tree) or 'terminal'."""
        if getattr(self.shell, "kernel", None) is None:
            return "terminal"
        if not self.show_tree:
            return "text"
        try:
            import ipywidgets  # noqa: F401
        except ImportError:
            return "text"
        return "widgets"

    def _run(self, plan, cfg, prompt: str, out: str | None, save: str | None = None, history=(),
             show_proposers: bool = False):
        from ..core import runner

        def begin(listener):
            engine, job = runner.start(plan, cfg, prompt, [listener], history)
            return engine.result, job

        result = self.show_run(lambda tree: tree.for_plan(plan), begin, out, save, show_proposers)
        if not result.ok:
            raise UsageError(
                f"No final answer ({result.status}): {result.error or 'unknown error'}. "
                f"The partial run is in _moa."
            )
        return result

    def show_run(self, tree_for, begin, out: str | None = None, save: str | None = None,
              show_proposers: bool = False):
        """Draw a run (or a replay) while it goes on; `_moa` (and `out`) get its result at the end.

        `tree_for(TreeRenderer)` builds the empty tree (widgets only); `begin(listener)` builds the
        run and returns (result, job), for `runner.wait` to submit inside its interrupt guard. In Jupyter the run has one
        output: the live tree, replaced in place (a display id) by the finished view when it ends,
        so a saved or exported notebook holds no widget. An interrupt ends in one line.
        """
        from ..core import runner
        from ..core.result import Status
        from ..render.static import StaticRun
        from ..render.terminal import TerminalRenderer, print_error

        frontend = self.frontend()
        pump = _Pump()
        tree = handle = None
        if frontend == "widgets":
            from ..render.widgets import TreeRenderer

            tree = tree_for(TreeRenderer)
            self.last_tree = tree
            handle = display(tree.widget, display_id=True)
            listener = tree
        else:
            # terminal: progress and the streamed answer; a kernel without tree: progress only,
            # the answer comes as the finished view (rendered Markdown).
            terminal = frontend == "terminal"
            listener = TerminalRenderer(progress=pump, answer=pump if terminal else None,
                                        proposers=show_proposers and terminal)

        result, job = begin(listener)
        interrupted = False
        try:
            runner.wait(job, tick=pump)
        except KeyboardInterrupt:
            interrupted = True
            if result.status == Status.RUNNING:  # the engine did not mark it within the grace
                result.status, result.error = Status.CANCELLED, "interrupted"
        finally:
            pump()
            if tree is not None:
                tree.close(status=result.status if interrupted else None)
            self.shell.user_ns["_moa"] = result
            if out:
                self.shell.user_ns[out] = result
            if save:
                try:
                    result.save(save)
                except MoaUserError as exc:
                    print_error(exc)
            if handle is not None:
                handle.update(StaticRun(result))
                tree.dispose()  # its view is gone; free its widgets in the kernel and the page
            elif frontend == "text":
                display(StaticRun(result))
        if interrupted:
            # UsageError: one line, no traceback, and the kernel still stops a Run All here
            raise UsageError(f"Run cancelled (interrupted): the partial result is in _moa"
                             f"{' and ' + out if out else ''}.")
        return result

    # --- %moa ------------------------------------------------------------------------------------

    @no_var_expand
    @line_magic("moa")
    @_user_errors_as_usage_errors
    def moa_line(self, line):
        """%moa list | show [PRESET] | last | usage | cache info|clear | replay PATH | chat | help | version

        list      presets and providers, each provider with whether its API key env var is set
        show P    a preset's layers, models, parameters and aggregator prompt (default: the default)
        last      display the last run's result again (also a partial one; in a terminal with
                  every proposer's text)
        usage     tokens and cost of this session's runs
        cache info|clear   the request cache: where it is and what it holds, or empty it
        replay PATH [--speed X]   redraw a run saved with --save, timings ÷ X; no key, no network
        chat show|reset [NAME]    a %%moa --chat conversation's turns and sizes, or forget them
        help      this text and every %%moa option
        version   the moa-magic version

        A prompt goes in a cell: %%moa [options] on the first line, the prompt below (see %%moa?).
        """
        words = line.strip().split(maxsplit=1)
        command = words[0] if words else "help"
        rest = words[1].strip() if len(words) > 1 else ""
        if command not in SUBCOMMANDS:
            hint = ""
            if command.startswith("-") or len(line.split()) > 2:
                hint = " To run a prompt use the cell magic: %%moa [options] on the first line, the prompt below."
            raise UsageError(
                f"Unknown %moa command {command!r}; valid: {', '.join(SUBCOMMANDS)}.{hint}"
            )
        from . import subcommands

        return getattr(subcommands, f"moa_{command}")(self, rest)

    def run_config(self):
        """The config these magics use (`%config MoaMagics.config_file`, else the usual places)."""
        from ..config import load_config

        return load_config(self.config_file or None)

# --- extension hooks ------------------------------------------------------------------------------


def load(shell) -> None:
    """Register the magics once per shell (the instance joins `shell.configurables`, for %config),
    then load what a first run needs on a side thread."""
    if isinstance(shell.magics_manager.registry.get("MoaMagics"), Magics):
        return
    magics = MoaMagics(shell=shell)
    shell.register_magics(magics)
    threading.Thread(target=_preload, args=(magics,), name="moa-magic-preload", daemon=True).start()


def _preload(magics: MoaMagics) -> None:
    """Import the HTTP client, the engine and this front end's renderers while the user writes the
    first cell: 0.3 s and more of importing would otherwise sit between that `%%moa` and its first
    request. `%load_ext` returns at once; a cell that comes sooner waits only for what is left."""
    try:
        from ..core import runner

        with _LIFECYCLE:
            if magics.unloaded:  # %unload_ext came first: it stopped the worker loop for good
                return
            runner.warm_up()
        from ..render import static  # noqa: F401 - loaded for the first run

        if magics.frontend() == "widgets":
            from ..render import widgets  # noqa: F401 - loaded for the first run
    except Exception:  # the first run imports them again, and reports what is wrong in its cell
        pass


def unload(shell) -> None:
    """Remove the magics and their configurable; stop the run worker (it restarts on next use)."""
    magics = shell.magics_manager.registry.get("MoaMagics")
    if magics is None:
        return
    for table in shell.magics_manager.magics.values():
        for name, func in list(table.items()):
            if getattr(func, "__self__", None) is magics:
                del table[name]
    shell.magics_manager.registry.pop("MoaMagics", None)
    shell.configurables[:] = [c for c in shell.configurables if c is not magics]
    with _LIFECYCLE:
        magics.unloaded = True
        runner = sys.modules.get("moa_magic.core.runner")
        if runner is not None:
            runner.worker.stop()
