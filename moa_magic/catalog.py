"""What is configured, and its `%moa list` / `%moa show` views: presets and providers, each provider
with whether its key is set (never the key)."""

from __future__ import annotations

import html

from .config import Config, ModelEntry, Preset
from .core.method import AGGREGATE_PROMPT
from .figures import TextAndHtml


def provider_rows(config: Config) -> list[dict]:
    rows = []
    for name, p in sorted(config.providers.items()):
        if not p.api_key_env:
            key = "no key needed"
        else:
            key = f"{p.api_key_env} {'set' if p.has_key() else 'not set'}"
        rows.append({"name": name, "url": p.shown_url(), "key": key,
                     "ready": p.has_key()})
    return rows


def preset_models(preset: Preset) -> str:
    layers = " | ".join(", ".join(e.spec for e in layer) for layer in preset.layers)
    return f"{layers} → {preset.aggregator.spec}"


def catalog_text(config: Config) -> str:
    lines = ["Presets:"]
    for name, preset in sorted(config.presets.items()):
        lines.append(f"  {name:<18} {preset.description}")
        lines.append(f"  {'':<18} {preset_models(preset)}")
    lines.append("Providers:")
    for row in provider_rows(config):
        mark = "✓" if row["ready"] else "✗"
        lines.append(f"  {mark} {row['name']:<11} {row['key']:<28} {row['url']}")
    if config.files:
        lines.append(f"Config: {', '.join(config.files)}")
    return "\n".join(lines)


def catalog_html(config: Config) -> str:
    e = html.escape
    presets = "".join(
        f"<tr><td><code>{e(n)}</code></td><td>{e(p.description)}</td><td>{e(preset_models(p))}</td></tr>"
        for n, p in sorted(config.presets.items())
    )
    providers = "".join(
        f"<tr><td>{'✓' if r['ready'] else '✗'}</td><td><code>{e(r['name'])}</code></td>"
        f"<td>{e(r['key'])}</td><td>{e(r['url'])}</td></tr>"
        for r in provider_rows(config)
    )
    return (
        "<b>Presets</b><table><tr><th>name</th><th>description</th><th>models</th></tr>"
        f"{presets}</table><b>Providers</b><table><tr><th></th><th>name</th><th>key</th>"
        f"<th>base URL</th></tr>{providers}</table>"
    )


def catalog_view(config: Config) -> TextAndHtml:
    """`%moa list` / `moa --list`."""
    return TextAndHtml(catalog_text(config), catalog_html(config))


def _entry(entry: ModelEntry) -> str:
    extra = [f"{k} {getattr(entry, k)}" for k in ("temperature", "max_tokens", "seed")
             if getattr(entry, k) is not None]
    if entry.system is not None:
        extra.append("own system prompt")
    return entry.spec + (f" ({', '.join(extra)})" if extra else "")


def preset_rows(preset: Preset, overrides: dict | None = None) -> list[tuple[str, str]]:
    rows = [("description", preset.description or "–"), ("defined in", preset.source)]
    for number, layer in enumerate(preset.layers, start=1):
        rows.append((f"layer {number}", ", ".join(_entry(e) for e in layer)))
    rows.append(("aggregator", _entry(preset.aggregator)))
    rows.append(("temperature", f"{preset.temperature:g}"))
    rows.append(("max_tokens", str(preset.max_tokens)))
    rows.append(("system prompt", preset.system or "–"))
    rows.append((
        "aggregator prompt",
        preset.aggregator_prompt or f"(the MoA paper's default)\n{AGGREGATE_PROMPT}",
    ))
    for key, value in (overrides or {}).items():
        rows.append((f"this notebook: {key}", f"{value} (MoaMagics.{key}; a flag on the cell wins)"))
    return rows


def preset_view(name: str, preset: Preset, overrides: dict | None = None) -> TextAndHtml:
    """`%moa show PRESET`; `overrides` are the notebook's MoaMagics defaults."""
    rows = preset_rows(preset, overrides)
    text_lines = [f"Preset {name}:"]
    for key, value in rows:
        first, *rest = value.split("\n")
        text_lines.append(f"  {key:<18} {first}")
        text_lines += [f"  {'':<18} {line}" for line in rest]
    e = html.escape
    body = "".join(
        f"<tr><th style='text-align:left;vertical-align:top'>{e(k)}</th>"
        f"<td style='text-align:left;white-space:pre-wrap'>{e(v)}</td></tr>"
        for k, v in rows
    )
    return TextAndHtml("\n".join(text_lines), f"<b>Preset <code>{e(name)}</code></b><table>{body}</table>")
