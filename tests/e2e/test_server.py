"""`slos-serve up` in a subprocess, spoken to with the `openai` client, httpx and raw ZeroMQ."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
import zmq
from transformers import AutoTokenizer, LlamaForCausalLM

from server_process import API_KEY, IGNORE_EOS, Server, alive, children, cluster_secret, start, wait_idle
from shared.bus import Bus
from shared.messages import WorkerHello, encode

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serial")]


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start(tiny_model, tmp_path_factory.mktemp("server"), workers=2)
    yield srv
    srv.stop()


def test_openai_client_streams_chat_and_completion(server: Server) -> None:
    client = server.client()
    messages = [{"role": "user", "content": "Tell me about queues."}]
    stream = client.chat.completions.create(model=server.model, messages=messages, max_tokens=12,
                                            temperature=0, stream=True, extra_body=IGNORE_EOS,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    whole = client.chat.completions.create(model=server.model, messages=messages, max_tokens=12,
                                           temperature=0, extra_body=IGNORE_EOS)
    assert whole.choices[0].message.content == streamed
    assert whole.usage.completion_tokens == 12

    text = "".join(c.choices[0].text for c in client.completions.create(
        model=server.model, prompt="Once upon a time", max_tokens=9, temperature=0, stream=True,
        extra_body=IGNORE_EOS))
    whole = client.completions.create(model=server.model, prompt="Once upon a time", max_tokens=9,
                                      temperature=0, extra_body=IGNORE_EOS)
    assert whole.choices[0].text == text and whole.usage.completion_tokens == 9


def test_greedy_text_matches_transformers(server: Server, tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    hf = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    prompt = tokenizer("Return a list of the lines in the file.")["input_ids"]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(16):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    expected = tokenizer.decode(ids[len(prompt):], skip_special_tokens=True)
    got = server.client().completions.create(model=server.model, prompt=prompt, max_tokens=16,
                                             temperature=0, extra_body=IGNORE_EOS)
    assert got.choices[0].text == expected


def test_sixteen_concurrent_streams_complete(server: Server) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, str | None]:
        stream = await client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": f"Question {i}: " + "why? " * i}],
            max_tokens=20, stream=True, stream_options={"include_usage": True}, seed=i,
            extra_body=IGNORE_EOS)
        tokens, finish = 0, None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return tokens, finish

    async def main() -> list[tuple[int, str | None]]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
        return await asyncio.gather(*(one(client, i) for i in range(16)))

    before = server.metrics()
    assert asyncio.run(main()) == [(20, "length")] * 16
    wait_idle(server, min_generated=before["slos_worker_generated_tokens_total"] + 16 * 20)
    after = server.metrics()
    for counter in ("slos_worker_busy_seconds_total", "slos_worker_waited_seconds_total"):  # the steps, the waits between
        name = next(k for k in after if k.startswith(counter))
        assert after[name] > before.get(name, 0.0), counter


def test_sse_framing(server: Server) -> None:
    body = {"model": server.model, "prompt": "abc", "max_tokens": 5, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ") and "\n" not in event
        assert json.loads(event[6:])["object"] == "text_completion"


BAD_REQUESTS = [
    ("malformed json", "/v1/chat/completions", b'{"model": "x", "messages": [', 400),
    ("wrong type", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                             "max_tokens": "many"}, 400),
    ("negative max_tokens", "/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400),
    ("huge max_tokens", "/v1/completions", {"prompt": "hi", "max_tokens": 10**9}, 400),
    ("prompt too long", "/v1/completions", {"prompt": list(range(10, 500)) * 2, "max_tokens": 1}, 400),
    ("token id out of range", "/v1/completions", {"prompt": [10**7], "max_tokens": 1}, 400),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400),
    ("n > 1", "/v1/completions", {"prompt": "hi", "n": 2}, 400),
    ("temperature out of range", "/v1/completions", {"prompt": "hi", "temperature": 7}, 400),
    ("unknown slo class", "/v1/completions", {"prompt": "hi", "slo_class": "gold"}, 400),
    ("negative ttft", "/v1/completions", {"prompt": "hi", "ttft_ms": -5}, 400),
    ("empty slo_task", "/v1/completions", {"prompt": "hi", "slo_task": ""}, 400),
    ("slo_task too long", "/v1/completions", {"prompt": "hi", "slo_task": "t" * 129}, 400),
    ("slo_task not a string", "/v1/completions", {"prompt": "hi", "slo_task": 7}, 400),
    ("slo_unmeetable unknown", "/v1/completions", {"prompt": "hi", "slo_unmeetable": "maybe"}, 400),
    ("body is a list", "/v1/completions", [1, 2], 400),
]


@pytest.mark.parametrize("case,path,body,status", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_gets_an_openai_error(server: Server, case: str, path: str, body: object, status: int) -> None:
    if isinstance(body, dict):
        body.setdefault("model", server.model)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]


def test_bad_slo_header_and_server_keeps_serving(server: Server) -> None:
    r = httpx.post(server.url + "/v1/completions", json={"model": server.model, "prompt": "hi"},
                   headers={"Authorization": f"Bearer {API_KEY}", "x-slo-tpot-ms": "fast"})
    assert r.status_code == 400 and "x-slo-tpot-ms" in r.json()["error"]["message"]
    ok = server.client().completions.create(model=server.model, prompt="still there?", max_tokens=3,
                                            extra_headers={"x-slo-ttft-ms": "5000"}, extra_body=IGNORE_EOS)
    assert ok.usage.completion_tokens == 3


def test_api_key_is_required(server: Server) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert [m.id for m in server.client().models.list()] == [server.model]


def test_disconnect_mid_stream_frees_every_kv_block(server: Server) -> None:
    """The aborted requests stop early: far fewer tokens are generated than were asked for."""
    body = {"model": server.model, "prompt": "long story", "max_tokens": 480, "stream": True,
            "ignore_eos": True}
    generated = wait_idle(server)["slos_worker_generated_tokens_total"]
    for _ in range(3):
        with httpx.stream("POST", server.url + "/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    m = wait_idle(server)
    assert m['slos_requests_total{endpoint="completions",outcome="disconnected"}'] >= 3
    assert m["slos_worker_generated_tokens_total"] - generated < 3 * 480 / 2


def dropped(server: Server) -> tuple[float, float]:
    m = server.metrics()
    return m['slos_dropped_messages{process="gateway"}'], m['slos_dropped_messages{process="planner"}']


def test_nothing_from_outside_the_cluster_reaches_the_bus(server: Server) -> None:
    """A process without the secret sends garbage to the planner and the gateway, and a
    worker's hello claiming a million KV blocks: none of it arrives."""
    before = dropped(server)
    ctx = zmq.Context()
    try:
        forged = ctx.socket(zmq.DEALER)
        forged.setsockopt(zmq.IDENTITY, b"forged")
        forged.connect(server.planner_address)
        forged.send(encode(WorkerHello("forged", "colocated", 1_000_000, 16, 2048, os.getpid())))
        pushes = [ctx.socket(zmq.PUSH) for _ in range(2)]
        for sock, address in zip(pushes, (server.intake_address, server.gateway_address)):
            sock.connect(address)
            for junk in (b"\x01\xff\xfe", os.urandom(64)):
                sock.send(junk)
        time.sleep(2)
        assert dropped(server) == before
        assert "forged" not in [w["worker_id"] for w in server.admin("GET", "/workers").json()]
    finally:
        ctx.destroy(linger=0)


def test_garbage_from_inside_the_cluster_is_dropped_and_counted(server: Server) -> None:
    before = dropped(server)
    bus = Bus(cluster_secret(server))
    try:
        socks = [bus.socket(zmq.PUSH, connect=a) for a in (server.intake_address, server.gateway_address)]
        for sock in socks:  # kept open until the counts are in: closing drops what is not sent yet
            for junk in (b"", b"\x01\xff\xfe", b"GET / HTTP/1.1\r\n\r\n", os.urandom(64)):
                sock.send(junk)
        deadline = time.monotonic() + 5
        while not all(now >= then + 4 for now, then in zip(dropped(server), before)):
            assert time.monotonic() < deadline, (before, dropped(server))
            time.sleep(0.2)
    finally:
        bus.close()
    ok = server.client().completions.create(model=server.model, prompt="hi", max_tokens=2, extra_body=IGNORE_EOS)
    assert ok.usage.completion_tokens == 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_stopping_up_leaves_no_orphans(tiny_model: Path, tmp_path: Path, sig: signal.Signals) -> None:
    srv = start(tiny_model, tmp_path, workers=1)
    kids = children(srv.proc.pid)
    assert len(kids) == 3
    srv.proc.send_signal(sig)
    code = srv.proc.wait(timeout=20)
    if sig == signal.SIGINT:
        assert code == 0
    deadline = time.monotonic() + 10
    while any(alive(k) for k in kids):
        assert time.monotonic() < deadline, [k for k in kids if alive(k)]
        time.sleep(0.2)


def test_admin_api_has_its_own_token_and_explains_verdicts(server: Server) -> None:
    assert httpx.get(server.admin_url + "/workers", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 401
    workers = server.admin("GET", "/workers").json()
    assert sorted(w["worker_id"] for w in workers) == ["worker-0", "worker-1"]
    assert all(w["alive"] and w["role"] == "colocated" for w in workers)
    done = server.client().completions.create(model=server.model, prompt="admin", max_tokens=4, temperature=0,
                                              extra_body={**IGNORE_EOS, "slo_class": "chatbot"})
    verdict = server.admin("GET", f"/requests/{done.id}").json()["verdict"]
    assert verdict.startswith("admitted to worker worker-")
    assert server.admin("GET", "/policy").json()["policy"] == "slos"


def test_a_ttft_no_worker_could_keep_is_refused_at_once_unless_best_effort_is_asked(server: Server) -> None:
    """A first token due 1 ms after a 200-token prompt arrives can come from no worker here: 429
    at once with the reason, or served without a promise when `slo_unmeetable` asks for that."""
    client = server.client()
    for _ in range(6):  # enough steps for the workers to be known
        client.completions.create(model=server.model, prompt="warm up", max_tokens=4, temperature=0,
                                  extra_body=IGNORE_EOS)
    prompt = [7] * 200
    refused = 'slos_verdict_seconds_count{verdict="refused"}'
    before = server.metrics().get(refused, 0.0)
    with pytest.raises(openai.RateLimitError, match="to prefill on a worker here alone"):
        client.completions.create(model=server.model, prompt=prompt, max_tokens=2, extra_body={"ttft_ms": 1})
    assert server.metrics()[refused] == before + 1  # how long the gateway waited for the planner's word
    done = client.completions.create(model=server.model, prompt=prompt, max_tokens=2, temperature=0,
                                     extra_body={**IGNORE_EOS, "ttft_ms": 1, "slo_unmeetable": "best_effort"})
    assert done.usage.completion_tokens == 2
    assert server.admin("GET", f"/requests/{done.id}").json()["verdict"].endswith("as best effort")


def test_calls_of_a_task_are_served_and_explained(server: Server) -> None:
    """`slo_task` names an agent's task; its calls are admitted like any other while it is on time."""
    for i in range(2):
        done = server.client().completions.create(model=server.model, prompt=f"call {i}", max_tokens=3, temperature=0,
                                                  extra_body={**IGNORE_EOS, "slo_class": "tool_calling",
                                                              "slo_task": "agent-7"})
        assert done.usage.completion_tokens == 3
        assert server.admin("GET", f"/requests/{done.id}").json()["verdict"].startswith("admitted to worker")

