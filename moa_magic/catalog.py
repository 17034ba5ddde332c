"""What is configured: presets and providers, each provider with whether its key is set (never the key)."""

from __future__ import annotations

import html

from .config import Config, Preset


def provider_rows(config: Config) -> list[dict]:
    rows = []
    for name, p in sorted(config.providers.items()):
        if not p.api_key_env:
            key = "no key needed"
        else:
            key = f"{p.api_key_env} {'set' if p.has_key() else 'not set'}"
        rows.append({"name": name, "url": p.base_url if p.embedded else p.url(), "key": key,
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
