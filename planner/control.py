"""The operator's commands to the planner, as plain data, and the queue that carries them from
the admin API's threads into the planner's own loop.

The loop is the only thread that reads or changes planner state: an admin route puts a command
on the queue, wakes the loop through a pipe it polls beside its sockets, and waits for the
reply. Commands are executed between rounds of messages and scheduling, like any message.
"""

from __future__ import annotations

import logging
import os
import queue
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from planner.core import Planner
from planner.policies.base import Policy
from planner.policies.registry import POLICY_NAMES
from planner.state import Attainment
from shared.messages import Role

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShowWorkers:
    pass


@dataclass(frozen=True)
class SetDraining:
    worker_id: str
    draining: bool


@dataclass(frozen=True)
class SetRole:
    worker_id: str
    role: Role


@dataclass(frozen=True)
class ShowQueues:
    pass


@dataclass(frozen=True)
class ShowSLO:
    pass


@dataclass(frozen=True)
class ShowPolicy:
    pass


@dataclass(frozen=True)
class SetPolicy:
    policy: str


@dataclass(frozen=True)
class SetMode:
    mode: Literal["colocated", "disaggregated"]


@dataclass(frozen=True)
class Explain:
    request_id: str


Command = ShowWorkers | SetDraining | SetRole | ShowQueues | ShowSLO | ShowPolicy | SetPolicy | SetMode | Explain


@dataclass(frozen=True)
class Reply:
    status: int  # HTTP status: 200, or the error's
    body: Any  # JSON-able; for an error, its message


def execute(planner: Planner, command: Command, make_policy: Callable[[str], Policy]) -> Reply:
    """Carry out one command on the planner; only its loop may call this."""
    state = planner.state
    match command:
        case ShowWorkers():
            return Reply(200, [
                {"worker_id": w.worker_id, "role": w.role, "home_role": w.home_role, "target_role": w.target_role,
                 "alive": w.alive, "draining": w.draining, "speculator": w.speculator,
                 "block_size": w.block_size, "max_model_len": w.max_model_len, "kv_blocks": w.num_blocks,
                 "kv_blocks_reserved": w.reserved_blocks, "kv_blocks_free": w.reported_free_blocks,
                 "busy_s": w.busy_s, "waited_s": w.waited_s,
                 "step_fit": {"fixed": w.fit.fixed, "compute": w.fit.compute, "memory": w.fit.memory,
                              "turnaround_s": w.fit.turnaround, "margin": w.fit.margin, "error": w.fit.error},
                 "requests": list(w.requests)}
                for w in state.workers.values()])
        case SetDraining(worker_id, draining):
            if worker_id not in state.workers:
                return Reply(404, f"no worker {worker_id}")
            state.workers[worker_id].draining = draining
            return Reply(200, {"worker_id": worker_id, "draining": draining})
        case SetRole(worker_id, role):
            worker = state.workers.get(worker_id)
            if worker is None:
                return Reply(404, f"no worker {worker_id}")
            worker.home_role = role
            planner.move(worker, role)
            return Reply(200, {"worker_id": worker_id, "role": worker.role, "target_role": worker.target_role})
        case ShowQueues():
            reqs = state.requests.values()
            return Reply(200, {"waiting": [r for r in state.waiting if not state.requests[r].parked],
                               "parked": [r.request_id for r in reqs if r.parked and r.worker_id is None],
                               "running": {w.worker_id: list(w.requests) for w in state.workers.values()}})
        case ShowSLO():
            return Reply(200, {
                "attainment": _shares(state.attainment),
                "promises": _shares(state.promises),
                "caught_up": planner.caught_up,
                "speculation": {k: msgspec.structs.asdict(c) for k, c in state.speculation.items()},
                "preemptions": planner.preemptions})
        case ShowPolicy():
            return Reply(200, {"policy": planner.policy.name, "mode": state.mode, "policies": list(POLICY_NAMES)})
        case SetPolicy(name):
            roles = {w.role for w in state.workers.values() if w.alive}
            if name == "distserve" and not {"prefill", "decode"} <= roles:
                return Reply(409, "distserve needs live prefill and decode workers")
            planner.policy = make_policy(name)
            return Reply(200, {"policy": planner.policy.name})
        case SetMode(mode):
            state.mode = mode
            for worker in state.workers.values():
                if worker.alive:
                    planner.move(worker, "colocated" if mode == "colocated" else worker.home_role or worker.role)
            return Reply(200, {"mode": mode})
        case Explain(request_id):
            verdict = planner.explain(request_id)
            if verdict is None:
                return Reply(404, f"no verdict on record for request {request_id}")
            return Reply(200, {"request_id": request_id, "verdict": verdict})


class CommandQueue:
    """Commands from other threads for the planner's loop, with a pipe to wake it."""

    def __init__(self) -> None:
        self._pending: queue.SimpleQueue[tuple[Command, Future[Reply]]] = queue.SimpleQueue()
        self.wake_fd, self._wake_write = os.pipe()
        os.set_blocking(self.wake_fd, False)
        os.set_blocking(self._wake_write, False)

    def ask(self, command: Command, timeout_s: float = 10.0) -> Reply:
        """Send a command and wait for the loop's reply (from any thread but the loop's)."""
        reply: Future[Reply] = Future()
        self._pending.put((command, reply))
        try:
            os.write(self._wake_write, b"x")
        except BlockingIOError:  # the pipe is full of wake-ups already
            pass
        try:
            return reply.result(timeout_s)
        except TimeoutError:
            return Reply(503, "the planner did not answer in time")

    def run_pending(self, planner: Planner, make_policy: Callable[[str], Policy]) -> None:
        """Execute every queued command (on the loop's thread)."""
        try:
            while os.read(self.wake_fd, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                command, reply = self._pending.get_nowait()
            except queue.Empty:
                return
            try:
                reply.set_result(execute(planner, command, make_policy))
            except Exception as exc:  # a bad command must not take the planner down
                log.exception("admin command %s failed", command)
                reply.set_result(Reply(500, f"{type(exc).__name__}: {exc}"))

    def close(self) -> None:
        os.close(self.wake_fd)
        os.close(self._wake_write)


def _shares(counts: dict[str, Attainment]) -> dict[str, dict[str, float | int | None]]:
    return {k: {"met": a.met, "total": a.total, "share": a.met / a.total if a.total else None}
            for k, a in counts.items()}
