"""A `slos-serve up` process for the end-to-end tests, and what they ask of it: prompts streamed
all at once, and their greedy texts from one engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from openai.types import Completion, CompletionChoice, CompletionUsage
from openai.types.chat import ChatCompletionChunk

from engine.engine import Engine
from shared.bus import free_tcp_port
from shared.messages import BatchOrder, NewRequest, PrefillChunk, SamplingParams

API_KEY = "test-key"
ADMIN_TOKEN = "test-admin-token"
IGNORE_EOS = {"ignore_eos": True}
PROMPTS = [f"request {i}: " + "the planner schedules the workers " * (1 + i % 4) for i in range(8)]

# The openai client's response models finish building on first use, and two threads doing that
# at once can fail inside pydantic; tests stream from many threads, so build them here, once.
for _model in (Completion, CompletionChoice, CompletionUsage, ChatCompletionChunk):
    _model.model_rebuild()


@dataclass
class Server:
    url: str
    model: str
    proc: subprocess.Popen
    intake_address: str
    gateway_address: str
    planner_address: str
    admin_url: str

    def stop(self) -> int:
        """Ctrl-C, as an operator stops it: its exit code once every process has ended."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=20)

    def admin(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        return httpx.request(method, self.admin_url + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                             **kwargs)  # type: ignore[arg-type]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics").text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def worker_pid(server: Server, worker_id: str) -> int:
    for pid in children(server.proc.pid):
        if f"--worker-id\0{worker_id}\0" in Path(f"/proc/{pid}/cmdline").read_text():
            return pid
    raise AssertionError(f"no process for {worker_id}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def start(model: Path, tmp: Path, workers: int, extra: tuple[str, ...] = (),
          env_extra: dict[str, str] | None = None, attempts: int = 3) -> Server:
    """`up` on free ports, healthy with every worker joined. A port found free can be taken by
    another test's connection before `up` binds it: then `up` exits, and it starts again on
    other ports."""
    for _ in range(attempts):
        server = _launch(model, tmp, workers, extra, env_extra)
        if server is not None:
            return server
    raise AssertionError(f"the ports were taken {attempts} times:\n" + (tmp / "server.log").read_text())


def _launch(model: Path, tmp: Path, workers: int, extra: tuple[str, ...],
            env_extra: dict[str, str] | None) -> Server | None:
    port, admin_port = free_tcp_port(), free_tcp_port()
    intake, gateway, planner = (f"ipc://{tmp}/{name}.sock" for name in ("intake", "gateway", "planner"))
    env = {**os.environ, "SLOS_API_KEY": API_KEY, "SLOS_PLANNER_INTAKE_ADDRESS": intake,
           "SLOS_GATEWAY_ADDRESS": gateway, "SLOS_PLANNER_ADDRESS": planner, "SLOS_REQUEST_TIMEOUT_S": "60",
           "SLOS_ADMIN_PORT": str(admin_port),
           "SLOS_ADMIN_TOKEN": ADMIN_TOKEN, **(env_extra or {})}
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "slos_serve.cli", "up", "--model", str(model), "--port", str(port),
         "--workers", str(workers), "--kv-cache-mb", "8", *extra],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    server = Server(url, model.name, proc, intake, gateway, planner, f"http://127.0.0.1:{admin_port}/admin")
    flags = dict(zip(extra[::2], extra[1::2]))
    expected = int(flags.get("--workers", workers))
    if flags.get("--mode") == "disaggregated":
        expected = int(flags.get("--prefill", 1)) + int(flags.get("--decode", 1))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # healthy, and every worker has joined
        if proc.poll() is not None:
            text = (tmp / "server.log").read_text()
            assert "address already in use" in text, text
            return None
        try:
            if httpx.get(url + "/health").status_code == 200:
                alive = sum(v for k, v in server.metrics().items() if k.startswith("slos_worker_alive"))
                if alive >= expected:
                    return server
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("server not ready:\n" + (tmp / "server.log").read_text())


def cluster_secret(server: Server) -> str:
    """The secret `up` made, read where its children got it: their environment, never a command line."""
    secrets = set()
    for kid in children(server.proc.pid):
        environ = Path(f"/proc/{kid}/environ").read_bytes().split(b"\0")
        secret = next(e for e in environ if e.startswith(b"SLOS_CLUSTER_SECRET=")).partition(b"=")[2]
        assert secret not in Path(f"/proc/{kid}/cmdline").read_bytes()
        secrets.add(secret.decode())
    assert len(secrets) == 1
    return secrets.pop()


def wait_idle(server: Server, timeout: float = 10.0, min_generated: float = 0) -> dict[str, float]:
    """Metrics once nothing runs and every KV block is free again. The planner's status comes
    every 0.2 s, so a burst shorter than that can look idle on the status from before it:
    `min_generated` waits for a status that counts the burst's tokens."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        free = sum(v for k, v in m.items() if k.startswith("slos_worker_kv_blocks_free"))
        total = sum(v for k, v in m.items() if k.startswith("slos_worker_kv_blocks_total"))
        fresh = m["slos_worker_generated_tokens_total"] >= min_generated
        if fresh and m["slos_requests_running"] == 0 and m["slos_gateway_open_requests"] == 0 and free == total > 0:
            return m
        assert time.monotonic() < deadline, f"not idle: running {m['slos_requests_running']}, {free}/{total} free"
        time.sleep(0.2)




def generate(engine: Engine, prompt: str, params: SamplingParams) -> tuple[list[int], str]:
    """The reference: one engine running one request alone to the end; its tokens and text."""
    ids = engine.tokenizer(prompt)["input_ids"]
    out = engine.step(BatchOrder(0, [NewRequest("ref", ids, params)], [PrefillChunk("ref", len(ids))])).outputs[0]
    tokens, text = list(out.new_token_ids), out.text
    while not out.finish_reason:
        out = engine.step(BatchOrder(1, decode=["ref"])).outputs[0]
        tokens += out.new_token_ids
        text += out.text
    return tokens, text


def greedy_texts(model: Path, prompts: list[str], max_tokens: int) -> list[str]:
    """Each prompt's greedy text (EOS ignored) from one engine running it alone."""
    engine = Engine(model, kv_cache_mb=8)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [generate(engine, prompt, params)[1] for prompt in prompts]


def kill_mid_stream(server: Server, victim: str, max_tokens: int, timeout_s: float) -> list[str]:
    """Stream every prompt, SIGKILL the worker `victim` once every stream is under way, and
    return the texts the streams ended with."""
    pid = worker_pid(server, victim)
    killed = threading.Barrier(len(PROMPTS) + 1)
    with ThreadPoolExecutor(1) as pool:
        texts = pool.submit(stream_all, server, max_tokens, killed)
        killed.wait(timeout_s)
        os.kill(pid, signal.SIGKILL)
        return texts.result(timeout=timeout_s)


def stream_all(server: Server, max_tokens: int, started: threading.Barrier | None = None) -> list[str]:
    client = server.client()

    def one(i: int) -> str:
        text, tokens = "", 0
        for chunk in client.completions.create(model=server.model, prompt=PROMPTS[i], max_tokens=max_tokens,
                                               temperature=0, stream=True, extra_body=IGNORE_EOS):
            text += chunk.choices[0].text
            tokens += 1
            if started is not None and tokens == 3:
                started.wait(30)
        return text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, range(len(PROMPTS))))
