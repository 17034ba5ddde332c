"""`moa batch INPUT.jsonl|.csv --out RESULTS.jsonl`: every row's prompt through the mixture.

A row's prompt is its `--field` (default `prompt`; a JSONL line may also be a bare JSON string),
or `--template` filled with its columns (`{{column}}`). Every finished row is written to --out at
once (one JSON object per line, in the order rows finish, each with its `row` number), so an
interrupt or a crash keeps what finished; running the same command again answers those rows from
the request cache and sends only what is missing. Progress on stderr; the summary at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..options import RUN_OPTIONS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moa batch",
        description="Run every row of a JSONL or CSV file through the Mixture-of-Agents (with "
                    "--baseline/--judge to compare), writing one JSON result per row.",
    )
    parser.add_argument("input", help="a .jsonl (one object or string per line) or .csv file")
    parser.add_argument("--out", required=True, metavar="RESULTS.jsonl",
                        help="where the results go, one JSON object per row")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--field", default=None, metavar="NAME",
                        help="the column holding the prompt (default: prompt)")
    source.add_argument("--template", metavar="TEXT",
                        help="the prompt with {{column}} placeholders filled from each row")
    for flags, kwargs in RUN_OPTIONS:
        if flags == ("--cache",):
            kwargs = {**kwargs, "default": True,
                      "help": "--cache (default): every call the cache holds is answered from it, "
                              "so a rerun sends only what is missing; --no-cache: neither read nor write it"}
        parser.add_argument(*flags, **kwargs)
    parser.add_argument("--max-concurrency", type=int, metavar="N",
                        help="calls in flight at once, all rows and providers together")
    parser.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    return parser


def read_rows(path: str) -> list:
    """The rows of a .jsonl or .csv file; a MoaUserError names the file and line when it is bad."""
    from ..errors import MoaUserError

    file = Path(path).expanduser()
    try:
        text = file.read_text("utf-8-sig")
    except OSError as exc:
        raise MoaUserError(f"Cannot read {file}: {exc.strerror or exc}.") from None
    if file.suffix.lower() == ".csv":
        import csv

        return list(csv.DictReader(text.splitlines()))
    if file.suffix.lower() not in (".jsonl", ".ndjson"):
        raise MoaUserError(f"{file}: give a .jsonl or .csv file.")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as exc:
            raise MoaUserError(f"{file} line {number} is not JSON ({exc}).") from None
        if not isinstance(rows[-1], (dict, str)):
            raise MoaUserError(f"{file} line {number}: each line must be an object or a string.")
    return rows


def prompts_of(rows: list, field: str | None, template: str | None) -> list[str]:
    from ..core.batch import prompts_from
    from ..errors import MoaUserError

    if template is not None:
        return prompts_from(rows, template)
    field = field or "prompt"
    prompts = []
    for number, row in enumerate(rows):
        if isinstance(row, str):
            prompts.append(row)
        elif field in row:
            prompts.append(str(row[field]))
        else:
            raise MoaUserError(f"row {number} has no {field!r} field (it has "
                               f"{', '.join(map(repr, row)) or 'none'}): use --field NAME or --template.")
    return prompts_from(prompts)


def main(argv: list[str]) -> int:
    from ..core import batch as batching
    from ..core.batch_result import row_record
    from ..core.runner import wait
    from ..errors import MoaUserError
    from ..options import run_options
    from ..render.batch import TerminalProgress, batch_bundle
    from ..render.terminal import print_error

    args = build_parser().parse_args(argv)
    try:
        prompts = prompts_of(read_rows(args.input), args.field, args.template)
        options = run_options(args)
        options.pop("cache", None)
        plan, cfg, estimate = batching.prepare_batch(
            prompts, max_concurrency=args.max_concurrency, cache=args.cache,
            check_keys=not args.dry_run, priced=args.dry_run, **options)
        if args.dry_run:
            print(estimate.text())
            return 0
        out = Path(args.out).expanduser()
        try:
            sink = out.open("w", encoding="utf-8")
        except OSError as exc:
            raise MoaUserError(f"Cannot write --out {out}: {exc.strerror or exc}.") from None
    except MoaUserError as exc:
        print_error(exc)
        return 2
    with sink:
        written: set[int] = set()

        def flush_rows() -> None:
            for row in run.result.rows:
                if row.index not in written and row.status not in ("waiting", "running"):
                    written.add(row.index)
                    sink.write(json.dumps(row_record(row), ensure_ascii=False) + "\n")
            sink.flush()

        display = None if args.quiet else TerminalProgress(sys.stderr)
        run = batching.BatchRun(plan, cfg, prompts, options.get("max_cost"))
        job = batching.start(run)

        def tick() -> None:
            flush_rows()
            if display is not None:
                display(run.progress)

        try:
            result = wait(job, tick=tick)
        except KeyboardInterrupt:
            tick()
            print_error(f"interrupted; {len(written)} finished rows are in {out}")
            return 130
        tick()
    print(batch_bundle(result)["text/plain"], file=sys.stderr)
    return 0 if result.status == "done" else 1
