"""Live load: a workload sent to a running server over its OpenAI API, each request at its
time, judged by its client-side token times with the simulator's judge.

Prompts are token ids (so each has exactly its length), outputs run to their length with
EOS ignored, and every streamed chunk carries the usage so far (vLLM's
`continuous_usage_stats`), so the client knows how many tokens each chunk brought. The
objectives go in the body and, where headers can carry them, as `x-slo-*` headers too. Our
gateway says in a header whether it promised the request's SLOs (`X-SLO-Promised`); other
servers leave `promised` unknown. A 429 is
a refusal; the next call of a tool loop goes out its think time after the previous one ends,
and never if that one was refused or failed (it counts as missed); after a call that missed
its objectives the loop goes on, but its later calls count as missed too.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Callable

import numpy as np
import openai

from bench.workloads import Arrival, Outcome, judge_loops
from shared.slo import SLOClass, Tracker, resolve

Seen = Callable[[Outcome], None]


def prompt_ids(a: Arrival, vocab: int) -> list[int]:
    """The request's prompt: token ids drawn from its id, the same every time it is sent."""
    return np.random.default_rng(zlib.crc32(a.request_id.encode())).integers(10, vocab, a.prompt_tokens).tolist()


def slo_fields(a: Arrival) -> dict[str, object]:
    """The request body's fields beyond OpenAI's: its objectives, and EOS ignored."""
    extra: dict[str, object] = {"ignore_eos": True, "slo_class": a.slo_class}
    if a.ttft_ms is not None:
        extra["ttft_ms"] = a.ttft_ms
    if a.tpot_ms is not None:
        extra["tpot_ms"] = a.tpot_ms
    if a.stages:
        extra["slo_stages"] = [{"tokens": s.tokens, "tpot_ms": s.tpot_ms} for s in a.stages]
    if a.task is not None:
        extra["slo_task"] = a.task
    return extra


async def _request(client: openai.AsyncOpenAI, model: str, a: Arrival, vocab: int, classes: dict[str, SLOClass],
                   out: list[Outcome], seen: Seen) -> None:
    prompt, extra = prompt_ids(a, vocab), slo_fields(a)
    headers = {h: f"{v:g}" for h, v in (("x-slo-ttft-ms", a.ttft_ms), ("x-slo-tpot-ms", a.tpot_ms)) if v is not None}
    tracker = Tracker(resolve(a.slo_spec(), classes), time.monotonic())
    refused = finished = False
    promised: bool | None = None
    verdict_s: float | None = None
    try:
        response = await client.completions.with_raw_response.create(
            model=model, prompt=prompt, max_tokens=a.output_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body=extra,
            extra_headers=headers)
        verdict_s = time.monotonic() - tracker.arrival
        if "x-slo-promised" in response.headers:
            promised = response.headers["x-slo-promised"] == "true"
        async for chunk in response.parse():
            if chunk.usage is not None and chunk.usage.completion_tokens > tracker.tokens:
                tracker.add(chunk.usage.completion_tokens - tracker.tokens, time.monotonic())
            finished = finished or any(c.finish_reason for c in chunk.choices)
    except openai.RateLimitError:
        refused, verdict_s = True, time.monotonic() - tracker.arrival
    except openai.APIError:
        pass
    out.append(Outcome(a.request_id, a.slo_class, tracker.arrival, a.prompt_tokens, tracker.tokens, refused,
                       finished, finished and tracker.met(), tracker.ttft_s, tracker.stage_tpots_s(), promised,
                       verdict_s))
    seen(out[-1])
    if a.then is not None and finished:
        await asyncio.sleep(a.then.at)
        await _request(client, model, a.then, vocab, classes, out, seen)


async def _run(client: openai.AsyncOpenAI, model: str, arrivals: list[Arrival], vocab: int,
               classes: dict[str, SLOClass], seen: Seen) -> list[Outcome]:
    out: list[Outcome] = []
    start = time.monotonic()

    async def at_its_time(a: Arrival) -> None:
        await asyncio.sleep(max(0.0, start + a.at - time.monotonic()))
        await _request(client, model, a, vocab, classes, out, seen)

    await asyncio.gather(*(at_its_time(a) for a in arrivals))
    return judge_loops(out, arrivals)


def run_live(base_url: str, api_key: str, model: str, arrivals: list[Arrival], vocab: int,
             classes: dict[str, SLOClass], timeout_s: float = 600.0, seen: Seen = lambda outcome: None
             ) -> list[Outcome]:
    """Send the workload and wait for every request (and its follow-ups) to end, telling
    `seen` of each as it ends."""

    async def main() -> list[Outcome]:
        async with openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s) as client:
            return await _run(client, model, arrivals, vocab, classes, seen)

    return asyncio.run(main())
