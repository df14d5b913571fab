"""While the planner's status says it refuses every new request with objectives (its
best-effort queue is full), the gateway answers 429 itself, at once, without a trip to the
planner (issue 26, item 7); a request without objectives is still submitted (issue 21)."""

from __future__ import annotations

import time
from pathlib import Path

import zmq
from fastapi.testclient import TestClient

from gateway.app import create_app
from shared.bus import Bus
from shared.messages import ClusterStatus, WorkerStatus, decode
from shared.settings import Settings

SECRET = "test-cluster-secret-0123"


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
            link.status = ClusterStatus([WorkerStatus("w0", "colocated", True, 10, 10, 0)], 300, 0, 0, 0,
                                        parked=256, refusing="overloaded: the best-effort queue is full")
            link.status_time = time.monotonic()
            for stream, slo in ((False, {"slo_class": "chatbot"}), (True, {"ttft_ms": 900.0})):
                r = client.post("/v1/completions", json={"model": "m", "prompt": "hello", "stream": stream, **slo})
                assert r.status_code == 429, r.text
                assert "best-effort queue is full" in r.json()["error"]["message"]
                assert r.headers["retry-after"] == "1"
            assert link.open_requests == 0
            sent = []
            while planner.poll(200):
                sent.append(type(decode(planner.recv())).__name__)
            assert "Submit" not in sent, sent  # a hello, and aborts of what the client no longer waits for
            metrics = client.get("/metrics").text
            assert 'slos_verdict_seconds_count{verdict="refused"} 2.0' in metrics

            r = client.post("/v1/completions", json={"model": "m", "prompt": "hello"})
            assert r.status_code == 504, r.text  # submitted, and no planner here answers it
            sent = [type(decode(planner.recv())).__name__ for _ in iter(lambda: planner.poll(200), 0)]
            assert "Submit" in sent, sent
    finally:
        planner.close()
        bus.close()
