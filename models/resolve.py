"""Which model a command serves: the default (SmolLM2-135M-Instruct), the trained built-in
pair (`builtin`), or a local checkpoint (a safetensors directory, a GGUF file, or a directory
holding one)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from models import smollm2
from models.builtin import BUILTIN_NAME, ensure_builtin
from models.gguf import gguf_file, servable

BUILTIN = Path("builtin")


def resolve_model(model: Path | None, console: Console) -> tuple[Path, str]:
    """The directory to load and the name to serve it under."""
    if model is None:
        return smollm2.ensure(console.print), smollm2.NAME
    if model == BUILTIN and not model.exists():
        return ensure_builtin(console) / "target", BUILTIN_NAME
    if not model.exists():
        raise FileNotFoundError(f"no model at {model}")
    source = gguf_file(model)
    return servable(model, console.print), (source.stem if source else model.name)
