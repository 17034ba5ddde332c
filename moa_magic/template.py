"""`{{name}}` placeholders in a prompt: a `%%moa` cell over the notebook's variables, a batch
template over a row's columns. A leaf (standard library only), shared by the magic and batches.

Single braces are left alone (code in prompts stays intact); `\\{{x}}` gives a literal `{{x}}`;
`{{...}}` that is not a (dotted) name, e.g. `{{#each}}` or `{{ a + b }}`, is left as written.
Nothing is evaluated: a name is looked up, then attributes (or mapping keys) one by one;
attributes starting with `_` are refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .errors import MoaUserError

# {{ name }} / {{ name.attr.attr }}; \{{...}} is a literal {{...}}.
_PLACEHOLDER = re.compile(r"(\\?)\{\{\s*([^{}\n]*?)\s*\}\}")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def placeholders(text: str) -> list[str]:
    """The names a template uses (their first part), in order, once each."""
    names = [m.group(2).split(".")[0] for m in _PLACEHOLDER.finditer(text)
             if not m.group(1) and _DOTTED.fullmatch(m.group(2))]
    return list(dict.fromkeys(names))


def fill(text: str, namespace: Mapping, where: str) -> str:
    """Replace `{{name}}` / `{{ name.attr }}` with `str()` of the value in `namespace`.

    `where` names the namespace in errors ("the notebook", "row 3"). A MoaUserError says what is
    wrong in one line.
    """

    def substitute(match: re.Match) -> str:
        escaped, expr = match.group(1), match.group(2)
        if escaped:
            return match.group(0)[1:]
        if not _DOTTED.fullmatch(expr):
            return match.group(0)
        head, *attrs = expr.split(".")
        if head not in namespace:
            raise MoaUserError(
                f"{{{{{expr}}}}}: there is no variable {head!r} in {where}. Define it, or write "
                f"\\{{{{{expr}}}}} for literal braces."
            )
        value = namespace[head]
        path = head
        try:  # a property, a mapping's lookup or __str__ is the user's code: it may raise
            for attr in attrs:
                if attr.startswith("_"):
                    raise MoaUserError(
                        f"{{{{{expr}}}}}: attributes starting with '_' are not allowed in a prompt."
                    )
                if hasattr(value, attr):
                    value = getattr(value, attr)
                elif isinstance(value, Mapping) and attr in value:
                    value = value[attr]
                else:
                    raise MoaUserError(
                        f"{{{{{expr}}}}}: {path} ({type(value).__name__}) has no attribute or key "
                        f"{attr!r}."
                    )
                path += f".{attr}"
            return str(value)
        except MoaUserError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of user code is one line
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise MoaUserError(
                f"{{{{{expr}}}}}: reading {path} or turning it into text failed ({reason[:200]}). "
                f"Fix it, or put the text you want in a variable."
            ) from None

    return _PLACEHOLDER.sub(substitute, text)
