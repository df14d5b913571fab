"""`up` plans with a profile of the engine it runs: our shipped CPU profiles price our engine
only, so vLLM's engine gets one measured for it, cached apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.roofline import SHIPPED_PROFILES, load_profile
from slos_serve import profiles


@pytest.fixture
def builtin_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A model directory of the built-in model's shape (its config is all `find` reads), and an
    empty user cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    m = load_profile(SHIPPED_PROFILES / "cpu-2_slos-serve-builtin.json").model
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "num_hidden_layers": m.layers, "hidden_size": m.hidden, "num_attention_heads": m.heads,
        "num_key_value_heads": m.kv_heads, "intermediate_size": m.intermediate, "vocab_size": m.vocab}))
    return model


def test_shipped_profiles_serve_our_engine_only(builtin_config: Path) -> None:
    assert profiles.find(builtin_config, 2, "auto") == SHIPPED_PROFILES / "cpu-2_slos-serve-builtin.json"
    assert profiles.find(builtin_config, 2, "auto", "vllm") is None


def test_each_engine_has_its_own_cached_profile(builtin_config: Path) -> None:
    ours, vllm = (profiles.cache_path(builtin_config, 2, "auto", e) for e in ("ours", "vllm"))
    assert ours != vllm
    vllm.parent.mkdir(parents=True)
    vllm.write_text((SHIPPED_PROFILES / "cpu-1_slos-serve-builtin.json").read_text())
    assert profiles.find(builtin_config, 2, "auto", "vllm") == vllm
    assert profiles.find(builtin_config, 2, "auto") == SHIPPED_PROFILES / "cpu-2_slos-serve-builtin.json"
