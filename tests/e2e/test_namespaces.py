"""Planner and gateway on the host, a prefill and a decode worker each in a network namespace
of its own, joined by a bridge (all made here): requests are served end to end and the KV
crosses between the namespaces, so nothing depends on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server_process import ADMIN_TOKEN, API_KEY, IGNORE_EOS, Server, wait_idle
from shared.bus import free_tcp_port

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serial")]

TAG = f"s{os.getpid() % 100000}"
BRIDGE, HOST = f"{TAG}br", "10.77.0.1"
CLUSTER_SECRET = "namespaces-test-cluster-secret"
WORKERS = {"prefill-0": ("prefill", f"{TAG}a", "10.77.0.2"), "decode-0": ("decode", f"{TAG}b", "10.77.0.3")}


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def namespaces() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    try:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot create a bridge here: {exc}")
    try:
        sh("ip", "addr", "add", f"{HOST}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for i, (_, ns, addr) in enumerate(WORKERS.values()):
            host_end, ns_end = f"{TAG}h{i}", f"{TAG}n{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            sh("ip", "link", "set", ns_end, "netns", ns)
            sh("ip", "link", "set", host_end, "master", BRIDGE)
            sh("ip", "link", "set", host_end, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", ns_end)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_end, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield
    finally:
        for _, ns, _ in WORKERS.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


@pytest.mark.parametrize("transport", ["zmq", "nixl"])
def test_workers_in_their_own_namespaces(namespaces: None, tiny_model: Path, tmp_path: Path, transport: str) -> None:
    if transport == "nixl":
        pytest.importorskip("nixl._api")
    port, admin_port = free_tcp_port(), free_tcp_port()
    planner, intake, gateway = (f"tcp://{HOST}:{free_tcp_port(HOST)}" for _ in range(3))
    env = {**os.environ, "SLOS_MODEL_DIR": str(tiny_model), "SLOS_API_KEY": API_KEY, "SLOS_PORT": str(port),
           "SLOS_ADMIN_PORT": str(admin_port), "SLOS_ADMIN_TOKEN": ADMIN_TOKEN, "SLOS_CLUSTER_SECRET": CLUSTER_SECRET,
           "SLOS_MODE": "disaggregated", "SLOS_KV_TRANSPORT": transport, "SLOS_THREADS_PER_WORKER": "1",
           "SLOS_PLANNER_ADDRESS": planner, "SLOS_PLANNER_INTAKE_ADDRESS": intake, "SLOS_GATEWAY_ADDRESS": gateway}
    cli = [sys.executable, "-m", "slos_serve.cli"]
    log = open(tmp_path / "cluster.log", "w")
    procs = [subprocess.Popen([*cli, name], env=env, stdout=log, stderr=subprocess.STDOUT)
             for name in ("planner", "gateway")]
    for worker_id, (role, ns, addr) in WORKERS.items():
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, *cli, "worker", "--worker-id", worker_id, "--role", role,
             "--planner", planner],
            env={**env, "SLOS_KV_HOST": addr}, stdout=log, stderr=subprocess.STDOUT))
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(url + "/health").json()
                if health.get("workers_alive") == 2:
                    break
            except (httpx.TransportError, ValueError):
                pass
            assert time.monotonic() < deadline, (tmp_path / "cluster.log").read_text()[-3000:]
            time.sleep(0.3)
        server = Server(url, tiny_model.name, procs[0], intake, gateway, planner,
                        f"http://127.0.0.1:{admin_port}/admin")
        client = server.client()

        def one(i: int) -> str:
            out = client.completions.create(model=server.model, prompt=f"namespace {i} " * (i + 1),
                                            max_tokens=8, temperature=0, extra_body=IGNORE_EOS)
            return out.choices[0].text

        with ThreadPoolExecutor(6) as pool:
            texts = list(pool.map(one, range(6)))
        assert all(texts)
        assert wait_idle(server, timeout=30, min_generated=6 * 8)["slos_kv_handovers_total"] == 6
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
