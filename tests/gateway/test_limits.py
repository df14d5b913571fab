"""A request body over the limit is refused with a 413 before anything reads it, whether it
declares its length or streams in without one; the gateway answers other requests meanwhile."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from fastapi.testclient import TestClient

from gateway.app import create_app
from shared.settings import Settings


def test_a_body_over_the_limit_gets_a_413_at_once(tiny_model: Path, tmp_path: Path) -> None:
    settings = Settings(model_dir=tiny_model, max_request_bytes=64 * 1024, cluster_secret="test-cluster-secret-0123",
                        planner_intake_address=f"ipc://{tmp_path}/intake.sock",
                        gateway_address=f"ipc://{tmp_path}/gateway.sock")
    with TestClient(create_app(settings)) as client:
        big = b'{"model": "x", "prompt": "' + b"a" * (4 * 1024 * 1024) + b'"}'
        started = time.monotonic()
        declared = client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert declared.status_code == 413 and time.monotonic() - started < 5
        assert declared.json()["error"]["code"] == "request_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"model": "x", "prompt": "'
            for _ in range(64):
                yield b"a" * 4096
            yield b'"}'

        streamed = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        small = client.post("/v1/completions", json={"model": "x", "prompt": "hello"})
        assert small.status_code == 404  # read and checked as usual: the model name is wrong
        assert client.get("/health").status_code == 503  # no planner here, but it answers
