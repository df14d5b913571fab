"""`slos-serve up`: start gateway, planner and workers as separate processes and supervise them.

Children get their settings through the environment and die with the launcher (Linux parent
death signal), so Ctrl-C, SIGTERM or even SIGKILL of the launcher leaves no orphan behind. Any
process that dies is started again: a worker (the planner has re-planned its requests
meanwhile), the planner (the workers say hello to the new one and the gateway sends it its open
requests again) or the gateway (its streams are cut with it; the planner aborts what they had
asked for when the new one says hello). A process that exits by itself within MIN_UPTIME_S of
starting cannot run at all: then everything is stopped, as a half-running server is worse
than none.
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from shared.bus import ipc_address
from shared.settings import Settings, as_env
from slos_serve import profiles

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0
MIN_UPTIME_S = 10.0
STOP_GRACE_S = 5.0
PR_SET_PDEATHSIG = 1


def spawn(args: list[str], env: dict[str, str], cpus: set[int] | None = None) -> subprocess.Popen:
    """A `slos-serve` subcommand that dies with this process, on `cpus` when given."""

    def before_exec() -> None:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return subprocess.Popen([sys.executable, "-m", "slos_serve.cli", *args], env=env,
                            preexec_fn=before_exec if sys.platform.startswith("linux") else None)


@dataclass
class Placement:
    """Which cores each process runs on; None: wherever the OS likes."""

    core: set[int] | None  # the planner and the gateway
    workers: dict[str, set[int] | None]


def place(settings: Settings, available: set[int]) -> Placement:
    """Share `worker_cpus` out among the workers in order (round robin when there are more
    workers than cores) and leave the other cores to the planner and the gateway, so a worker's
    steps are not slowed by the processes that feed it."""
    ids = [wid for wid, _ in worker_roles(settings)]
    if settings.worker_cpus is None:
        return Placement(None, dict.fromkeys(ids))
    cpus = settings.worker_cpus
    if len(cpus) >= len(ids):
        share = len(cpus) // len(ids)
        workers = {wid: set(cpus[i * share:(i + 1) * share]) for i, wid in enumerate(ids)}
    else:
        workers = {wid: {cpus[i % len(cpus)]} for i, wid in enumerate(ids)}
    return Placement(available - set(cpus) or available, workers)


def wire(settings: Settings, run_dir: Path) -> Settings:
    """Fill in the ZeroMQ addresses that are not set with ipc sockets in `run_dir`, make the
    cluster's secret if none is given (the children get it in their environment, never on a
    command line), and give the planner's admin API a token if it has none (kept owner-only in
    the user cache)."""
    defaults = {
        "planner_address": ipc_address(run_dir, "planner"),
        "planner_intake_address": ipc_address(run_dir, "planner-intake"),
        "gateway_address": ipc_address(run_dir, "gateway"),
    }
    update: dict[str, object] = {k: v for k, v in defaults.items() if not getattr(settings, k)}
    if settings.cluster_secret is None and settings.cluster_secret_file is None:
        update["cluster_secret"] = secrets.token_urlsafe(32)
    if settings.threads_per_worker is None:  # the workers' cores shared out; unpinned, all but one core
        cores = len(settings.worker_cpus) if settings.worker_cpus else (os.cpu_count() or 1) - 1
        update["threads_per_worker"] = max(1, cores // len(worker_roles(settings)))
    if settings.admin_token is None:
        update["admin_token"] = secrets.token_urlsafe(24)
        path = settings.admin_token_file or platformdirs.user_cache_path("slos-serve") / f"admin-token-{settings.admin_port}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(f"{update['admin_token']}\n")
        update["admin_token_file"] = path
    return settings.model_copy(update=update)


def taken_ports(settings: Settings) -> list[int]:
    """The HTTP and admin ports something already listens on at the bind address: a second
    server there would fail to bind, after writing over the first one's admin-token file."""
    taken = []
    for port in (settings.port, settings.admin_port):
        with socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: past TIME_WAIT
            try:
                probe.bind((settings.host, port))
            except OSError:
                taken.append(port)
    return taken


def plan_profile(settings: Settings, placement: Placement) -> Path | None:
    """The profile of the served model at the workers' thread count (`slos_serve.profiles`):
    found, or measured now on the first worker's cores and cached. None for workers on a GPU
    (the planner then takes the shipped profile of the model's shape) or when profiling fails."""
    if settings.device != "cpu" or settings.model_dir is None:
        return None
    threads, dtype = settings.threads_per_worker or 1, settings.dtype
    found = profiles.find(settings.model_dir, threads, dtype, settings.engine)
    if found is not None:
        log.info("planning with the profile %s", found)
        return found
    out = profiles.cache_path(settings.model_dir, threads, dtype, settings.engine)
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("no profile of %s at %d threads (%s, engine %s) on this machine yet: measuring one now, once "
             "(a minute or two; cached in %s)", settings.model_dir.name, threads, dtype, settings.engine, out)
    partial = out.with_suffix(f".{os.getpid()}.partial")  # another `up` may be profiling the same model
    args = ["profile", "--model", str(settings.model_dir), "--quick", "--repeats", str(profiles.QUICK_REPEATS),
            "--threads", str(threads), "--engine", settings.engine, "--out", str(partial)]
    args += [] if dtype == "auto" else ["--dtype", dtype]
    first = next(iter(placement.workers.values()), None)
    if spawn(args, {**os.environ, "PYTHONUNBUFFERED": "1"}, first).wait() != 0:
        log.error("profiling failed; planning with the shipped profile of the model's shape instead")
        return None
    partial.replace(out)
    return out


def worker_roles(settings: Settings) -> list[tuple[str, str]]:
    """(worker id, role) of every worker `up` starts."""
    if settings.mode == "colocated":
        return [(f"worker-{i}", "colocated") for i in range(settings.workers)]
    return ([(f"prefill-{i}", "prefill") for i in range(settings.prefill_workers)]
            + [(f"decode-{i}", "decode") for i in range(settings.decode_workers)])


def _ready(settings: Settings) -> bool:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    try:
        with urllib.request.urlopen(f"http://{host}:{settings.port}/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def up(settings: Settings) -> int:
    """Run the cluster until interrupted; returns the exit code."""
    placement = place(settings, os.sched_getaffinity(0))
    busy = taken_ports(settings)
    if busy:
        log.error("port %s on %s is in use (another server?); choose others with --port and --admin-port",
                  ", ".join(map(str, busy)), settings.host)
        return 1
    run_dir = Path(tempfile.mkdtemp(prefix="slos-serve-"))
    settings = wire(settings, run_dir)
    if settings.profile is None:
        settings = settings.model_copy(update={"profile": plan_profile(settings, placement)})
    env = {**os.environ, **as_env(settings), "PYTHONUNBUFFERED": "1"}
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    commands = {"planner": ["planner"], "gateway": ["gateway"]}
    commands |= {wid: ["worker", "--worker-id", wid, "--role", role] for wid, role in worker_roles(settings)}

    def start(name: str) -> tuple[subprocess.Popen, float]:
        return spawn(commands[name], env, placement.workers.get(name, placement.core)), time.monotonic()

    procs = {name: start(name) for name in commands}
    started, announced, code = time.monotonic(), False, 0
    try:
        while not stopping:
            crashed = [name for name, (p, _) in procs.items() if p.poll() is not None]
            if any(procs[name][0].returncode >= 0 and time.monotonic() - procs[name][1] < MIN_UPTIME_S
                   for name in crashed):
                log.error("a process exited right after starting; stopping everything")
                code = 1
                break
            for name in crashed:
                log.error("%s exited (code %s); starting it again", name, procs[name][0].returncode)
                procs[name] = start(name)
            if not announced and _ready(settings):
                log.info("slos-serve ready: http://%s:%d/v1 (model %s, %s mode, %d workers, policy %s); "
                         "admin API http://%s:%d/admin%s", settings.host, settings.port, settings.served_model_name,
                         settings.mode, len(worker_roles(settings)), settings.policy, settings.host,
                         settings.admin_port,
                         f", token in {settings.admin_token_file}" if settings.admin_token_file else "")
                announced = True
            if not announced and time.monotonic() - started > READY_TIMEOUT_S:
                log.error("not ready after %.0f s; stopping", READY_TIMEOUT_S)
                code = 1
                break
            time.sleep(0.2)
    finally:
        stop_all([p for p, _ in procs.values()])
        shutil.rmtree(run_dir, ignore_errors=True)
        log.info("stopped")
    return code
