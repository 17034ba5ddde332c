"""The run options, defined once for both the `moa` command (argparse) and `%%moa` (magic_arguments)."""

from __future__ import annotations

import argparse

RUN_OPTIONS: list[tuple[tuple[str, ...], dict]] = [
    (("--preset",), dict(help="preset name (see `moa --list` / `%%moa list`)")),
    (("--config",), dict(metavar="FILE", help="config file (default: $MOA_MAGIC_CONFIG, ./moa.toml, user config dir)")),
    (("-p", "--proposer"), dict(action="append", metavar="MODEL", dest="proposers",
                                help="provider:model of a proposer; repeat for several; used in every proposer layer")),
    (("-a", "--aggregator"), dict(metavar="MODEL", help="provider:model of the final aggregator")),
    (("-l", "--layers"), dict(type=int, metavar="L", help="the paper's L: L-1 proposer layers, then the aggregator")),
    (("-t", "--temperature"), dict(type=float, metavar="TEMP", help="sampling temperature for every call (0-2)")),
    (("--max-tokens",), dict(type=int, metavar="N", help="max tokens per call")),
    (("--system",), dict(metavar="TEXT", help="system prompt for every call")),
    (("--aggregator-prompt",), dict(metavar="TEXT", help="replace the aggregate-and-synthesize prompt")),
    (("--baseline",), dict(action="append", metavar="MODEL", dest="baseline",
                           help="provider:model answering the bare prompt alone, beside layer 1, "
                                "for comparison; repeat for several")),
    (("--judge",), dict(metavar="MODEL",
                        help="provider:model that compares the final answer with each baseline, "
                             "in both orders: win / tie / loss and a reason")),
    (("--judge-prompt",), dict(metavar="TEXT",
                               help="replace the judge's prompt; it must contain {question}, "
                                    "{answer_a} and {answer_b}")),
    (("--min-ok",), dict(type=int, metavar="N", help="proposers that must succeed for a layer to go on (default 1)")),
    (("--quorum",), dict(type=int, metavar="K",
                         help="early aggregation: a layer goes on as soon as K of its proposers "
                              "answered; the rest are cut (billed for what they streamed). 0: off")),
    (("--deadline",), dict(type=float, metavar="SECONDS",
                           help="early aggregation: a layer goes on SECONDS after it started with "
                                "the answers it has (at least --min-ok). 0: off")),
    (("--staircase",), dict(action="store_true", default=None,
                            help="staircase streaming: the aggregator starts once every last-layer "
                                 "proposer has streamed, and writes its answer in steps that see "
                                 "more of their text (needs a server that continues an assistant "
                                 "prefix: llama.cpp, vLLM, Mistral, local)")),
    (("--staircase-chunk",), dict(type=int, metavar="TOKENS",
                                  help="tokens the aggregator writes per staircase step (default 48)")),
    (("--max-cost",), dict(type=float, metavar="USD",
                           help="do not start a run whose upper-bound cost exceeds USD "
                                "(or whose cost is unknown); see --dry-run")),
    (("--cache",), dict(action=argparse.BooleanOptionalAction, default=None,
                        help="--cache: answer every call from the request cache when it holds the "
                             "reply; --no-cache: never read or write it. Default: only calls at "
                             "temperature 0 or with a seed ([settings] cache)")),
    (("--dry-run",), dict(action="store_true",
                          help="send nothing: show layer 1's exact input tokens and the token and "
                               "cost bounds per layer, then stop")),
]

RUN_KEYS = ("preset", "config", "proposers", "aggregator", "layers", "temperature", "max_tokens",
            "system", "aggregator_prompt", "min_ok", "quorum", "deadline", "staircase",
            "staircase_chunk", "max_cost", "cache", "baseline", "judge", "judge_prompt")
# --dry-run is not a run() option: the CLI and the magic read it themselves.


def run_options(namespace, **defaults) -> dict:
    """The run() keyword arguments from a parsed namespace; unset flags fall back to `defaults`."""
    chosen = {key: getattr(namespace, key, None) for key in RUN_KEYS}
    for key, value in defaults.items():
        if chosen.get(key) is None:
            chosen[key] = value
    return {key: value for key, value in chosen.items() if value is not None}

SAVE_OPTION = (("--save",), dict(metavar="PATH",
                                 help="also write the run (with its timings) to PATH as JSON, for "
                                      "moa_magic.load() and `moa replay` / `%%moa replay`"))

# Conversations (`%%moa --chat`, `moa chat`): bounds on the history every turn carries.
CHAT_OPTIONS: list[tuple[tuple[str, ...], dict]] = [
    (("--max-history-turns",), dict(type=int, metavar="N",
                                    help="keep at most N earlier turns; the oldest are dropped (and said so)")),
    (("--max-history-tokens",), dict(type=int, metavar="N",
                                     help="keep earlier turns within N tokens; the oldest are dropped (and said so)")),
]

SHOW_PROPOSERS_OPTION = (("--show-proposers",), dict(
    action="store_true",
    help="in a terminal: print every proposer's text, layer by layer, before the final answer "
         "(a notebook shows them in the run's grid)"))
