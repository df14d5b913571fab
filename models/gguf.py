"""GGUF checkpoints made servable: dequantized once into a safetensors directory with the
tokenizer and chat template the GGUF file carries.

`transformers` reads the file (with the `gguf` package) and undoes llama.cpp's layout; its
quantized model cannot be saved, so its weights are copied into a plain model of the same
config, which is what the engine (and vLLM) load. Llama-family models only (Llama, Mistral,
Qwen2), in the quantization types the `gguf` package dequantizes.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from platformdirs import user_cache_dir

Say = Callable[[str], None]
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class NotAGGUFModel(ValueError):
    pass


def gguf_file(path: Path) -> Path | None:
    """The GGUF file `path` names: itself, or the one file in a directory that holds one
    (and no safetensors weights); None when it is not a GGUF checkpoint."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise NotAGGUFModel(f"{path} holds {len(found)} GGUF files; name one of them")
    return found[0] if found else None


def converted_dir(source: Path) -> Path:
    """Where a GGUF file's conversion is cached: by its name, size and modification time."""
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(user_cache_dir("slos-serve")) / "models" / f"{source.stem}-{key}"


def convert(source: Path, out_dir: Path, say: Say = print) -> Path:
    """Dequantize `source` into `out_dir` (float32 safetensors, tokenizer, chat template);
    written to a temporary directory first, so a half-written one is never served."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()

    def step(text: str) -> None:
        say(f"[{time.monotonic() - started:5.1f} s] {text}")

    folder, name = str(source.parent), source.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if config.model_type not in ARCHITECTURES:
        raise NotAGGUFModel(f"{source}: a {config.model_type} model; the engine serves "
                            f"{', '.join(sorted(ARCHITECTURES))}")
    step(f"reading the tokenizer and chat template of {name}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    step(f"dequantizing {name} (about a minute for 135M parameters on 2 cores)")
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    plain_config = config.to_dict()
    plain_config.pop("quantization_config", None)
    plain_config["architectures"] = [ARCHITECTURES[config.model_type]]
    config = type(config).from_dict(plain_config)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".convert-"))
    tmp.chmod(0o755)
    step(f"writing safetensors to {out_dir}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    step("done")
    return out_dir


def servable(path: Path, say: Say = print) -> Path:
    """A directory the engine loads: `path` itself, or the cached conversion of the GGUF
    checkpoint it names (made on first use)."""
    source = gguf_file(path)
    if source is None:
        return path
    out = converted_dir(source)
    if (out / "config.json").is_file():
        return out
    return convert(source, out, say)
