"""From a preset plus the user's options to the exact calls of a run, checked before any request."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import Config, ModelEntry, Preset, Provider, RunSettings, cache_mode
from ..errors import MissingKeyError, MoaUserError
from ..limits import max_tokens_problem, temperature_problem
from ..providers import local
from .method import AGGREGATE_PROMPT


@dataclass(frozen=True)
class ModelCall:
    """One call slot of a run with every parameter resolved."""

    provider: Provider
    model: str
    temperature: float
    max_tokens: int
    system: str | None = None
    seed: int | None = None

    @property
    def spec(self) -> str:
        return f"{self.provider.name}:{self.model}"


@dataclass(frozen=True)
class Plan:
    preset: str | None  # None: a custom run, models named by flags
    layers: tuple[tuple[ModelCall, ...], ...]
    aggregator: ModelCall
    template: str
    system: str | None
    settings: RunSettings
    # side calls (core/side.py): single models on the bare prompt, and the judge of the final answer
    baselines: tuple[ModelCall, ...] = ()
    judge: ModelCall | None = None
    judge_prompt: str | None = None
    staircase_chunk: int = 0  # tokens per staircase step (core/staircase.py); 0: off

    @property
    def shape(self) -> str:
        """The paper's L and the proposers per layer, e.g. '3 layers: 2×6 proposers + aggregator'."""
        widths = [len(layer) for layer in self.layers]
        if not widths:
            return "1 layer: aggregator only"
        if len(set(widths)) == 1:
            proposers = f"{len(widths)}×{widths[0]}" if len(widths) > 1 else str(widths[0])
        else:
            proposers = "+".join(str(w) for w in widths)
        return f"{len(widths) + 1} layers: {proposers} proposers + aggregator"

    def calls(self) -> list[ModelCall]:
        return [call for layer in self.layers for call in layer] + [self.aggregator]

    def providers(self) -> dict[str, Provider]:
        side = [*self.baselines, *([self.judge] if self.judge else [])]
        return {call.provider.name: call.provider for call in [*self.calls(), *side]}


def local_extra_installed() -> bool:
    """Whether the embedded model can be served: `local.model_path()` is the one check."""
    try:
        local.model_path()
    except MoaUserError:
        return False
    return True


def default_preset_name(config: Config) -> str:
    """The configured default; else the first auto preset whose keys are set; else `local`."""
    if config.default_preset:
        return config.default_preset
    for name in config.auto_presets:
        preset = config.presets.get(name)
        if preset and all(p.has_key() for p in _preset_providers(config, preset)):
            return name
    if local_extra_installed():
        return "local"
    keys = sorted(
        {config.providers[p].api_key_env for p in _auto_provider_names(config)} - {None}
    )
    raise MoaUserError(
        "No preset can run here: no API key is set and the embedded local model is not installed. "
        f"Either set one of {', '.join(keys)} (see `%moa list`), or install the local model with "
        f"`{local.INSTALL_HINT}`, or name a preset with --preset."
    )


def _auto_provider_names(config: Config) -> set[str]:
    names = set()
    for name in config.auto_presets:
        if name in config.presets:
            names |= {p.name for p in _preset_providers(config, config.presets[name])}
    return names


def _preset_providers(config: Config, preset: Preset) -> list[Provider]:
    entries = [e for layer in preset.layers for e in layer] + [preset.aggregator]
    found = []
    for entry in entries:
        provider_name = entry.spec.partition(":")[0]
        if provider_name in config.providers:
            found.append(config.providers[provider_name])
    return found


def parse_spec(spec: str, config: Config) -> tuple[Provider, str]:
    """`provider:model` -> (Provider, model). The model part may itself contain ':' (ollama tags)."""
    provider_name, colon, model = spec.strip().partition(":")
    if not colon or not provider_name or not model:
        raise MoaUserError(
            f"Model {spec!r} is not of the form provider:model, e.g. openai:gpt-4o-mini or "
            f"ollama:llama3.2. Providers: {', '.join(sorted(config.providers))}."
        )
    provider = config.providers.get(provider_name)
    if provider is None:
        raise MoaUserError(
            f"Unknown provider {provider_name!r} in {spec!r}. Known providers: "
            f"{', '.join(sorted(config.providers))}. Add your own in moa.toml as "
            f"[providers.{provider_name}] with base_url = \"...\" and optional api_key_env."
        )
    if provider.models is not None and model not in provider.models:
        raise MoaUserError(
            f"Unknown model {model!r} for provider {provider_name!r}; it serves: "
            f"{', '.join(provider.models)}."
        )
    return provider, model


def build_plan(
    config: Config,
    preset: str | None = None,
    proposers: list[str] | None = None,
    aggregator: str | None = None,
    layers: int | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    system: str | None = None,
    aggregator_prompt: str | None = None,
    min_ok: int | None = None,
    cache: bool | str | None = None,
    quorum: int | None = None,
    deadline: float | None = None,
    staircase: bool | None = None,
    staircase_chunk: int | None = None,
    check_keys: bool = True,
) -> Plan:
    """Resolve options over a preset. Flags win over the preset's values.

    `cache`: True, False or "auto" (None: the config's `[settings] cache`); see
    providers/call_cache.py.
    `quorum` / `deadline` (early aggregation, core/policy.py; 0 turns them off): the option, else
    the preset's, else `[settings]`. `staircase`: overlap the aggregator with the last proposer
    layer, writing `staircase_chunk` tokens per step (core/staircase.py).
    `layers` is the paper's L: L-1 proposer layers, then the aggregator. With `proposers` given,
    every proposer layer uses that list; otherwise the preset's layers are cut or their last layer
    repeated to reach L-1.
    """
    if layers is not None and layers < 1:
        raise MoaUserError(
            f"--layers is the paper's L and must be at least 1 (1 = the aggregator alone on the "
            f"bare prompt, 2 = one proposer layer and the aggregator), got {layers}."
        )
    if layers == 1 and proposers:
        raise MoaUserError(
            "--layers 1 runs the aggregator alone, so -p/--proposer has nothing to do: give the "
            "model with -a/--aggregator, or use --layers 2 or more."
        )
    custom = preset is None and bool(proposers or (aggregator and layers == 1))
    if custom:
        # Models named by flags need no preset (nor the keys of the default preset's providers).
        chosen = Preset(
            name="", layers=(tuple(ModelEntry(spec=s) for s in proposers or ()),),
            aggregator=ModelEntry(spec=aggregator or proposers[0]),
        )
        name = None
    else:
        name = preset or default_preset_name(config)
        chosen = config.preset(name)
    if temperature is not None and temperature_problem(temperature):
        raise MoaUserError(f"Temperature {temperature_problem(temperature)}, got {temperature}.")
    if max_tokens is not None and max_tokens_problem(max_tokens):
        raise MoaUserError(f"max_tokens {max_tokens_problem(max_tokens)}, got {max_tokens}.")
    if proposers:
        layer_entries = [tuple(ModelEntry(spec=s) for s in proposers)]
    else:
        layer_entries = list(chosen.layers)
    if layers is not None:
        wanted = layers - 1
        layer_entries = (layer_entries + [layer_entries[-1]] * wanted)[:wanted]
    elif proposers and not custom:
        layer_entries = layer_entries * len(chosen.layers)
    aggregator_entry = ModelEntry(spec=aggregator) if aggregator else chosen.aggregator

    base_temperature = chosen.temperature if temperature is None else temperature
    base_tokens = chosen.max_tokens if max_tokens is None else max_tokens
    run_system = chosen.system if system is None else (system or None)

    def resolve(entry: ModelEntry) -> ModelCall:
        provider, model = parse_spec(entry.spec, config)
        return ModelCall(
            provider=provider,
            model=model,
            # an explicit flag overrides per-model preset values too: the user asked for it
            temperature=base_temperature if temperature is not None or entry.temperature is None
            else float(entry.temperature),
            max_tokens=base_tokens if max_tokens is not None or entry.max_tokens is None
            else entry.max_tokens,
            system=entry.system if entry.system is not None else run_system,
            seed=entry.seed,
        )

    plan = Plan(
        preset=name,
        layers=tuple(tuple(resolve(e) for e in layer) for layer in layer_entries),
        aggregator=resolve(aggregator_entry),
        template=aggregator_prompt or chosen.aggregator_prompt or AGGREGATE_PROMPT,
        system=run_system,
        settings=replace(
            config.settings,
            min_ok=config.settings.min_ok if min_ok is None else min_ok,
            cache=config.settings.cache if cache is None else cache_mode(cache, "cache="),
            quorum=_first(quorum, chosen.quorum, config.settings.quorum),
            deadline=float(_first(deadline, chosen.deadline, config.settings.deadline)),
            judge_prompt=chosen.judge_prompt or config.settings.judge_prompt,
        ),
        staircase_chunk=_staircase_chunk(staircase, staircase_chunk),
    )
    _check_early_aggregation(plan)
    if plan.staircase_chunk:
        from .staircase import check_supported

        check_supported(plan)
    if plan.layers and plan.settings.min_ok > min(len(layer) for layer in plan.layers):
        raise MoaUserError(
            f"min_ok is {plan.settings.min_ok} but a layer has only "
            f"{min(len(layer) for layer in plan.layers)} proposers."
        )
    for provider in plan.providers().values():
        provider.url()  # a malformed MOA_<NAME>_BASE_URL fails here, before any request
    if check_keys:
        check_ready(plan)
    return plan


def _first(*values):
    return next(value for value in values if value is not None)


def _staircase_chunk(staircase: bool | None, chunk: int | None) -> int:
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise MoaUserError(f"--staircase-chunk must be a whole number of tokens of at least 1, got {chunk!r}.")
    if not staircase:
        if chunk is not None:
            raise MoaUserError("--staircase-chunk sets the staircase's step size: add --staircase.")
        return 0
    from .staircase import DEFAULT_CHUNK

    return chunk or DEFAULT_CHUNK


def _check_early_aggregation(plan: Plan) -> None:
    settings = plan.settings
    quorum, deadline = settings.quorum, settings.deadline
    if isinstance(quorum, bool) or not isinstance(quorum, int) or quorum < 0:
        raise MoaUserError(f"--quorum must be a whole number of proposers (0: off), got {quorum!r}.")
    if isinstance(deadline, bool) or not deadline >= 0 or deadline == float("inf"):
        raise MoaUserError(f"--deadline must be a number of seconds (0: off), got {deadline!r}.")
    if quorum and plan.layers:
        narrowest = min(len(layer) for layer in plan.layers)
        if quorum > narrowest:
            raise MoaUserError(
                f"--quorum {quorum} cannot be met: a layer has only {narrowest} proposers; give "
                f"--quorum {narrowest} or less."
            )
        if quorum < settings.min_ok:
            raise MoaUserError(
                f"--quorum {quorum} is below min_ok={settings.min_ok}: a layer would go on with "
                f"fewer answers than it needs; give --quorum {settings.min_ok} or more."
            )


def check_ready(plan: Plan) -> None:
    """Everything that can be known before the first request: keys set, local extra installed."""
    for provider in plan.providers().values():
        if provider.embedded:
            local.model_path()  # raises, naming the install command, when the extra is missing
        if not provider.has_key():
            raise MissingKeyError(provider.name, provider.api_key_env)
