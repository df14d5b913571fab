"""Every module imports on its own: in a fresh interpreter, with none of the project's other
modules loaded before it, so an import cycle that only works in some order fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "engine", "models", "planner", "gateway", "workers", "bench", "slos_serve")
OPTIONAL = ("vllm",)  # an extra (`.[vllm]`): the modules that need it import where it is installed

# Third-party imports stay loaded between modules (they cannot see ours); the project's are
# dropped before each module, so each one starts as in a fresh interpreter.
CHECK = """
import importlib, sys, traceback
ours = {packages!r}
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] in ours]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name not in {optional!r}:
            failed.append(name + ":\\n" + traceback.format_exc(limit=-3))
    except Exception:
        failed.append(name + ":\\n" + traceback.format_exc(limit=-3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def modules(package: str) -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_imports_alone(package: str) -> None:
    names = modules(package)
    assert names, f"no modules found in {package}"
    run = subprocess.run([sys.executable, "-c", CHECK.format(packages=PACKAGES, optional=OPTIONAL), *names], cwd=ROOT,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
