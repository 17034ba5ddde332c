"""Offline token counting: exact ids, no network, lazy loading, checksum checks, message overhead."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moa_magic.accounting import tokens
from moa_magic.accounting.tokens import (
    TokenizerDataError,
    count_messages,
    count_text,
    encoding_name_for,
    is_approximate,
    load_encoding,
    loaded_encodings,
)

# Reference ids from tiktoken's own loader and `tiktoken_ext.openai_public` constructors over the same
# rank files (their sha256 equals the one tiktoken checks); "hello world" matches the published values.
CL100K = {
    "hello world": [15339, 1917],
    "Hello, world! 12345 tokens": [9906, 11, 1917, 0, 220, 4513, 1774, 11460],
    "The quick brown fox jumps over the lazy dog.": [791, 4062, 14198, 39935, 35308, 927, 279, 16053, 5679, 13],
    "Ünïcödé 你好世界 🎉": [53591, 77, 38672, 66, 3029, 67, 978, 220, 57668, 53901, 3574, 244, 98220, 11410, 236, 231],
    "def f(x):\n    return x ** 2\n": [755, 282, 2120, 997, 262, 471, 865, 3146, 220, 17, 198],
    "<|endoftext|>": [27, 91, 8862, 728, 428, 91, 29],
}
O200K = {
    "hello world": [24912, 2375],
    "Hello, world! 12345 tokens": [13225, 11, 2375, 0, 220, 7633, 2548, 20290],
    "The quick brown fox jumps over the lazy dog.": [976, 4853, 19705, 68347, 65613, 1072, 290, 29082, 6446, 13],
    "Ünïcödé 你好世界 🎉": [8858, 77, 191375, 43369, 377, 220, 177519, 28428, 139786, 231],
    "def f(x):\n    return x ** 2\n": [1314, 285, 4061, 1883, 271, 622, 1215, 6240, 220, 17, 198],
    "<|endoftext|>": [27, 91, 419, 1440, 919, 91, 29],
}
REPO = Path(__file__).resolve().parents[1]


def _run(code: str, env_extra: dict[str, str] | None = None) -> dict:
    env = dict(os.environ)
    env.update(env_extra or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=env, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("text,ids", list(CL100K.items()))
def test_cl100k_ids(text, ids):
    enc = tokens.get_encoding("cl100k_base")
    assert enc.encode_ordinary(text) == ids
    assert count_text("gpt-4", text) == len(ids)
    assert enc.decode(ids) == text


@pytest.mark.parametrize("text,ids", list(O200K.items()))
def test_o200k_ids(text, ids):
    enc = tokens.get_encoding("o200k_base")
    assert enc.encode_ordinary(text) == ids
    assert count_text("openai:gpt-4o-mini", text) == len(ids)
    assert enc.decode(ids) == text


def test_encoding_names_are_ours_and_special_tokens_match():
    enc = tokens.get_encoding("cl100k_base")
    assert enc.name == "moa_cl100k_base"
    assert enc.encode("<|endoftext|>", allowed_special="all") == [100257]
    o2 = tokens.get_encoding("o200k_base")
    assert o2.name == "moa_o200k_base"
    assert o2.encode("<|endoftext|>", allowed_special="all") == [199999]
    assert tokens.get_encoding("cl100k_base") is enc  # built once


def test_specs_match_tiktoken_openai_public(monkeypatch):
    """pat_str and special tokens equal tiktoken's own constructors (rank loading stubbed: no download)."""
    from tiktoken_ext import openai_public

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *a, **k: {})
    for name in ("cl100k_base", "o200k_base"):
        official = getattr(openai_public, name)()
        assert tokens._SPECS[name]["pat_str"] == official["pat_str"]
        assert tokens._SPECS[name]["special_tokens"] == official["special_tokens"]


def test_special_token_text_counts_without_raising():
    text = "before <|endoftext|> after <|endofprompt|> <|fim_prefix|>"
    assert count_text("gpt-4o", text) > 5
    assert count_text("gpt-3.5-turbo", text) > 5
    assert count_text("together:meta-llama/Llama-3.3-70B", text) > 5
    assert count_messages("gpt-4o", [{"role": "user", "content": text}]) > 5


@pytest.mark.parametrize(
    "model,expected",
    [
        ("openai:gpt-4o-mini", ("o200k_base", True)),
        ("gpt-4o", ("o200k_base", True)),
        ("openrouter:openai/gpt-4o", ("o200k_base", True)),
        ("openai:gpt-4.1-nano", ("o200k_base", True)),
        ("openai:gpt-5-mini", ("o200k_base", True)),
        ("o1", ("o200k_base", True)),
        ("openai:o3-mini", ("o200k_base", True)),
        ("o4-mini", ("o200k_base", True)),
        ("chatgpt-4o-latest", ("o200k_base", True)),
        ("openai:ft:gpt-4o-mini-2024-07-18:org::abc", ("o200k_base", True)),
        ("gpt-4", ("cl100k_base", True)),
        ("openai:gpt-4-turbo", ("cl100k_base", True)),
        ("gpt-3.5-turbo", ("cl100k_base", True)),
        ("together:meta-llama/Llama-3.3-70B-Instruct-Turbo", ("cl100k_base", False)),
        ("ollama:llama3:8b", ("cl100k_base", False)),
        ("local:smollm2", ("cl100k_base", False)),
        ("openrouter:anthropic/claude-3.5-sonnet", ("cl100k_base", False)),
        ("o1x", ("cl100k_base", False)),
    ],
)
def test_encoding_name_for(model, expected):
    assert encoding_name_for(model) == expected
    assert is_approximate(model) is (not expected[1])


def test_count_text_empty():
    assert count_text("gpt-4o", "") == 0


def test_count_messages_overhead():
    model = "gpt-4o"
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello world", "name": "alice"},
    ]
    parts = sum(count_text(model, v) for m in messages for v in m.values())
    # 3 per message, +1 for the `name` key, +3 reply priming
    assert count_messages(model, messages) == parts + 3 * 2 + 1 + 3
    assert count_messages(model, []) == 3
    # known value: "user" (1) + "hello world" (2) + 3 + 3
    assert count_messages(model, [{"role": "user", "content": "hello world"}]) == 9


def test_count_messages_content_parts():
    model = "gpt-4o"
    plain = count_messages(model, [{"role": "user", "content": "hello world"}])
    parts = count_messages(model, [{"role": "user", "content": [{"type": "text", "text": "hello world"}]}])
    assert plain == parts


def test_sha_mismatch_raises_clear_error(tmp_path):
    for f in ("cl100k_base.tiktoken.gz", "SHA256SUMS"):
        shutil.copy(tokens.DATA_DIR / f, tmp_path / f)
    raw = bytearray(gzip.decompress((tmp_path / "cl100k_base.tiktoken.gz").read_bytes()))
    raw[100] ^= 1
    (tmp_path / "cl100k_base.tiktoken.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(TokenizerDataError, match=r"corrupt.*sha256.*223921b76ee99bde"):
        load_encoding("cl100k_base", tmp_path)


def test_missing_or_garbled_file_raises_clear_error(tmp_path):
    shutil.copy(tokens.DATA_DIR / "SHA256SUMS", tmp_path / "SHA256SUMS")
    with pytest.raises(TokenizerDataError, match="Cannot read"):
        load_encoding("o200k_base", tmp_path)
    (tmp_path / "o200k_base.tiktoken.gz").write_bytes(b"not gzip")
    with pytest.raises(TokenizerDataError, match="Cannot read"):
        load_encoding("o200k_base", tmp_path)


def test_load_from_copied_dir_matches(tmp_path):
    for f in ("o200k_base.tiktoken.gz", "SHA256SUMS"):
        shutil.copy(tokens.DATA_DIR / f, tmp_path / f)
    enc = load_encoding("o200k_base", tmp_path)
    assert enc.encode_ordinary("hello world") == O200K["hello world"]


def test_shipped_files_present():
    for f in ("cl100k_base.tiktoken.gz", "o200k_base.tiktoken.gz", "NOTICE.md", "SHA256SUMS", "TIKTOKEN-LICENSE"):
        assert (tokens.DATA_DIR / f).is_file(), f
    assert "Copyright (c) 2022 OpenAI, Shantanu Jain" in (tokens.DATA_DIR / "TIKTOKEN-LICENSE").read_text()


def test_no_network_and_no_tiktoken_cache(tmp_path):
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    out = _run(
        """
        import json, socket
        def refuse(*a, **k):
            raise AssertionError("network used")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        from moa_magic.accounting.tokens import count_text, count_messages
        print(json.dumps({
            "o200k": count_text("openai:gpt-4o-mini", "hello world"),
            "cl100k": count_text("gpt-4", "hello world"),
            "approx": count_text("together:some/model", "hello world"),
            "msgs": count_messages("gpt-4o", [{"role": "user", "content": "hello world"}]),
        }))
        """,
        {
            "TIKTOKEN_CACHE_DIR": str(cache),
            "DATA_GYM_CACHE_DIR": str(cache),
            "HTTPS_PROXY": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9",
            "https_proxy": "http://127.0.0.1:9",
            "http_proxy": "http://127.0.0.1:9",
        },
    )
    assert out == {"o200k": 2, "cl100k": 2, "approx": 2, "msgs": 9}
    assert list(cache.iterdir()) == []


def test_import_is_lazy():
    out = _run(
        """
        import json, sys
        import moa_magic
        before = None
        if "moa_magic.accounting.tokens" in sys.modules:
            before = sorted(sys.modules["moa_magic.accounting.tokens"].loaded_encodings())
        from moa_magic.accounting import tokens
        after_import = sorted(tokens.loaded_encodings())
        tiktoken_imported = "tiktoken" in sys.modules
        tokens.count_text("gpt-4o", "hi")
        print(json.dumps({"before": before, "after_import": after_import,
                          "tiktoken_at_import": tiktoken_imported,
                          "after_count": sorted(tokens.loaded_encodings())}))
        """
    )
    assert out["before"] in (None, [])
    assert out["after_import"] == []
    assert out["after_count"] == ["o200k_base"]


def test_thread_safe_single_load(monkeypatch):
    import threading

    calls = []
    real = tokens.load_encoding

    def counting(name, data_dir=None):
        calls.append(name)
        return real(name, data_dir)

    monkeypatch.setattr(tokens, "_encodings", {})
    monkeypatch.setattr(tokens, "load_encoding", counting)
    results = []
    threads = [threading.Thread(target=lambda: results.append(count_text("gpt-4", "hello world"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [2] * 8
    assert calls == ["cl100k_base"]


def test_loaded_encodings_returns_copy():
    s = loaded_encodings()
    s.add("bogus")
    assert "bogus" not in loaded_encodings()
