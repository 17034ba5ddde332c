"""What is configured, and its `%moa list` / `%moa show` views: presets and providers, each provider
with whether its key is set (never the key).

Names, descriptions and prompts come from config files, untrusted: the text forms go through
`render.terminal.terminal_safe` (they reach a terminal through `moa --list` and terminal IPython),
the HTML forms through `html.escape`."""

from __future__ import annotations

import html
from urllib.parse import urlsplit

from .config import Config, ModelEntry, Preset, Provider
from .core.method import AGGREGATE_PROMPT
from .figures import TextAndHtml


PROBE_TIMEOUT_S = 0.5


def _answers(url: str) -> bool:
    """Whether an HTTP server answers at a loopback base URL: any HTTP reply counts, 401 and 404
    too. http.client, not urllib: no proxy may stand in, and no credentials are sent."""
    import http.client

    parts = urlsplit(url)
    try:
        connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=PROBE_TIMEOUT_S)
        try:
            connection.request("GET", parts.path.rstrip("/") + "/models")
            connection.getresponse().read(1024)
        finally:
            connection.close()
    except (OSError, http.client.HTTPException):
        return False
    return True


def _local_server(provider: Provider) -> bool:
    """A server on this machine that needs no key (ollama, vllm, llamacpp, your own)."""
    from .providers.http import is_loopback

    try:
        url = provider.url()
    except Exception:  # a malformed override: the row shows the URL as configured
        return False
    return (not provider.embedded and not provider.api_key_env and url.startswith("http://")
            and is_loopback(urlsplit(url).hostname))


def provider_rows(config: Config) -> list[dict]:
    """Per provider: its key's state, or for a server on this machine whether it answers now
    (probed in parallel, PROBE_TIMEOUT_S at most); `ready` is what the ✓/✗ says."""
    from concurrent.futures import ThreadPoolExecutor

    servers = {name: p for name, p in config.providers.items() if _local_server(p)}
    with ThreadPoolExecutor(max_workers=max(1, len(servers))) as pool:
        answering = dict(zip(servers, pool.map(lambda p: _answers(p.url()), servers.values())))
    rows = []
    for name, p in sorted(config.providers.items()):
        if name in servers:
            where = urlsplit(p.url()).netloc.rpartition("@")[2]  # never the credentials
            ready = answering[name]
            key = f"answers at {where}" if ready else f"nothing answers at {where}"
        elif p.embedded:
            from .core.plan import local_extra_installed

            ready = local_extra_installed()
            key = "embedded, installed" if ready else "embedded, not installed"
        elif not p.api_key_env:
            ready, key = True, "no key needed"
        else:
            ready = p.has_key()
            key = f"{p.api_key_env} {'set' if ready else 'not set'}"
        rows.append({"name": name, "url": p.shown_url(), "key": key, "ready": ready})
    return rows


def default_preset(config: Config) -> str | None:
    """The preset a run without --preset uses here, or None when none can run."""
    from .core.plan import default_preset_name
    from .errors import MoaUserError

    try:
        return default_preset_name(config)
    except MoaUserError:
        return None


def preset_models(preset: Preset) -> str:
    layers = " | ".join(", ".join(e.spec for e in layer) for layer in preset.layers)
    return f"{layers} → {preset.aggregator.spec}"


def catalog_text(config: Config) -> str:
    from .render.terminal import terminal_safe

    default = default_preset(config)
    lines = ["Presets (* the default, used without --preset):"]
    for name, preset in sorted(config.presets.items()):
        mark = "*" if name == default else " "
        lines.append(f"{mark} {name:<18} {preset.description}")
        lines.append(f"  {'':<18} {preset_models(preset)}")
    lines.append("Providers:")
    for row in provider_rows(config):
        mark = "✓" if row["ready"] else "✗"
        lines.append(f"  {mark} {row['name']:<11} {row['key']:<36} {row['url']}")
    if config.files:
        lines.append(f"Config: {', '.join(config.files)}")
    return terminal_safe("\n".join(lines))


def catalog_html(config: Config) -> str:
    e = html.escape
    default = default_preset(config)
    presets = "".join(
        f"<tr><td><code>{e(n)}</code>{' <b>(default)</b>' if n == default else ''}</td>"
        f"<td>{e(p.description)}</td><td>{e(preset_models(p))}</td></tr>"
        for n, p in sorted(config.presets.items())
    )
    providers = "".join(
        f"<tr><td>{'✓' if r['ready'] else '✗'}</td><td><code>{e(r['name'])}</code></td>"
        f"<td>{e(r['key'])}</td><td>{e(r['url'])}</td></tr>"
        for r in provider_rows(config)
    )
    return (
        "<b>Presets</b><table><tr><th>name</th><th>description</th><th>models</th></tr>"
        f"{presets}</table><b>Providers</b><table><tr><th></th><th>name</th><th>key / server</th>"
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
    from .render.terminal import terminal_safe

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
    return TextAndHtml(terminal_safe("\n".join(text_lines)),
                       f"<b>Preset <code>{e(name)}</code></b><table>{body}</table>")
