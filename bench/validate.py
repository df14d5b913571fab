"""The simulator checked against reality: one scenario's capacity found live on this machine,
with the built-in model served by `slos-serve up`, and in the simulator.

The simulator gets what it would get for any hardware: a profile of the engine measured here at
the worker's thread count, the planner in the loop (each order starts as late as the planner's
real compute took, which grows with the queue), and the live loop's other cost per step
(messages, streaming) added to the profile's fixed cost. That cost is measured on the idle
server: one stream's time per token less the simulated one's. Likewise the front end's (HTTP,
the gateway, and the first token's way back): the idle stream's time to first token less the
simulated one's, by which each simulated request reaches the planner after its client sent
it. The live planner is given the measured profile and calibrates it online against the
steps it sees, as always; by a probe's start it has calibrated through the probes before. So
the simulated planner starts calibrated: it is given the profile the simulated worker runs (a
cold one admits too much before it learns how slow the steps are, and its requests then miss
their TPOTs where the live ones wait and miss their TTFTs). The scenario's objectives scale
with the idle latencies, loop included. Prompts and outputs are clipped to the model's
context window, the same way for both runs.

The worker runs alone on the last core (`--worker-cpus`), where its profile is measured too;
the gateway, the planner and the load generator share the others, as they would share a host's
spare cores beside a GPU. A loaded machine still runs slower than an idle one, and less
evenly. So the simulator runs a second time with the profile rescaled as the live planner's
online calibration found the worker's steps near the capacity (`planner.calibration`: a factor
for the fixed costs, one for the roofline; medians of readings every second through the live
probes within 15 % of the live capacity: one probe's minute is too short, as the two factors
trade off against each other, and probes far from the capacity load the machine, and so slow
its steps, differently), and a third time with the steps also as scattered about it as the
calibration's remaining error says: what the simulator would be given for hardware known to
behave so under load. The scatter matters beyond the misses it causes: the planner plans
below each TPOT by its prediction error, live and simulated alike.
"""

from __future__ import annotations

import dataclasses
import math
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
import psutil
import torch

from bench.capacity import Search, capacity
from bench.live import run_live
from bench.simulator import Cluster, simulate
from bench.workloads import Arrival, Outcome, attainment, scenario, within_context
from engine.profiler import profile as measure
from planner.policies.base import Policy
from planner.policies.registry import PolicyConfig, make_policy
from shared.bus import free_tcp_port
from shared.model_info import vocab_size
from shared.roofline import Profile, save_profile
from shared.settings import Settings
from shared.slo import DEFAULT_CLASSES

IDLE_PROMPT, IDLE_OUTPUT = 64, 64  # the streams that measure the loop's cost per step and the front end's
IDLE_STREAMS = 3  # one after another, 2 s apart: the last, on a warmed-up server, is the one measured
NEAR_CAPACITY = 1.15  # probes whose rate is within this factor of the live capacity give the loaded profile


@dataclass
class LiveServer:
    url: str
    admin_url: str
    token: str
    api_key: str
    model: str

    def admin(self, path: str) -> object:
        return httpx.get(self.admin_url + path, headers={"Authorization": f"Bearer {self.token}"}).json()


@dataclass(frozen=True)
class StepsSeen:
    """The live calibration: medians of its readings every second, through a probe or several."""

    fixed: float = 1.0  # factor on the profile's fixed cost
    compute: float = 1.0  # on its compute time
    memory: float = 1.0  # on its memory time
    turnaround: float = 0.0  # seconds every step took beyond the profile
    error: float = 0.0  # mean relative error of the rescaled profile's predictions

    def __str__(self) -> str:
        return (f"{self.fixed:.2f}x the profile's fixed cost, {self.compute:.2f}x its compute, {self.memory:.2f}x "
                f"its memory time, +{self.turnaround * 1e3:.1f} ms, {self.error:.1%} off that")

    @property
    def spread(self) -> float:
        """σ of lognormal step times whose mean relative error this is (E|X - 1| ≈ σ √(2/π))."""
        return self.error * math.sqrt(math.pi / 2)


@dataclass
class Validation:
    loop_overhead_s: float
    front_s: float  # the idle server's time to first token less the simulated one's
    simulated: Search
    live: Search
    seen: dict[float, StepsSeen]  # per live probe's rate
    loaded: StepsSeen  # over the live probes near the capacity
    simulated_loaded: Search  # with the profile rescaled as live
    simulated_scattered: Search  # and with the steps scattered as live


@contextmanager
def live_server(model: Path, profile: Path | None, log: Path, worker_cpus: set[int] | None, policy: str = "slos",
                layout: tuple[str, ...] = ("--workers", "1"), workers: int = 1,
                front_cpus: set[int] | None = None) -> Iterator[LiveServer]:
    """`slos-serve up` with one colocated worker, or the `workers` that `layout` asks for (on
    `worker_cpus`, or sharing every core), no speculation, with `profile` (or the one `up`
    picks), until the block ends. With `front_cpus`, every other process of the server, and
    this one (the client), runs on those cores, every thread of it."""
    port, admin_port, token, key = free_tcp_port(), free_tcp_port(), secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    env = {**os.environ, "SLOS_ADMIN_TOKEN": token, "SLOS_API_KEY": key}
    args = [sys.executable, "-m", "slos_serve.cli", "up", "--model", str(model), "--port", str(port),
            "--admin-port", str(admin_port), *layout, "--policy", policy, "--speculator", "none"]
    args += ["--profile", str(profile)] if profile else []
    args += ["--worker-cpus", ",".join(map(str, sorted(worker_cpus)))] if worker_cpus else []
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        server = LiveServer(url, f"http://127.0.0.1:{admin_port}", token, key, "")
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start; see {log}")
            try:
                up = server.admin("/admin/workers")
                if isinstance(up, list) and sum(w["alive"] for w in up) == workers:
                    models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
                    server.model = models["data"][0]["id"]
                    break
            except (httpx.TransportError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        if front_cpus:
            server_side = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True)
                                       if "worker" not in p.cmdline())]
            pin_threads([os.getpid(), *server_side], front_cpus)
        yield server
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def pin_threads(pids: list[int], cpus: set[int]) -> None:
    """Every thread of these processes onto `cpus` (a process's affinity is its main thread's)."""
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), cpus)


@contextmanager
def calibration_seen(server: LiveServer, every_s: float = 1.0) -> Iterator[list[tuple[float, ...]]]:
    """The worker's calibration (`StepsSeen`'s fields), read every second while the block runs."""
    seen: list[tuple[float, ...]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.wait(every_s):
            fit = server.admin("/admin/workers")[0]["step_fit"]  # type: ignore[index]
            seen.append(tuple(float(fit[k]) for k in ("fixed", "compute", "memory", "turnaround_s", "error")))

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join()
        if not seen:
            seen.append(dataclasses.astuple(StepsSeen()))


def medians(readings: list[tuple[float, ...]]) -> StepsSeen:
    return StepsSeen(*(float(np.median(column)) for column in zip(*readings)))


def near_capacity(readings: dict[float, list[tuple[float, ...]]], capacity: float) -> StepsSeen:
    """The calibration over the probes within NEAR_CAPACITY of the capacity (over all of them if none is)."""
    near = [r for rate, seen in readings.items() if capacity / NEAR_CAPACITY <= rate <= capacity * NEAR_CAPACITY
            for r in seen]
    return medians(near or [r for seen in readings.values() for r in seen])


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
        vocab = vocab_size(model)
        max_len = int(worker["max_model_len"])
        idle_arrivals = [Arrival(f"idle{i}", 2.0 * i, IDLE_PROMPT, IDLE_OUTPUT, "chatbot") for i in range(IDLE_STREAMS)]

        def slos(profile: Profile) -> Policy:
            return make_policy("slos", PolicyConfig.from_settings(settings), profile)

        def last(outcomes: list[Outcome]) -> Outcome:
            return next(o for o in outcomes if o.request_id == idle_arrivals[-1].request_id)

        idle = last(run_live(server.url + "/v1", server.api_key, server.model, idle_arrivals, vocab, DEFAULT_CLASSES))
        live_tpot = idle.tpots_s[-1] or 0.0
        cluster = Cluster(measured, int(worker["kv_blocks"]), colocated=1, block_size=int(worker["block_size"]),
                          max_model_len=max_len, planner_in_loop=True)
        simulated_idle = last(simulate(slos(measured), cluster, idle_arrivals, DEFAULT_CLASSES).outcomes)
        overhead = max(0.0, live_tpot - (simulated_idle.tpots_s[-1] or 0.0))
        prof = with_loop_overhead(measured, overhead)
        cluster = dataclasses.replace(cluster, profile=prof)
        simulated_idle = last(simulate(slos(prof), cluster, idle_arrivals, DEFAULT_CLASSES).outcomes)
        front = max(0.0, (idle.ttft_s or 0.0) - (simulated_idle.ttft_s or 0.0))
        cluster = dataclasses.replace(cluster, front_s=front)
        say(f"idle time per token live {live_tpot * 1e3:.1f} ms; loop overhead per step beside the planner's "
            f"{overhead * 1e3:.1f} ms; front end (client to planner and back) {front * 1e3:.1f} ms")

        def arrivals(rate: float) -> list[Arrival]:
            return within_context(scenario(scenario_name, prof, rate, duration_s, seed), max_len)

        def simulated_at(cluster: Cluster, rate: float) -> float:
            result = simulate(slos(cluster.profile), cluster, arrivals(rate), DEFAULT_CLASSES, seed=seed)
            say(f"simulated on {cluster.profile.hardware}{' scattered' if cluster.step_spread else ''} {rate:.3f} "
                f"req/s: attainment {result.attainment:.1%}")
            return result.attainment

        readings_at: dict[float, list[tuple[float, ...]]] = {}
        seen: dict[float, StepsSeen] = {}

        def live_at(rate: float) -> float:
            with calibration_seen(server) as readings:
                outcomes = run_live(server.url + "/v1", server.api_key, server.model, arrivals(rate), vocab,
                                    DEFAULT_CLASSES)
            readings_at[rate] = readings
            steps = seen[rate] = medians(readings)
            say(f"live {rate:.3f} req/s: attainment {attainment(outcomes):.1%}; steps ran {steps}")
            return attainment(outcomes)

        simulated = capacity(lambda r: simulated_at(cluster, r), start=1.0, splits=splits)
        live = capacity(live_at, start=simulated.capacity or 1.0, splits=splits)
    steps = near_capacity(readings_at, live.capacity)
    loaded = dataclasses.replace(cluster, profile=msgspec.structs.replace(
        measured.rescaled(steps.fixed, steps.compute, steps.memory, steps.turnaround), hardware=f"{prof.hardware} as loaded"))
    scattered = dataclasses.replace(loaded, step_spread=steps.spread)
    simulated_loaded, simulated_scattered = (
        capacity(lambda r: simulated_at(c, r), start=live.capacity or 1.0, splits=splits) for c in (loaded, scattered))
    return Validation(overhead, front, simulated, live, seen, steps, simulated_loaded, simulated_scattered)
