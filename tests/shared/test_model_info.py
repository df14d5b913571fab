"""Facts read from a model directory's config without loading the model."""

from __future__ import annotations

from pathlib import Path

from shared.model_info import context_window, vocab_size


def test_vocabulary_and_context_window_come_from_the_config(tiny_model: Path) -> None:
    assert vocab_size(tiny_model) == 512
    assert context_window(tiny_model, None) == 512 and context_window(tiny_model, 100) == 100
    assert context_window(tiny_model, 4096) == 512  # never beyond the model's own
