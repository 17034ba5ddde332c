"""`%%moa --over NAME`: the cell as a prompt template over the rows of a notebook variable.

NAME is a list (of strings: `{{row}}`; of dicts: their keys), a pandas Series (`{{row}}`) or a
DataFrame (its columns). Each row's prompt is the cell with `{{name}}` filled from the row first,
then from the notebook's variables (moa_magic/template.py, the same rules as a single `%%moa`).
One progress widget shows the whole batch (not a tree per row); the result goes to `_moa_batch`
(and `--out NAME`), also a partial one after an interrupt (which ends the cell in one line, as a
single run's does), and its summary is displayed.
"""

from __future__ import annotations

import re
from collections import ChainMap

from IPython.core.error import UsageError
from IPython.display import display

from ..errors import MoaUserError
from ..template import fill


def row_prompts(cell: str, name: str, namespace) -> list[str]:
    if name not in namespace:
        raise UsageError(f"--over {name}: there is no variable {name!r} in the notebook.")
    from ..core.batch import rows_of

    try:
        rows = rows_of(namespace[name])
    except MoaUserError as exc:
        raise UsageError(f"--over {name}: {exc}") from None
    template = re.sub(r"\A(?:[ \t]*\n)+", "", cell or "").rstrip()
    prompts = []
    for number, row in enumerate(rows):
        fields = row if isinstance(row, dict) else {"row": row}
        prompts.append(fill(template, ChainMap(fields, namespace), f"row {number} of {name}"))
    if not prompts:
        raise UsageError(f"--over {name}: it has no rows.")
    return prompts


def run_over(magics, args, cell: str, options: dict):
    from ..core import batch as batching
    from ..core.result import Status
    from ..core.runner import wait
    from ..render.batch import TerminalProgress, WidgetProgress, show

    prompts = row_prompts(cell, args.over, magics.shell.user_ns)
    if args.dry_run:
        _, _, estimate = batching.prepare_batch(prompts, max_concurrency=args.max_concurrency,
                                                check_keys=False, priced=True, **options)
        display(estimate)
        return None
    plan, cfg, _ = batching.prepare_batch(prompts, max_concurrency=args.max_concurrency, **options)
    if magics.frontend() == "widgets":
        progress = WidgetProgress(len(prompts))
        display(progress.widget)
    else:
        import sys

        progress = TerminalProgress(sys.stdout)
    run = batching.BatchRun(plan, cfg, prompts, options.get("max_cost"))
    job = batching.start(run)
    interrupted = False
    try:
        wait(job, tick=lambda: progress(run.progress))
    except KeyboardInterrupt:
        interrupted = True
        if run.result.status == Status.RUNNING:  # the batch did not mark it within the grace
            run.result.status, run.result.error = Status.CANCELLED, "interrupted"
    finally:
        progress(run.progress)
        magics.shell.user_ns["_moa_batch"] = run.result
        if args.out:
            magics.shell.user_ns[args.out] = run.result
        display(show(run.result))
    if interrupted:
        # as a single run's: one line, no traceback, and the kernel still stops a Run All here
        raise UsageError(f"Batch cancelled (interrupted): the finished rows are in _moa_batch"
                         f"{' and ' + args.out if args.out else ''}.")
    return None
