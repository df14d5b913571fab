"""`slos-serve model random --like`: a random-weight model in a profile's shape, which the
engine loads (its q/k/v and gate/up fused on the way) and runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from engine.engine import Engine
from shared.messages import BatchOrder, NewRequest, PrefillChunk, SamplingParams
from shared.roofline import SHIPPED_PROFILES
from slos_serve.cli import app


def small_profile(tmp_path: Path, base: str, **shape: int) -> Path:
    raw = json.loads((SHIPPED_PROFILES / base).read_text())
    raw["model"].update(shape)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(raw))
    return path


def test_model_random_like_a_profile_builds_its_shape(tmp_path: Path) -> None:
    like = small_profile(tmp_path, "h100-sxm_llama-2-7b.json", layers=2, hidden=128, heads=4, kv_heads=2,
                         head_dim=32, intermediate=256, vocab=600)
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["model", "random", "--out", str(out), "--like", str(like)])
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["vocab_size"]) == (2, 128, 4, 2, 256, 600)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    engine = Engine(out, kv_cache_mb=2)
    assert engine.runner.model.model.layers[0].self_attn.qkv_proj.weight.shape == (128 + 2 * 64, 128)
    order = BatchOrder(step_id=0, new_requests=[NewRequest("a", [5, 6, 7], SamplingParams(max_tokens=2))],
                       prefill=[PrefillChunk("a", 3)])
    assert len(engine.step(order).outputs[0].new_token_ids) == 1


def test_model_random_refuses_a_shape_it_cannot_build(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["model", "random", "--out", str(tmp_path / "m"),
                                      "--like", str(SHIPPED_PROFILES / "h100-sxm_opt-6.7b.json")])
    assert result.exit_code != 0 and "Llama layout" in result.output
    assert not (tmp_path / "m").exists()


def test_a_process_started_on_its_own_needs_the_cluster_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLOS_CLUSTER_SECRET", raising=False)
    for command in (["planner"], ["gateway"], ["worker", "--role", "decode"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2 and "no cluster secret" in result.output, (command, result.output)
