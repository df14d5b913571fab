"""Where the planner's best-effort queue has no room left, the gateway answers a new request
with objectives 429 itself, at once, without a trip to the planner and before tokenizing its
prompt (issue 26, item 7); a request without objectives is still submitted (issue 21). The room
is the planner's last status less what the gateway has sent since and not yet heard decided,
and less what the planner parked since."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import zmq
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.planner_link import PlannerLink
from shared.bus import Bus
from shared.messages import (
    Admitted,
    ClusterStatus,
    Parked,
    SamplingParams,
    SLOSpec,
    Submit,
    WorkerStatus,
    decode,
    encode,
)
from shared.settings import Settings

SECRET = "test-cluster-secret-0123"


def status(room: int) -> ClusterStatus:
    return ClusterStatus([WorkerStatus("w0", "colocated", True, 10, 10, 0)], 300, 0, 0, 0, parked=256,
                         queue_room=room)


def test_a_full_queue_is_answered_at_the_gateway(tiny_model: Path, tmp_path: Path) -> None:
    intake = f"ipc://{tmp_path}/intake.sock"
    bus = Bus(SECRET)
    planner = bus.socket(zmq.PULL, bind=intake)  # what the gateway submits would arrive here
    settings = Settings(model_dir=tiny_model, served_model_name="m", cluster_secret=SECRET,
                        planner_intake_address=intake, gateway_address=f"ipc://{tmp_path}/gateway.sock",
                        request_timeout_s=1)  # without the fast answer: a 504 after 1 s
    try:
        with TestClient(create_app(settings)) as client:
            link = client.app.state.link
            link.status, link.status_time = status(0), time.monotonic()
            for stream, slo in ((False, {"slo_class": "chatbot"}), (True, {"ttft_ms": 900.0})):
                r = client.post("/v1/completions", json={"model": "m", "prompt": "hello", "stream": stream, **slo})
                assert r.status_code == 429, r.text
                assert "best-effort queue is full" in r.json()["error"]["message"]
                assert r.headers["retry-after"] == "1"
            assert link.open_requests == 0
            sent = []
            while planner.poll(200):
                sent.append(type(decode(planner.recv())).__name__)
            assert sent == ["GatewayHello"], sent  # nothing submitted, nothing opened to abort
            metrics = client.get("/metrics").text
            assert 'slos_verdict_seconds_count{verdict="refused"} 2.0' in metrics
            assert 'slos_requests_total{endpoint="completions",outcome="429"} 2.0' in metrics

            r = client.post("/v1/completions", json={"model": "m", "prompt": "hello"})
            assert r.status_code == 504, r.text  # submitted, and no planner here answers it
            sent = [type(decode(planner.recv())).__name__ for _ in iter(lambda: planner.poll(200), 0)]
            assert "Submit" in sent, sent
    finally:
        planner.close()
        bus.close()


def test_the_room_counts_what_was_sent_since_the_planners_last_word(tmp_path: Path) -> None:
    """Three places: two requests sent with objectives and one without leave one, whatever the
    planner does with them, until it says; a parked one keeps its place until the next status,
    an admitted one gives it back, and so does one the gateway lets go undecided."""
    bus = Bus(SECRET)
    intake, inbox = f"ipc://{tmp_path}/intake.sock", f"ipc://{tmp_path}/gateway.sock"
    planner_in = bus.socket(zmq.PULL, bind=intake)
    planner_out = bus.socket(zmq.PUSH, connect=inbox)

    async def scenario() -> None:
        link = PlannerLink(intake, inbox, SECRET)
        link.start()

        async def heard(msg: object, until) -> None:  # sent by the planner, and taken in by the link
            planner_out.send(encode(msg))
            for _ in range(200):
                if until():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"the link never took in {msg}")

        def submit(rid: str, objectives: bool):
            return link.submit(Submit(rid, [1, 2], SamplingParams(), SLOSpec(ttft_ms=500.0 if objectives else None),
                                      0.0), objectives)

        try:
            assert link.queue_room() is None  # no word from the planner yet
            await heard(status(3), lambda: link.status is not None)
            assert link.queue_room() == 3
            for rid, objectives in (("a", True), ("b", True), ("plain", False)):
                link.open(rid)
                await submit(rid, objectives)
            assert link.queue_room() == 1
            await heard(Parked("a", "waiting for room"), lambda: not link._queues["a"].empty())
            await heard(Admitted("b"), lambda: not link._queues["b"].empty())
            assert link.queue_room() == 2  # a holds its place; b got one of its own
            await heard(status(2), lambda: link.status.queue_room == 2)
            assert link.queue_room() == 2  # the planner counts a now
            link.open("c")
            await submit("c", True)
            assert link.queue_room() == 1
            link.release("c")  # its client went away before the planner said anything
            assert link.queue_room() == 2
            await heard(status(-1), lambda: link.status.queue_room == -1)
            assert link.queue_room() is None  # no bound
        finally:
            await link.close()

    try:
        asyncio.run(scenario())
        sent = [decode(planner_in.recv()) for _ in iter(lambda: planner_in.poll(200), 0)]
        assert [m.request_id for m in sent if isinstance(m, Submit)] == ["a", "b", "plain", "c"]
    finally:
        planner_in.close()
        planner_out.close()
        bus.close()
