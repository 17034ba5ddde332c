"""A real Mixture-of-Agents on the embedded local model, end to end (needs the [local] extra)."""

from __future__ import annotations

import os

import pytest

import moa_magic
from moa_magic.providers import local
from moa_magic.config import load_config
from moa_magic.core.plan import default_preset_name, local_extra_installed

pytestmark = [
    pytest.mark.local,
    pytest.mark.skipif(not local_extra_installed(), reason='needs pip install "moa-magic[local]"'),
]


@pytest.fixture
def no_user_config(monkeypatch, tmp_path):
    monkeypatch.delenv("MOA_MAGIC_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)


def test_default_preset_is_local_without_keys(no_user_config):
    assert default_preset_name(load_config()) == "local"


def test_local_preset_runs_a_real_mixture_and_reuses_the_server(no_user_config):
    first = moa_magic.run("Name two primary colours.", max_tokens=32)
    assert first.preset == "local"
    assert first.status == "done"
    for record in first.calls():
        assert record.status == "done"
        assert record.text.strip(), record.model
        assert record.prompt_tokens > 0 and record.completion_tokens > 0
        assert record.cost_usd == 0 and record.price_source == "local ($0)"
    # the aggregator saw all three proposals in its system message
    system = first.aggregator.messages[0]["content"]
    assert "\n1. " in system and "\n2. " in system and "\n3. " in system
    info = local.server_info()

    second = moa_magic.run("Name one planet.", max_tokens=16)
    assert second.final.strip()
    assert local.server_info()["pid"] == info["pid"]

    local.shutdown()
    with pytest.raises(ProcessLookupError):
        os.kill(info["pid"], 0)
    assert local.server_info() is None


def test_the_local_presets_defaults_give_complete_answers(no_user_config):
    result = moa_magic.run("Why is the sky blue?")
    assert result.ok
    for record in result.calls():
        assert record.finish_reason == "stop", (record.label, record.output_tokens)
        assert not record.truncated
    assert result.to_dict()["aggregator"]["truncated"] is False


def test_a_call_cut_by_max_tokens_is_marked_truncated(no_user_config):
    from moa_magic.render.format import call_summary

    result = moa_magic.run("Explain photosynthesis.", max_tokens=4)
    for record in result.calls():
        assert record.finish_reason == "length" and record.truncated
        assert "truncated at the 4-token limit" in call_summary(record)
        assert record.to_dict()["truncated"] is True
