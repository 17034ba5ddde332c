"""`[presets.NAME]`: the layers of models, the aggregator and the preset's own parameters."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..limits import max_tokens_problem, temperature_problem
from .checks import BUILTIN, check_keys, number
from .settings import SETTINGS_RANGES, checked_judge_prompt

MODEL_KEYS = {"model": str, "temperature": (int, float), "max_tokens": int, "system": str, "seed": int}
# Seeds are whatever an int64 holds.
SEED = (-(2**63), 2**63 - 1, True)
PRESET_KEYS = {
    "layers", "aggregator", "description", "temperature", "max_tokens", "system", "aggregator_prompt",
    "quorum", "deadline", "judge_prompt",
}


@dataclass(frozen=True)
class ModelEntry:
    """One slot of a layer: a `provider:model` name plus optional per-call overrides."""

    spec: str
    temperature: float | None = None
    max_tokens: int | None = None
    system: str | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Preset:
    name: str
    layers: tuple[tuple[ModelEntry, ...], ...]
    aggregator: ModelEntry
    description: str = ""
    temperature: float = 0.7
    max_tokens: int = 512
    system: str | None = None
    aggregator_prompt: str | None = None
    quorum: int | None = None  # None: the run's [settings]
    deadline: float | None = None
    judge_prompt: str | None = None  # None: the run's [settings]
    source: str = BUILTIN


def model_entry(value, where: str, section: str) -> ModelEntry:
    if isinstance(value, str):
        return ModelEntry(spec=value)
    if isinstance(value, dict):
        check_keys(value, MODEL_KEYS, where, section)
        if "model" not in value:
            raise ConfigError(f"{where}: [{section}] a model table needs model = \"provider:model\".")
        for key, kind in MODEL_KEYS.items():
            if key in value and not isinstance(value[key], kind):
                raise ConfigError(f"{where}: [{section}] {key} has the wrong type.")
        fields = dict(value)
        spec = fields.pop("model")
        for key, problem in (("temperature", temperature_problem), ("max_tokens", max_tokens_problem)):
            if key in fields and problem(fields[key]):
                raise ConfigError(f"{where}: [{section}] model {spec!r}: {key} {problem(fields[key])}.")
        if "seed" in fields:
            number(fields["seed"], where, f"{section}] [model {spec!r}", "seed", SEED)
        return ModelEntry(spec=spec, **fields)
    raise ConfigError(
        f"{where}: [{section}] a model must be \"provider:model\" or "
        f"{{ model = \"provider:model\", temperature = 0.7 }}, got {value!r}."
    )


def preset_from(name: str, table: dict, where: str) -> Preset:
    section = f"presets.{name}"
    check_keys(table, PRESET_KEYS, where, section)
    layers = table.get("layers")
    if (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(layer, list) and layer for layer in layers)
    ):
        raise ConfigError(
            f"{where}: [{section}] layers must be a non-empty list of non-empty model lists, "
            f"e.g. layers = [[\"openai:gpt-4o-mini\", \"groq:llama-3.3-70b-versatile\"]]."
        )
    if "aggregator" not in table:
        raise ConfigError(f"{where}: [{section}] needs aggregator = \"provider:model\".")
    temperature = table.get("temperature", 0.7)
    tokens = table.get("max_tokens", 512)
    for key, problem in (("temperature", temperature_problem(temperature)),
                         ("max_tokens", max_tokens_problem(tokens))):
        if problem:
            raise ConfigError(f"{where}: [{section}] {key} {problem}.")
    for key in ("description", "system", "aggregator_prompt"):
        if key in table and not isinstance(table[key], str):
            raise ConfigError(f"{where}: [{section}] {key} must be a string.")
    return Preset(
        name=name,
        layers=tuple(tuple(model_entry(m, where, section) for m in layer) for layer in layers),
        aggregator=model_entry(table["aggregator"], where, section),
        description=table.get("description", ""),
        temperature=float(temperature),
        max_tokens=tokens,
        system=table.get("system"),
        aggregator_prompt=table.get("aggregator_prompt"),
        quorum=number(table["quorum"], where, section, "quorum", SETTINGS_RANGES["quorum"])
        if "quorum" in table else None,
        deadline=float(number(table["deadline"], where, section, "deadline", SETTINGS_RANGES["deadline"]))
        if "deadline" in table else None,
        judge_prompt=checked_judge_prompt(table["judge_prompt"], where, section)
        if "judge_prompt" in table else None,
        source=where,
    )
