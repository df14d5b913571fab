"""The admin API over a live planner object: token required, commands carried out by the
planner's own loop, and the operator's levers (drain, role, policy, mode) acting on the next
scheduling call."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from planner.admin import create_admin_app
from planner.control import CommandQueue
from planner.core import Planner
from planner.loop import _start_admin
from planner.policies.fcfs import FCFSPolicy
from planner.policies.sarathi import SarathiPolicy
from shared.clock import ManualClock
from shared.messages import RequestProgress, SamplingParams, SLOSpec, SpecCounts, StepReport, Submit, WorkerHello
from shared.settings import Settings
from shared.slo import DEFAULT_CLASSES

TOKEN = "admin-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def setup() -> Iterator[tuple[Planner, TestClient]]:
    """A planner, its admin API, and a thread standing in for the planner's loop: it wakes on
    the command queue's pipe and carries out what is queued, as `planner.loop` does."""
    planner = Planner(FCFSPolicy(), ManualClock(), DEFAULT_CLASSES, worker_timeout_s=10.0)
    for wid in ("w0", "w1"):
        planner.on_hello(WorkerHello(wid, "colocated", 64, 16, 2048, 1))
    policies = {"fcfs": FCFSPolicy, "sarathi": SarathiPolicy}
    commands = CommandQueue()
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            if select.select([commands.wake_fd], [], [], 0.05)[0]:
                commands.run_pending(planner, lambda name: policies[name]())

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield planner, TestClient(create_admin_app(commands, TOKEN))
    stop.set()
    thread.join()
    commands.close()


def submit(planner: Planner, rid: str) -> None:
    planner.on_submit(Submit(rid, [1] * 20, SamplingParams(max_tokens=4, temperature=0.0), SLOSpec("coding"), 0.0))


def test_every_route_needs_the_admin_token(setup: tuple[Planner, TestClient]) -> None:
    _, client = setup
    for path in ("/admin/workers", "/admin/queues", "/admin/slo", "/admin/policy", "/admin/requests/x"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    body = client.get("/admin/workers").json()
    assert body["error"]["message"] == "invalid or missing admin token"
    assert client.get("/health").json() == {"status": "ok"}  # liveness alone is open, and tells nothing


def test_drain_keeps_new_requests_off_a_worker_and_the_verdict_says_where_they_went(
        setup: tuple[Planner, TestClient]) -> None:
    planner, client = setup
    assert client.post("/admin/workers/w0/drain", headers=AUTH).json() == {"worker_id": "w0", "draining": True}
    assert client.post("/admin/workers/nope/drain", headers=AUTH).status_code == 404
    for rid in ("a", "b"):
        submit(planner, rid)
    planner.schedule()
    assert client.get("/admin/requests/a", headers=AUTH).json()["verdict"].startswith("admitted to worker w1")
    assert client.get("/admin/requests/zzz", headers=AUTH).status_code == 404
    queues = client.get("/admin/queues", headers=AUTH).json()
    assert queues["running"] == {"w0": [], "w1": ["a", "b"]} and queues["waiting"] == []
    workers = {w["worker_id"]: w for w in client.get("/admin/workers", headers=AUTH).json()}
    assert workers["w0"]["draining"] and workers["w1"]["requests"] == ["a", "b"]
    assert (workers["w1"]["kv_blocks"], workers["w1"]["block_size"], workers["w1"]["max_model_len"]) == (64, 16, 2048)
    client.post("/admin/workers/w0/undrain", headers=AUTH)
    assert not planner.state.workers["w0"].draining


def test_policy_and_mode_switch_live(setup: tuple[Planner, TestClient]) -> None:
    planner, client = setup
    assert client.get("/admin/policy", headers=AUTH).json()["policy"] == "fcfs"
    assert client.put("/admin/policy", json={"policy": "sarathi"}, headers=AUTH).json() == {"policy": "sarathi"}
    assert planner.policy.name == "sarathi"
    assert client.put("/admin/policy", json={"policy": "distserve"}, headers=AUTH).status_code == 409
    assert client.put("/admin/policy", json={"policy": "nope"}, headers=AUTH).status_code == 422
    assert client.put("/admin/workers/w1/role", json={"role": "decode"}, headers=AUTH).json()["role"] == "decode"
    assert planner.state.workers["w1"].home_role == "decode"
    client.put("/admin/mode", json={"mode": "colocated"}, headers=AUTH)
    assert {w.role for w in planner.state.workers.values()} == {"colocated"}
    client.put("/admin/mode", json={"mode": "disaggregated"}, headers=AUTH)
    assert planner.state.workers["w1"].role == "decode"


def test_slo_attainment_per_class(setup: tuple[Planner, TestClient]) -> None:
    planner, client = setup
    submit(planner, "a")
    orders = planner.schedule()[0]
    wid, order = next(iter(orders.items()))
    planner.on_report(StepReport(wid, order.step_id, 0.01, [RequestProgress("a", 20, 1)], [], 60))
    order = planner.schedule()[0][wid]
    planner.on_report(StepReport(wid, order.step_id, 0.01, [RequestProgress("a", 23, 4, "length")], [], 64))
    planner.state.speculation = {"coding": SpecCounts(10, 6, 4, rejected=3)}
    slo = client.get("/admin/slo", headers=AUTH).json()
    assert slo["attainment"] == {"coding": {"met": 1, "total": 1, "share": 1.0}}
    assert slo["speculation"] == {"coding": {"proposed": 10, "accepted": 6, "steps": 4, "rejected": 3}}


def test_an_admin_port_already_taken_stops_the_planner() -> None:
    """Before, the admin API's thread failed to bind and the planner went on without it."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        settings = Settings(admin_port=other.getsockname()[1], admin_token="t")
        with pytest.raises(SystemExit, match="cannot listen"):
            _start_admin(settings, CommandQueue())
