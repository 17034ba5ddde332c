"""Offline token counting with tiktoken and the BPE rank files shipped in `moa_magic/data/`.

The two rank files (`cl100k_base`, `o200k_base`) are gzip copies of the public files tiktoken downloads
on first use; see `data/NOTICE.md` and `data/TIKTOKEN-LICENSE`. We build `tiktoken.Encoding` objects
from them ourselves, so counting never touches the network or tiktoken's download cache:

* we never call `tiktoken.get_encoding`, never register anything in tiktoken's registry and never read
  or change `TIKTOKEN_CACHE_DIR` / `DATA_GYM_CACHE_DIR`;
* our encodings are named `moa_cl100k_base` / `moa_o200k_base`, not tiktoken's standard names;
* the sha256 of each decompressed rank file is checked against `data/SHA256SUMS` (the same digests
  tiktoken itself checks); a mismatch raises `TokenizerDataError`.

Importing this module is cheap and loads nothing: tiktoken is imported, and an encoding built
(~0.15-0.5 s), the first time a count needs it; each encoding is built once per process, under a lock.

Counts for OpenAI models are exact (the model's own encoding). For any other model the count uses
`cl100k_base` and is only an approximation (`is_approximate(model)` is True).
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MoaError

if TYPE_CHECKING:  # pragma: no cover
    import tiktoken

__all__ = [
    "TokenizerDataError",
    "DATA_DIR",
    "encoding_name_for",
    "count_text",
    "count_messages",
    "is_approximate",
    "loaded_encodings",
    "get_encoding",
    "load_encoding",
    "ENCODING_NAMES",
]

DATA_DIR = Path(__file__).resolve().parent.parent / "data"

# Copied from tiktoken's own `tiktoken_ext/openai_public.py` (tiktoken 0.14); a test checks they match.
ENDOFTEXT = "<|endoftext|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
ENDOFPROMPT = "<|endofprompt|>"

_SPECS: dict[str, dict[str, Any]] = {
    "cl100k_base": {
        "pat_str": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        "special_tokens": {
            ENDOFTEXT: 100257,
            FIM_PREFIX: 100258,
            FIM_MIDDLE: 100259,
            FIM_SUFFIX: 100260,
            ENDOFPROMPT: 100276,
        },
    },
    "o200k_base": {
        "pat_str": "|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        "special_tokens": {ENDOFTEXT: 199999, ENDOFPROMPT: 200018},
    },
}

ENCODING_NAMES = tuple(_SPECS)

# Tokens added per chat message, and for priming the reply (OpenAI's published counting recipe).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3

# Longest prefix first where prefixes overlap ("gpt-4o" before "gpt-4").
_O200K = re.compile(r"^(gpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|chatgpt-4o|gpt-oss|o[134](?=$|-))")
_CL100K = re.compile(r"^(gpt-4|gpt-3\.5|gpt-35|text-embedding-ada-002|text-embedding-3)")

_lock = threading.Lock()
_encodings: dict[str, "tiktoken.Encoding"] = {}
# Short texts recur (the deltas "the", " a"; roles; a batch row's prompt, sent to each proposer of
# layer 1 and counted again for its estimate): their counts are kept, in a bounded LRU.
_MEMO_MAX_CHARS = 2048
_MEMO_SIZE = 4096


class TokenizerDataError(MoaError):
    """A shipped BPE rank file is missing, unreadable or does not match its sha256 in SHA256SUMS."""


def _bare_model(model: str) -> str:
    """`openai:gpt-4o-mini` -> `gpt-4o-mini`; `openrouter:openai/gpt-4o` -> `gpt-4o`; lower-cased."""
    name = model.strip()
    head, sep, rest = name.partition(":")
    if sep and rest:
        name = rest
    name = name.lower()
    if name.startswith("ft:"):  # fine-tuned: ft:gpt-4o-mini-2024-07-18:org::id
        name = name[3:]
    if name.startswith("openai/"):
        name = name[len("openai/"):]
    return name


@functools.lru_cache(maxsize=256)
def encoding_name_for(model: str) -> tuple[str, bool]:
    """The encoding used to count `model`'s tokens and whether that count is exact.

    gpt-4o / gpt-4.1 / gpt-4.5 / gpt-5 / o1 / o3 / o4 / chatgpt-4o / gpt-oss -> ("o200k_base", True);
    gpt-4 / gpt-4-turbo / gpt-3.5 -> ("cl100k_base", True); anything else -> ("cl100k_base", False),
    where False means the count is an approximation.
    """
    bare = _bare_model(model)
    if _O200K.match(bare):
        return "o200k_base", True
    if _CL100K.match(bare):
        return "cl100k_base", True
    return "cl100k_base", False


def is_approximate(model: str) -> bool:
    """True when `model`'s tokenizer is not known and counts use cl100k_base as a stand-in."""
    return not encoding_name_for(model)[1]


def _expected_digests(data_dir: Path) -> dict[str, str]:
    sums = data_dir / "SHA256SUMS"
    try:
        text = sums.read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenizerDataError(f"Cannot read the token-count checksums {sums}: {exc}") from exc
    digests = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and re.fullmatch(r"[0-9a-f]{64}", parts[0]):
            digests[parts[1]] = parts[0]
    return digests


def _read_ranks(name: str, data_dir: Path) -> dict[bytes, int]:
    path = data_dir / f"{name}.tiktoken.gz"
    expected = _expected_digests(data_dir).get(f"{name}.tiktoken")
    if expected is None:
        raise TokenizerDataError(f"{data_dir / 'SHA256SUMS'} has no sha256 for {name}.tiktoken.")
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise TokenizerDataError(f"Cannot read the BPE rank file {path}: {exc}") from exc
    actual = hashlib.sha256(raw).hexdigest()
    if actual != expected:
        raise TokenizerDataError(
            f"The BPE rank file {path} is corrupt: sha256 of its decompressed content is {actual}, "
            f"expected {expected} (from SHA256SUMS). Reinstall moa-magic to restore it."
        )
    ranks: dict[bytes, int] = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def load_encoding(name: str, data_dir: str | Path | None = None) -> "tiktoken.Encoding":
    """Build a fresh, uncached `tiktoken.Encoding` for `name` from the rank file in `data_dir`.

    `name` is "cl100k_base" or "o200k_base"; `data_dir` defaults to the package's `data/` folder and
    must hold `<name>.tiktoken.gz` and `SHA256SUMS`. Raises `TokenizerDataError` on a bad file.
    """
    if name not in _SPECS:
        raise ValueError(f"Unknown encoding {name!r}; expected one of {sorted(_SPECS)}.")
    ranks = _read_ranks(name, Path(data_dir) if data_dir is not None else DATA_DIR)
    import tiktoken  # deferred: keeps `import moa_magic.tokens` cheap

    spec = _SPECS[name]
    return tiktoken.Encoding(
        f"moa_{name}",
        pat_str=spec["pat_str"],
        mergeable_ranks=ranks,
        special_tokens=dict(spec["special_tokens"]),
    )


def get_encoding(name: str) -> "tiktoken.Encoding":
    """The process-wide encoding for `name`, built from the shipped data on first use (thread-safe)."""
    enc = _encodings.get(name)
    if enc is not None:
        return enc
    with _lock:
        enc = _encodings.get(name)
        if enc is None:
            enc = load_encoding(name)
            _encodings[name] = enc
    return enc


def loaded_encodings() -> set[str]:
    """Names ("cl100k_base", "o200k_base") of the encodings built so far in this process."""
    return set(_encodings)


def count_text(model: str, text: str) -> int:
    """Tokens in `text` for `model`. Special-token text such as `<|endoftext|>` counts as plain text."""
    if not text:
        return 0
    return _count(encoding_name_for(model)[0], text)


def _count(name: str, text: str) -> int:
    encoding = get_encoding(name)
    if len(text) <= _MEMO_MAX_CHARS:
        return _remembered_count(name, text)
    return len(encoding.encode_ordinary(text))


@functools.lru_cache(maxsize=_MEMO_SIZE)
def _remembered_count(name: str, text: str) -> int:
    return len(_encodings[name].encode_ordinary(text))


def count_messages(model: str, messages: list[dict]) -> int:
    """Prompt tokens of a chat request: per message 3 + every value's tokens (+1 with a `name`), + 3.

    Values that are not strings (e.g. multi-part content lists) count their text parts only.
    """
    name = encoding_name_for(model)[0]
    total = REPLY_PRIMING
    for message in messages:
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            total += sum(_count(name, text) for text in _texts(value))
            if key == "name":
                total += TOKENS_PER_NAME
    return total


def count_history(model: str, messages: list[dict]) -> int:
    """What earlier turns add to every later call's input: their messages, without the reply priming."""
    return count_messages(model, messages) - REPLY_PRIMING if messages else 0


def _texts(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list):  # OpenAI content parts: [{"type": "text", "text": "..."}]
        out: list[str] = []
        for part in value:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
        return out
    return [str(value)]
