"""deploy/docker-compose.yml run as compose would run it, without a Docker engine: every
service's command with that service's environment, each replica in a network namespace of its
own with its own host name, joined by a bridge, names resolved through `/etc/netns/NAME/hosts`
as compose's DNS would. Two prefill and two decode replicas serve streams end to end with the
KV crossing the bridge (NIXL over UCX's TCP transport, or ZeroMQ); then one decode replica's
processes are killed mid-stream and every stream still completes with its exact tokens."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from server_process import IGNORE_EOS, greedy_texts

COMPOSE = Path(__file__).parents[2] / "deploy" / "docker-compose.yml"
SECRETS = {"SLOS_API_KEY": "cluster-key", "SLOS_ADMIN_TOKEN": "cluster-admin",
           "SLOS_CLUSTER_SECRET": "compose-test-cluster-secret", "GRAFANA_PASSWORD": "unused"}
TAG = f"c{os.getpid() % 100000}"
SUBNET = "10.78.0"
BRIDGE, HOST = f"{TAG}br", f"{SUBNET}.1"
SERVED = ("planner", "gateway", "prefill", "decode")  # compose's other services run images of others
REPLICAS = {"planner": 1, "gateway": 1, "prefill": 2, "decode": 2}
PROMPTS = [f"stream {i}: " + "the cluster serves every request " * (1 + i % 3) for i in range(8)]


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${NAME}`, `${NAME:-default}` and `${NAME:?error}`."""
    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""
    return re.sub(r"\$\{(\w+)(:[?-])?([^}]*)\}", one, value)


def test_interpolation_requires_the_secrets() -> None:
    service = yaml.safe_load(COMPOSE.read_text())["services"]["gateway"]
    with pytest.raises(KeyError, match="SLOS_API_KEY"):
        interpolate(service["environment"]["SLOS_API_KEY"], {})
    assert interpolate("${A:-x}/${B}", {"B": "y"}) == "x/y"


def test_compose_file_wires_every_role() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in SERVED:
        env = services[name]["environment"]
        assert services[name]["command"][0] in ("planner", "gateway", "worker")
        assert env["SLOS_PLANNER_ADDRESS"] == "tcp://planner:5555" and env["SLOS_GATEWAY_ADDRESS"] == "tcp://gateway:5557"
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published)  # loopback unless told otherwise
    assert not any(p.split(":")[1] in ("5555", "5556", "5557") for p in published)  # the bus stays inside
    assert services["prometheus"]["volumes"][0].startswith("./prometheus/")


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose is not installed")
def test_docker_compose_validates_the_file() -> None:
    run = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True,
                         text=True, env={**os.environ, **SECRETS})
    assert run.returncode == 0, run.stderr
    run = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True,
                         text=True, env={k: v for k, v in os.environ.items() if k not in SECRETS})
    assert run.returncode != 0 and "SLOS_ADMIN_TOKEN" in run.stderr + run.stdout


@dataclass
class Replica:
    service: str
    hostname: str
    namespace: str
    address: str


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def network() -> Iterator[list[Replica]]:
    """A bridge on this host (which plays the Docker host and the client) and a namespace per replica."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    replicas = [Replica(s, f"{s}{i + 1}" if REPLICAS[s] > 1 else s, f"{TAG}{s[:3]}{i}", f"{SUBNET}.{10 + k}")
                for k, (s, i) in enumerate((s, i) for s in SERVED for i in range(REPLICAS[s]))]
    try:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot create a bridge here: {exc}")
    hosts = "127.0.0.1 localhost\n" + "".join(f"{r.address} {r.hostname}\n" for r in replicas)
    hosts += "".join(f"{r.address} {r.service}\n" for r in replicas if REPLICAS[r.service] == 1)
    try:
        sh("ip", "addr", "add", f"{HOST}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for i, r in enumerate(replicas):
            outside, inside = f"{TAG}h{i}", f"{TAG}n{i}"
            sh("ip", "netns", "add", r.namespace)
            Path(f"/etc/netns/{r.namespace}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{r.namespace}/hosts").write_text(hosts)
            sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            sh("ip", "link", "set", inside, "netns", r.namespace)
            sh("ip", "link", "set", outside, "master", BRIDGE)
            sh("ip", "link", "set", outside, "up")
            for cmd in (("addr", "add", f"{r.address}/24", "dev", inside), ("link", "set", inside, "up"),
                        ("link", "set", "lo", "up")):
                sh("ip", "netns", "exec", r.namespace, "ip", *cmd)
        yield replicas
    finally:
        for r in replicas:
            subprocess.run(["ip", "netns", "del", r.namespace], capture_output=True)
            shutil.rmtree(f"/etc/netns/{r.namespace}", ignore_errors=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


def kill_namespace(namespace: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def start(replica: Replica, service: dict, env: dict[str, str], log: Path) -> subprocess.Popen:
    """The service's command in the replica's namespace, under its own host name (a UTS
    namespace), with the service's environment: as the image's `slos-serve` entrypoint would."""
    command = [sys.executable, "-m", "slos_serve.cli", *service["command"]]
    return subprocess.Popen(
        ["ip", "netns", "exec", replica.namespace, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
         replica.hostname, *command],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def counter(url: str, name: str, at_least: float, timeout: float = 10.0) -> float:
    """The gateway's counter once it reaches `at_least` (its cluster counters follow the
    planner's status, a few times a second), or its value at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        lines = httpx.get(url + "/metrics").text.splitlines()
        value = next(float(line.split()[1]) for line in lines if line.startswith(name + " "))
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.xdist_group("serial")
@pytest.mark.parametrize("transport", ["nixl", "zmq"])
def test_compose_cluster_in_namespaces(network: list[Replica], tiny_model: Path, tmp_path: Path,
                                       transport: str) -> None:
    if transport == "nixl":
        pytest.importorskip("nixl._api")
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    # What the image and the test change: the model (the tiny one, in place of the cached
    # default), the KV transport under test, one thread per worker, and UCX kept to TCP so
    # NIXL's reads cross the bridge rather than shared memory between processes of one host.
    overrides = {"SLOS_MODEL_DIR": str(tiny_model), "SLOS_KV_TRANSPORT": transport, "SLOS_KV_CACHE_MB": "16",
                 "SLOS_THREADS_PER_WORKER": "1", "UCX_TLS": "tcp"}
    procs = []
    try:
        for r in network:
            env = {k: interpolate(str(v), SECRETS) for k, v in services[r.service]["environment"].items()}
            procs.append(start(r, services[r.service], {**os.environ, **env, **overrides},
                               tmp_path / f"{r.hostname}.log"))
        gateway = next(r for r in network if r.service == "gateway")
        url = f"http://{gateway.address}:8000"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/health").json().get("workers_alive") == 4:
                    break
            except (httpx.TransportError, ValueError):
                pass
            assert time.monotonic() < deadline, "".join(p.read_text()[-1500:] for p in tmp_path.glob("*.log"))
            time.sleep(0.3)
        assert httpx.get(url + "/v1/models").status_code == 401  # the API key is required
        client = openai.OpenAI(base_url=url + "/v1", api_key=SECRETS["SLOS_API_KEY"], max_retries=0, timeout=120)
        max_tokens = 200
        expected = greedy_texts(tiny_model, PROMPTS, max_tokens)
        decoding = threading.Barrier(len(PROMPTS) + 1)

        def stream(i: int, barrier: threading.Barrier | None = None) -> str:
            text = ""
            for n, chunk in enumerate(client.completions.create(
                    model=tiny_model.name, prompt=PROMPTS[i], max_tokens=max_tokens, temperature=0, stream=True,
                    extra_body=IGNORE_EOS)):
                text += chunk.choices[0].text
                if barrier is not None and n == 3:
                    barrier.wait(60)
            return text

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            assert list(pool.map(stream, range(len(PROMPTS)))) == expected
        # The KV crossed the bridge (not for every request: the planner may turn a prefill
        # replica into a decode one, which then decodes what it prefilled).
        assert counter(url, "slos_kv_handovers_total", len(PROMPTS)) >= 1
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            texts = pool.map(stream, range(len(PROMPTS)), [decoding] * len(PROMPTS))
            decoding.wait(60)  # every stream is under way
            kill_namespace(next(r for r in network if r.service == "decode").namespace)
            assert list(texts) == expected
        assert counter(url, "slos_requests_resubmitted_total", 1) >= 1  # the killed replica held streams
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for r in network:
            kill_namespace(r.namespace)
