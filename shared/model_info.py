"""Facts about a model directory that processes without the engine (the gateway) also need."""

from __future__ import annotations

import json
from pathlib import Path


def context_window(model_dir: Path, limit: int | None) -> int:
    """Tokens a request may span, prompt and output together: the model's own limit, or less."""
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    native = int(raw.get("max_position_embeddings", 2048))
    return min(limit or native, native)


def vocab_size(model_dir: Path) -> int:
    """Token ids the model knows: load generators draw prompts below it."""
    return int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])
