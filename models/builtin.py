"""The built-in model in the user cache: trained on first use, found afterwards."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from platformdirs import user_cache_dir
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

BUILTIN_NAME = "slos-serve-builtin"
BUILTIN_VERSION = "v1"


def builtin_dir() -> Path:
    return Path(user_cache_dir("slos-serve")) / "models" / f"builtin-{BUILTIN_VERSION}"


def ensure_builtin(console: Console) -> Path:
    """The built-in model's directory, trained on first use (about 10 minutes on 2 cores)."""
    from models.build import TrainPlan, make_builtin  # torch and transformers: only to train

    final = builtin_dir()
    if (final / "target" / "config.json").is_file():
        return final
    console.print(f"Building the built-in model into {final} (once; about 10 minutes on 2 cores)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".build-"))
    plan = TrainPlan()
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        tasks = {
            "target": bar.add_task("training target", total=plan.target_steps, info=""),
            "draft": bar.add_task("distilling draft", total=plan.draft_steps, info=""),
        }

        def report(name: str, step: int, total: int, info: dict[str, float]) -> None:
            bar.update(tasks[name], completed=step, info=f"loss {info['loss']:.3f}")

        metrics = make_builtin(tmp, report, plan)
    try:
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    console.print("built-in model ready: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return final
