"""The one entry point, `slos-serve`, and its subcommands."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bench.cli import bench_app
from bench.eval_cli import sim
from models.builtin import BUILTIN_NAME, ensure_builtin
from models.gguf import NotAGGUFModel
from models.resolve import BUILTIN, resolve_model
from shared.roofline import load_profile, predict, save_profile, shipped_cpu_profile
from shared.settings import CONFIG_ENV, Settings, load

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Multi-SLO LLM serving.")
model_app = typer.Typer(no_args_is_help=True, help="Build local models.")
app.add_typer(model_app, name="model")
console = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option(help="TOML settings file (also SLOS_CONFIG)")]


def _logging(settings: Settings, role: str) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s",
    )


def _settings(config: Path | None, **flags: object) -> Settings:
    if config is not None:
        os.environ[CONFIG_ENV] = str(config)
    return load(**flags)


def _resolve(model: Path | None) -> tuple[Path, str]:
    try:
        return resolve_model(model, console)
    except (FileNotFoundError, NotAGGUFModel) as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from None


def _served(settings: Settings) -> Settings:
    """Settings naming a servable model directory: the configured one as is, else the default,
    `builtin` or a GGUF converted into the user cache on first use (`model fetch` does it ahead,
    for containers that share the cache)."""
    if settings.model_dir is not None and (settings.model_dir / "config.json").is_file():
        return settings
    directory, name = _resolve(settings.model_dir)
    return settings.model_copy(update={"model_dir": directory,
                                       "served_model_name": settings.served_model_name or name})


def _require_secret(settings: Settings) -> None:
    """A process started on its own stops here, before loading anything, without the cluster's secret."""
    try:
        settings.bus_secret()
    except (ValueError, OSError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


@app.command()
def up(
    host: Annotated[str | None, typer.Option(help="bind address (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default 8000)")] = None,
    workers: Annotated[int | None, typer.Option(help="colocated workers (default 1)")] = None,
    mode: Annotated[str | None, typer.Option(help="colocated (default) or disaggregated")] = None,
    prefill: Annotated[int | None, typer.Option(help="prefill workers in disaggregated mode")] = None,
    decode: Annotated[int | None, typer.Option(help="decode workers in disaggregated mode")] = None,
    kv_transport: Annotated[str | None, typer.Option(help="auto, nixl or zmq")] = None,
    policy: Annotated[str | None, typer.Option(help="slos (default), fcfs, sarathi, distserve or edf")] = None,
    profile: Annotated[Path | None, typer.Option(help="performance-model profile the planner uses")] = None,
    engine: Annotated[str | None, typer.Option(help="ours (default) or vllm: vLLM's engine core under the "
                                               "planner (`pip install -e .[vllm]`)")] = None,
    model: Annotated[Path | None, typer.Option(
        help="safetensors directory, GGUF file or directory holding one, or `builtin` "
             "(default: SmolLM2-135M-Instruct from the package index)")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="SLOS_API_KEY", help="require this key; prefer setting "
                                                "SLOS_API_KEY, since every local user can read a command line")] = None,
    admin_port: Annotated[int | None, typer.Option(help="port of the planner's admin API (default 8001)")] = None,
    kv_cache_mb: Annotated[int | None, typer.Option(help="KV cache per worker")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="context window limit")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16 or float16")] = None,
    speculator: Annotated[str | None, typer.Option(help="none, ngram or draft")] = None,
    spec_len: Annotated[int | None, typer.Option(help="speculative tokens per decode step")] = None,
    draft_model: Annotated[Path | None, typer.Option(help="draft model (default: the built-in draft, or the one "
                                                     "`model make --draft-for` distilled for the model)")] = None,
    worker_cpus: Annotated[str | None, typer.Option(
        help="cores for the workers, e.g. 1,2,3 (the gateway and planner get the rest)")] = None,
    config: ConfigOpt = None,
) -> None:
    """Start gateway, planner and workers on this machine; Ctrl-C stops them all."""
    from slos_serve.launcher import up as run_up

    settings = _settings(config, host=host, port=port, workers=workers, mode=mode, prefill_workers=prefill,
                         decode_workers=decode, kv_transport=kv_transport, policy=policy, profile=profile,
                         engine=engine, api_key=api_key, admin_port=admin_port,
                         kv_cache_mb=kv_cache_mb, max_model_len=max_model_len, dtype=dtype,
                         speculator=speculator, spec_len=spec_len, draft_model_dir=draft_model,
                         worker_cpus=_cores(worker_cpus))
    _logging(settings, "up")
    served_dir, name = _resolve(model or settings.model_dir)
    draft_dir = settings.draft_model_dir
    if settings.speculator == "draft" and draft_dir is None:
        distilled = served_dir.with_name(served_dir.name + "-draft")  # `model make --draft-for` puts it there
        draft_dir = served_dir.parent / "draft" if name == BUILTIN_NAME else distilled
        if not (draft_dir / "config.json").is_file():
            raise typer.BadParameter(f"--speculator draft needs --draft-model, or a draft at {distilled} "
                                     f"(`slos-serve model make --draft-for {served_dir}`)", param_hint="--draft-model")
    settings = settings.model_copy(update={"model_dir": served_dir, "draft_model_dir": draft_dir,
                                           "served_model_name": settings.served_model_name or name})
    available = os.sched_getaffinity(0)
    missing = set(settings.worker_cpus or ()) - available
    if missing:
        raise typer.BadParameter(f"cores {sorted(missing)} are not among this machine's {sorted(available)}",
                                 param_hint="--worker-cpus")
    raise typer.Exit(run_up(settings))


def _cores(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise typer.BadParameter("core numbers separated by commas, e.g. 1,2,3", param_hint="--worker-cpus") from None


@app.command()
def gateway(config: ConfigOpt = None) -> None:
    """Run the HTTP gateway (settings from the environment, as `up` passes them)."""
    import uvicorn

    from gateway.app import create_app

    settings = _settings(config)
    _logging(settings, "gateway")
    _require_secret(settings)
    settings = _served(settings)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=2)


@app.command()
def planner(config: ConfigOpt = None) -> None:
    """Run the planner."""
    from planner.loop import serve
    from planner.policies.registry import PolicyConfig, make_policy
    from shared.clock import WallClock

    settings = _settings(config)
    _logging(settings, "planner")
    _require_secret(settings)
    settings = _served(settings)
    profile = load_profile(settings.profile or shipped_cpu_profile(settings.model_dir))
    draft = load_profile(settings.draft_profile) if settings.draft_profile else None
    config = PolicyConfig.from_settings(settings)
    serve(settings, make_policy(settings.policy, config, profile, draft), WallClock(), _stop_on_signals(), profile,
          lambda name: make_policy(name, config, profile, draft))


@app.command()
def worker(
    worker_id: Annotated[str | None, typer.Option(help="unique name of this worker (default: ROLE-HOSTNAME, "
                                                  "unique per container)")] = None,
    role: Annotated[str, typer.Option(help="colocated, prefill or decode")] = "colocated",
    planner: Annotated[str | None, typer.Option(help="the planner's worker address, e.g. tcp://host:port")] = None,
    config: ConfigOpt = None,
) -> None:
    """Run one worker (also on another host: point it at the planner, the planner's intake
    and the gateway with --planner, SLOS_PLANNER_INTAKE_ADDRESS and SLOS_GATEWAY_ADDRESS)."""
    import torch

    from workers.worker import serve

    if role not in ("colocated", "prefill", "decode"):
        raise typer.BadParameter("colocated, prefill or decode", param_hint="--role")
    worker_id = worker_id or f"{role}-{socket.gethostname()}"
    settings = _settings(config, planner_address=planner)
    _logging(settings, worker_id)
    _require_secret(settings)
    settings = _served(settings)
    if settings.threads_per_worker:
        torch.set_num_threads(settings.threads_per_worker)
    serve(settings, worker_id, role, _stop_on_signals())  # type: ignore[arg-type]


@app.command()
def profile(
    out: Annotated[Path, typer.Option(help="profile JSON to write")],
    model: Annotated[Path | None, typer.Option(help="safetensors directory or GGUF (default: built-in)")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16")] = None,
    quick: Annotated[bool, typer.Option(help="a small grid (seconds)")] = False,
    repeats: Annotated[int, typer.Option(help="timed runs per shape (the fastest counts)")] = 5,
    kv_cache_mb: Annotated[int | None, typer.Option(help="KV cache to allocate (default: what the grid's "
                                                    "largest batch, 64 x 1,536 tokens, holds)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads, as the worker will run (default: torch's)")] = None,
    engine: Annotated[str, typer.Option(help="ours, or vllm: vLLM's engine core under orders")] = "ours",
    plot: Annotated[Path | None, typer.Option(help="PNG of predicted vs measured")] = None,
    samples: Annotated[Path | None, typer.Option(help="CSV of every shape's measured seconds")] = None,
) -> None:
    """Time the engine over a grid of batch shapes and fit the roofline performance model."""
    import torch

    from engine.profiler import features, write_samples
    from engine.profiler import profile as run_profile

    if engine not in ("ours", "vllm"):
        raise typer.BadParameter(f"engine must be ours or vllm, not {engine}", param_hint="--engine")

    if threads:
        torch.set_num_threads(threads)
    directory, name = _resolve(model or BUILTIN)
    with Progress(TextColumn("profiling"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("", total=None)
        started, said = time.monotonic(), [0]

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)
            if not console.is_terminal and done * 10 // total > said[0]:  # a log file gets a line a tenth
                said[0] = done * 10 // total
                console.print(f"[{time.monotonic() - started:6.1f} s] profiled {done} of {total} batch shapes")

        prof, train, test = run_profile(
            directory, name=name, device=device, dtype=getattr(torch, dtype) if dtype else None,
            engine_kind=engine, quick=quick, repeats=repeats, kv_cache_mb=kv_cache_mb, progress=progress)
    save_profile(prof, out)
    if samples is not None:
        write_samples(samples, {"fitted": train, "held out": test})
    q, p = prof.quality, prof.params
    console.print(f"{out}: held-out R² {q.r2:.4f}, MAPE {q.mape:.1%} ({q.train_samples} shapes fitted, "
                  f"{q.test_samples} held out); {p.combine}(compute, memory), "
                  f"{p.effective_tflops:.3g} TFLOP/s, {p.effective_gbps:.3g} GB/s, "
                  f"overhead {p.overhead_s * 1e3:.3f} ms + {p.per_sequence_s * 1e6:.1f} µs/sequence")
    if plot is not None:
        from bench.plots import predicted_vs_measured

        series = {}
        for label, measured_split in (("fitted", train), ("held out", test)):
            batches, measured = features(measured_split)
            series[label] = (measured, predict(prof.model, prof.params, batches))
        predicted_vs_measured(plot, series, f"{prof.model.name} on {prof.hardware}")


@model_app.command("fetch")
def model_fetch(config: ConfigOpt = None) -> None:
    """Fetch and convert the served model (default: SmolLM2-135M-Instruct) into the user cache
    and print its directory: run once before containers that share the cache start."""
    print(_served(_settings(config)).model_dir)


@model_app.command("make")
def model_make(
    draft_for: Annotated[Path | None, typer.Option(help="distil a draft for this target model instead "
                                                  "(a safetensors directory or GGUF)")] = None,
    out: Annotated[Path | None, typer.Option(help="where the draft goes (default: beside the target, "
                                             "named TARGET-draft)")] = None,
    steps: Annotated[int, typer.Option(help="distillation steps (the draft)")] = 300,
) -> None:
    """Build (or find) the built-in target + draft models in the user cache; or, with
    --draft-for, distil a draft model for another target, for `--speculator draft`."""
    if draft_for is None:
        console.print(str(ensure_builtin(console)))
        return
    from dataclasses import replace

    from models.build import DRAFT_FOR_PLAN, make_draft

    target, _ = _resolve(draft_for)
    out = out or target.with_name(target.name + "-draft")
    with Progress(TextColumn("distilling a draft"), BarColumn(), TextColumn("{task.completed}/{task.total} "
                  "{task.fields[info]}"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("", total=steps, info="")
        metrics = make_draft(target, out, lambda name, step, total, info: bar.update(
            task, completed=step, info=f"loss {info['loss']:.3f}"), replace(DRAFT_FOR_PLAN, draft_steps=steps))
    console.print(f"{out}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))


@model_app.command("random")
def model_random(
    out: Annotated[Path, typer.Option(help="directory to write")],
    like: Annotated[Path | None, typer.Option(help="a profile JSON: build its model's shape "
                                              "(default: the tiny test shape)")] = None,
    device: Annotated[str, typer.Option(help="where to initialise the weights (cuda for a large shape)")] = "cpu",
) -> None:
    """Write a random-weight model with a real tokenizer: the tiny one tests use, or one shaped
    like a profile's model (Llama layout), to profile the engine on a GPU without a download."""
    import torch

    from models.build import Shape, make_random

    if like is None:
        console.print(str(make_random(out, device=device)))
        return
    m = load_profile(like).model
    if not m.gated_mlp or m.hidden != m.heads * m.head_dim:
        raise typer.BadParameter(f"{m.name} is not in the Llama layout", param_hint="--like")
    shape = Shape(hidden=m.hidden, layers=m.layers, heads=m.heads, kv_heads=m.kv_heads,
                  intermediate=m.intermediate, vocab=m.vocab, max_positions=4096)
    dtype = {2: torch.bfloat16, 4: torch.float32}[m.dtype_bytes]
    console.print(str(make_random(out, shape, init_std=0.02, device=device, dtype=dtype)))


app.command()(sim)
app.add_typer(bench_app, name="bench")


if __name__ == "__main__":
    app()
