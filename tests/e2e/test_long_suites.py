"""The long reliability suites of issue 26, run by hand, not in CI (minutes each):
`pip install -e ".[dev,long]" && SLOS_LONG_TESTS=1 python -m pytest tests/e2e/test_long_suites.py`.
Figures from a run are in docs/reliability.md."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import msgspec
import pytest
import zmq

from server_process import API_KEY, IGNORE_EOS, Server, children, cluster_secret, start, wait_idle
from shared.bus import Bus
from shared.messages import (
    Abort,
    Heartbeat,
    KVFetch,
    Lost,
    SamplingParams,
    SLOSpec,
    StepReport,
    Submit,
    TokenChunk,
    encode,
)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serial"),
              pytest.mark.skipif(os.environ.get("SLOS_LONG_TESTS") != "1", reason="long: set SLOS_LONG_TESTS=1")]

CASES = 1000


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start(tiny_model, tmp_path_factory.mktemp("long"), workers=1,
                extra=("--mode", "disaggregated", "--prefill", "1", "--decode", "1", "--kv-transport", "zmq"))
    yield srv
    srv.stop()


@pytest.mark.timeout(1800)
def test_schemathesis_finds_no_server_error(server: Server, tmp_path: Path) -> None:
    """The gateway's own OpenAPI schema, with the served model's name as the only `model`, so
    that generated requests reach the planner and the workers."""
    pytest.importorskip("schemathesis")
    schema = httpx.get(server.url + "/openapi.json").json()
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        schema["components"]["schemas"][name]["properties"]["model"] = {"type": "string", "enum": [server.model]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    run = subprocess.run([shutil.which("schemathesis") or "schemathesis", "run", str(tmp_path / "schema.json"),
                          "--url", server.url, "--checks", "not_a_server_error", "--max-examples", "300",
                          "--request-timeout", "60", "--header", f"Authorization: Bearer {API_KEY}"],
                         capture_output=True, text=True, timeout=1800)
    summary = run.stdout[run.stdout.rfind("SUMMARY"):]
    print(summary)
    assert run.returncode == 0, summary
    generated = int(summary.split(" generated")[0].split()[-1])
    assert generated >= CASES
    wait_idle(server, timeout=60)


def test_a_thousand_disconnects_leak_no_kv_block(server: Server) -> None:
    body = {"model": server.model, "prompt": "disconnect", "max_tokens": 300, "stream": True, **IGNORE_EOS}
    before = server.metrics()
    key = 'slos_requests_total{endpoint="completions",outcome="disconnected"}'

    def cut(_: int) -> None:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            assert next(r.iter_lines()).startswith("data: ")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(cut, range(CASES)))
    m = wait_idle(server, timeout=120)
    assert m[key] - before.get(key, 0) >= CASES
    assert m["slos_gateway_open_requests"] == 0


def random_messages(rng: random.Random) -> Iterator[bytes]:
    """Garbage, and well-formed messages that make no sense where they land."""
    makers = [
        lambda: rng.randbytes(rng.randrange(0, 300)),
        lambda: bytes([1]) + rng.randbytes(rng.randrange(0, 64)),
        lambda: bytes([1]) + msgspec.msgpack.encode({"type": rng.choice(["Submit", "StepReport", "Nope"]),
                                                     "x": rng.random()}),
        lambda: encode(Abort(f"r{rng.randrange(10**6)}")),
        lambda: encode(Heartbeat(f"w{rng.randrange(10)}", rng.randrange(-10, 10**6))),
        lambda: encode(StepReport("decode-0", rng.randrange(10**6), 0.01, [], [f"r{rng.randrange(9)}"], 5)),
        lambda: encode(TokenChunk(f"r{rng.randrange(10**6)}", [rng.randrange(512)], "x", None, 0, 1)),
        lambda: encode(Lost(f"r{rng.randrange(10**6)}", "made up")),
        lambda: encode(KVFetch("r", [rng.randrange(10**6)])),
        lambda: encode(Submit(f"junk-{rng.randrange(10**9)}", rng.choice([[], [rng.randrange(10**6)] * 3]),
                              SamplingParams(max_tokens=rng.randrange(1, 4)), SLOSpec(), 0.0)),
    ]
    while True:
        yield rng.choice(makers)()


def test_a_thousand_random_messages_on_every_bus_socket(server: Server) -> None:
    """From inside the cluster (the secret read where `up`'s children got it), on the planner's
    intake and worker socket and the gateway's inbox: nothing dies, and requests are served."""
    pids = sorted(children(server.proc.pid))
    rng = random.Random(26)
    bus = Bus(cluster_secret(server))
    try:
        pushes = [bus.socket(zmq.PUSH, connect=a) for a in (server.intake_address, server.gateway_address)]
        dealer = bus.socket(zmq.DEALER, connect=server.planner_address, identity=b"decode-0")
        messages = random_messages(rng)
        for sock in [*pushes, dealer]:
            for _ in range(CASES):
                sock.send(next(messages))
        wait_idle(server, timeout=60)
    finally:
        bus.close()
    assert sorted(children(server.proc.pid)) == pids
    out = server.client().completions.create(model=server.model, prompt="still here", max_tokens=4,
                                             temperature=0, extra_body=IGNORE_EOS)
    assert out.usage.completion_tokens == 4
