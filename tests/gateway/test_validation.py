"""Values the engine cannot execute or the planner cannot honour are refused with a 400 before
any work: a seed beyond 64 bits, objectives that are not finite or beyond an hour (in the body
or in headers), text that is not valid Unicode."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from shared.settings import Settings


@pytest.fixture
def client(tiny_model: Path, tmp_path: Path) -> TestClient:
    settings = Settings(model_dir=tiny_model, served_model_name="m", cluster_secret="test-cluster-secret-0123",
                        planner_intake_address=f"ipc://{tmp_path}/intake.sock",
                        gateway_address=f"ipc://{tmp_path}/gateway.sock")
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.mark.parametrize("extra", [{"seed": 2**80}, {"seed": -(2**64)}, {"tpot_ms": 1e300}, {"ttft_ms": "inf"},
                                   {"tpot_ms": "nan"}, {"slo_stages": [{"tokens": 4, "tpot_ms": "inf"}]},
                                   {"top_k": 2**86}, {"max_tokens": 2**70},
                                   {"slo_stages": [{"tokens": 2**70, "tpot_ms": 50}]}])
def test_out_of_range_values_in_the_body_are_a_400(client: TestClient, extra: dict) -> None:
    r = client.post("/v1/completions", json={"model": "m", "prompt": "hello", **extra})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e300", "0", "-5"])
def test_out_of_range_objective_headers_are_a_400(client: TestClient, value: str) -> None:
    r = client.post("/v1/completions", json={"model": "m", "prompt": "hello"}, headers={"x-slo-tpot-ms": value})
    assert r.status_code == 400 and "x-slo-tpot-ms" in r.json()["error"]["message"]


def test_a_lone_surrogate_is_a_400_not_a_500(client: TestClient) -> None:
    body = '{"model": "m", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "Unicode" in r.json()["error"]["message"]
    r = client.post("/v1/completions", content='{"model": "m", "prompt": "\\udfff"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400
