"""The simulator checked against reality: one scenario's capacity found live on this machine,
with the built-in model served by `slos-serve up`, and in the simulator.

The simulator gets what it would get for any hardware: a profile of the engine measured here at
the worker's thread count, the planner in the loop (each order starts as late as the planner's
real compute took, which grows with the queue), and the live loop's other cost per step
(messages, streaming) added to the profile's fixed cost. That cost
is measured on the idle server: one stream's time per token less the simulated one's. The
planner, live and simulated, is given the measured profile and calibrates it online against
the steps it sees, as always; the scenario's objectives scale with the idle latencies, loop
included. Prompts and outputs are clipped to the model's context window, the same way for
both runs.

The worker runs alone on the last core (`--worker-cpus`), where its profile is measured too;
the gateway, the planner and the load generator share the others, as they would share a host's
spare cores beside a GPU. A loaded machine still runs slower than an idle one. So the
simulator runs a second time with the profile rescaled as the live planner's online
calibration found the worker's steps at the live capacity (`planner.calibration`: a factor
for the fixed costs, one for the roofline): what the simulator would be given for hardware
known to behave so under load.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import numpy as np
import torch

from bench.capacity import Search, capacity
from bench.live import run_live
from bench.simulator import Cluster, simulate
from bench.workloads import Arrival, attainment, scenario
from engine.profiler import profile as measure
from planner.policies import make_policy
from shared.bus import free_tcp_port
from shared.roofline import Profile, save_profile
from shared.settings import Settings
from shared.slo import DEFAULT_CLASSES

IDLE_PROMPT, IDLE_OUTPUT = 64, 64  # the stream that measures the loop's cost per step


@dataclass
class LiveServer:
    url: str
    admin_url: str
    token: str
    api_key: str
    model: str

    def admin(self, path: str) -> object:
        return httpx.get(self.admin_url + path, headers={"Authorization": f"Bearer {self.token}"}).json()


@dataclass
class Validation:
    loop_overhead_s: float
    simulated: Search
    live: Search
    loaded_fits: dict[float, tuple[float, float]]  # per live probe's rate, the calibration's (fixed, work) factors
    simulated_loaded: Search  # with the profile rescaled as at the live capacity

    @property
    def loaded_fit(self) -> tuple[float, float]:
        """The factors at the live capacity."""
        return self.loaded_fits.get(self.live.capacity, (1.0, 1.0))


@contextmanager
def live_server(model: Path, profile: Path, log: Path, worker_cpus: set[int], policy: str = "slos"
                ) -> Iterator[LiveServer]:
    """`slos-serve up` with one colocated worker on `worker_cpus`, no speculation, until the block ends."""
    port, admin_port, token, key = free_tcp_port(), free_tcp_port(), secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    env = {**os.environ, "SLOS_ADMIN_TOKEN": token, "SLOS_API_KEY": key}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "slos_serve.cli", "up", "--model", str(model), "--port", str(port),
             "--admin-port", str(admin_port), "--workers", "1", "--policy", policy, "--profile", str(profile),
             "--speculator", "none", "--worker-cpus", ",".join(map(str, sorted(worker_cpus)))],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        server = LiveServer(url, f"http://127.0.0.1:{admin_port}", token, key, "")
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start; see {log}")
            try:
                workers = server.admin("/admin/workers")
                if isinstance(workers, list) and any(w["alive"] for w in workers):
                    models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
                    server.model = models["data"][0]["id"]
                    break
            except (httpx.TransportError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        yield server
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def calibration_seen(server: LiveServer, every_s: float = 1.0) -> Iterator[list[tuple[float, float]]]:
    """The worker's calibration factors (fixed, work), read every second while the block runs."""
    seen: list[tuple[float, float]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.wait(every_s):
            fit = server.admin("/admin/workers")[0]["step_fit"]  # type: ignore[index]
            seen.append((float(fit["fixed"]), float(fit["work"])))

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join()
        if not seen:
            seen.append((1.0, 1.0))


def within_context(arrivals: list[Arrival], max_len: int) -> list[Arrival]:
    """Prompts clipped to half the context window, outputs to what is left of it."""
    out = []
    for a in arrivals:
        prompt = min(a.prompt_tokens, max_len // 2)
        then = within_context([a.then], max_len)[0] if a.then is not None else None
        out.append(dataclasses.replace(a, prompt_tokens=prompt, output_tokens=min(a.output_tokens, max_len - prompt - 1),
                                       then=then))
    return out


def with_loop_overhead(profile: Profile, overhead_s: float) -> Profile:
    return msgspec.structs.replace(profile, params=msgspec.structs.replace(
        profile.params, overhead_s=profile.params.overhead_s + overhead_s))


def validate(model: Path, scenario_name: str, duration_s: float, workdir: Path, splits: int = 4, seed: int = 0,
             say: Callable[[str], None] = print) -> Validation:
    settings = Settings()
    cores = sorted(os.sched_getaffinity(0))
    worker_core, others = {cores[-1]}, set(cores[:-1]) or set(cores)
    torch.set_num_threads(1)  # what `up` gives a worker on one core
    os.sched_setaffinity(0, worker_core)
    measured, _, _ = measure(model, repeats=3)
    os.sched_setaffinity(0, set(cores))
    say(f"profile measured: held-out R² {measured.quality.r2:.3f}" if measured.quality else "profile measured")
    path = workdir / "validation-profile.json"
    save_profile(measured, path)
    with live_server(model, path, workdir / "server.log", worker_core) as server:
        os.sched_setaffinity(0, others)  # from here on this process is the load generator
        worker = server.admin("/admin/workers")[0]  # type: ignore[index]
        vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
        max_len = int(worker["max_model_len"])
        idle_arrival = [Arrival("idle", 0.0, IDLE_PROMPT, IDLE_OUTPUT, "chatbot")]
        idle = run_live(server.url + "/v1", server.api_key, server.model, idle_arrival, vocab, DEFAULT_CLASSES)
        live_tpot = idle[0].tpots_s[-1] or 0.0
        cluster = Cluster(measured, int(worker["kv_blocks"]), colocated=1, block_size=int(worker["block_size"]),
                          max_model_len=max_len, planner_in_loop=True)
        simulated_idle = simulate(make_policy("slos", settings, measured), cluster, idle_arrival, DEFAULT_CLASSES)
        overhead = max(0.0, live_tpot - (simulated_idle.outcomes[0].tpots_s[-1] or 0.0))
        prof = with_loop_overhead(measured, overhead)
        say(f"idle time per token live {live_tpot * 1e3:.1f} ms; loop overhead per step beside the planner's "
            f"{overhead * 1e3:.1f} ms")
        cluster = dataclasses.replace(cluster, profile=prof)

        def arrivals(rate: float) -> list[Arrival]:
            return within_context(scenario(scenario_name, prof, rate, duration_s, seed), max_len)

        def simulated_at(cluster: Cluster, rate: float) -> float:
            result = simulate(make_policy("slos", settings, measured), cluster, arrivals(rate), DEFAULT_CLASSES,
                              seed=seed)
            say(f"simulated on {cluster.profile.hardware} {rate:.3f} req/s: attainment {result.attainment:.1%}")
            return result.attainment

        fits: dict[float, tuple[float, float]] = {}

        def live_at(rate: float) -> float:
            with calibration_seen(server) as seen:
                outcomes = run_live(server.url + "/v1", server.api_key, server.model, arrivals(rate), vocab,
                                    DEFAULT_CLASSES)
            fits[rate] = (float(np.median([f for f, _ in seen])), float(np.median([w for _, w in seen])))
            say(f"live {rate:.3f} req/s: attainment {attainment(outcomes):.1%}; steps ran "
                f"{fits[rate][0]:.2f}x the profile's fixed cost, {fits[rate][1]:.2f}x its roofline")
            return attainment(outcomes)

        simulated = capacity(lambda r: simulated_at(cluster, r), start=1.0, splits=splits)
        live = capacity(live_at, start=simulated.capacity or 1.0, splits=splits)
    fixed, work = fits.get(live.capacity, (1.0, 1.0))
    loaded = dataclasses.replace(cluster, profile=msgspec.structs.replace(
        measured.rescaled(fixed, work), hardware=f"{prof.hardware} as loaded"))
    simulated_loaded = capacity(lambda r: simulated_at(loaded, r), start=live.capacity or 1.0, splits=splits)
    return Validation(overhead, simulated, live, fits, simulated_loaded)
