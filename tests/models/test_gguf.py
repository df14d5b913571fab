"""Which paths name a GGUF checkpoint, and where its conversion is cached."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rich.console import Console

from models.gguf import NotAGGUFModel, converted_dir, gguf_file
from models.resolve import resolve_model


def test_a_gguf_checkpoint_is_a_gguf_file_or_a_folder_holding_one(tmp_path: Path) -> None:
    weights = tmp_path / "m.Q4_0.gguf"
    weights.write_bytes(b"GGUF")
    assert gguf_file(weights) == weights
    assert gguf_file(tmp_path) == weights
    (tmp_path / "config.json").write_text("{}")
    assert gguf_file(tmp_path / "config.json") is None
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert gguf_file(tmp_path) is None  # a safetensors checkpoint is served as it is
    other = tmp_path / "two"
    other.mkdir()
    (other / "a.gguf").write_bytes(b"GGUF")
    (other / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(NotAGGUFModel, match="name one of them"):
        gguf_file(other)


def test_a_changed_file_gets_a_conversion_of_its_own(tmp_path: Path) -> None:
    weights = tmp_path / "m.gguf"
    weights.write_bytes(b"GGUF")
    first = converted_dir(weights)
    assert first == converted_dir(weights) and first.name.startswith("m-")
    weights.write_bytes(b"GGUF, longer")
    os.utime(weights, ns=(1, 1))
    assert converted_dir(weights) != first


def test_a_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model at"):
        resolve_model(tmp_path / "nope", Console())
    assert resolve_model(tmp_path, Console()) == (tmp_path, tmp_path.name)  # a plain directory, as it is
