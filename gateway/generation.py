"""One request's life at the gateway, written once: submitted, its chunks awaited (watching
for refusal, timeout and a client that goes away), streamed as SSE or gathered whole, and ended
exactly once: aborted at the planner if the worker has not finished it, released, counted."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Request

from gateway.errors import ApiError, ClientGone
from gateway.metrics import GatewayMetrics
from gateway.planner_link import PlannerLink
from gateway.protocol import usage
from shared.messages import QUEUE_FULL, Admitted, Parked, Refused, Submit, TokenChunk

DISCONNECT_POLL_S = 0.5


@dataclass
class Generation:
    """One request in flight at the gateway."""

    request_id: str
    endpoint: str  # chat or completions, for the metrics
    slo_class: str  # for the metrics: the request's class, or `default` as the planner counts it
    queue: asyncio.Queue
    prompt_tokens: int
    started: float
    deadline: float
    completion_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish_reason: str | None = None
    ended: bool = False
    promised: bool | None = None  # how the planner first admitted it: with its SLOs promised, or best effort
    decided: bool = False  # the planner has said what it does with it

    def headers(self) -> dict[str, str]:
        """What the client is told of the request: its id, and whether its SLOs were promised."""
        out = {"X-Request-Id": self.request_id}
        if self.promised is not None:
            out["X-SLO-Promised"] = "true" if self.promised else "false"
        return out

    def record(self, chunk: TokenChunk) -> None:
        now = time.monotonic()
        if chunk.token_ids:
            self.first_token_at = self.first_token_at or now
            self.last_token_at = now
            self.completion_tokens += len(chunk.token_ids)
        if chunk.num_prompt_tokens:
            self.prompt_tokens = chunk.num_prompt_tokens
        self.finish_reason = chunk.finish_reason or self.finish_reason

    def usage(self) -> dict[str, int]:
        return usage(self.prompt_tokens, self.completion_tokens)


class Generations:
    def __init__(self, link: PlannerLink, metrics: GatewayMetrics, timeout_s: float) -> None:
        self.link, self.metrics, self.timeout_s = link, metrics, timeout_s

    def turn_away(self, endpoint: str, has_objectives: bool, received: float) -> None:
        """Refuse a request with objectives here, at once, as the planner would, where its
        best-effort queue has no room left for it (`PlannerLink.queue_room`): under a burst the
        answer must not wait for a trip to the planner. A request without objectives waits as
        in any queue, with nothing to be late for."""
        if has_objectives and self.link.queue_room() == 0:
            self.metrics.verdict.labels("refused").observe(time.monotonic() - received)
            self.metrics.requests.labels(endpoint, "429").inc()
            raise ApiError(429, f"request refused: {QUEUE_FULL}", type_="rate_limit_error",
                           headers={"Retry-After": "1"})

    async def start(self, submit: Submit, endpoint: str, has_objectives: bool, received: float) -> Generation:
        """Open the request's queue and submit it, unless it is turned away (`turn_away`) now
        that its prompt is tokenized. `received`: when the gateway got it, which its latencies
        count from."""
        self.turn_away(endpoint, has_objectives, received)
        gen = Generation(submit.request_id, endpoint, submit.slo.slo_class or "default",
                         self.link.open(submit.request_id),
                         len(submit.prompt_token_ids), received, received + self.timeout_s)
        try:
            await self.link.submit(submit, has_objectives)
        except BaseException:  # whatever stops the submission must not leave its queue open
            self.link.release(submit.request_id)
            raise
        return gen

    async def next_chunk(self, gen: Generation, request: Request) -> TokenChunk:
        """The next token chunk; raises on refusal, timeout, failure or a client that went away."""
        while True:
            try:  # what is queued already is taken without a turn of the event loop
                event = gen.queue.get_nowait() if gen.queue.qsize() else await asyncio.wait_for(gen.queue.get(),
                                                                                               DISCONNECT_POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    raise ClientGone from None
                if time.monotonic() > gen.deadline:
                    raise ApiError(504, "the request timed out", type_="timeout_error") from None
                continue
            if isinstance(event, (Admitted, Parked, Refused)) and not gen.decided:
                gen.decided = True
                verdict = ("refused" if isinstance(event, Refused) else "parked" if isinstance(event, Parked)
                           else "promised" if event.promised else "best_effort")
                self.metrics.verdict.labels(verdict).observe(time.monotonic() - gen.started)
            if isinstance(event, Admitted):
                gen.promised = event.promised if gen.promised is None else gen.promised
                continue
            if isinstance(event, Refused):
                raise ApiError(429, f"request refused: {event.reason}", type_="rate_limit_error",
                               headers={"Retry-After": str(max(1, round(event.retry_after_s)))})
            if isinstance(event, TokenChunk):
                gen.record(event)
                if event.finish_reason in ("error", "abort"):
                    raise ApiError(500, "the request failed on a worker", type_="server_error")
                return event

    def finish(self, gen: Generation, outcome: str) -> None:
        """End the request once, however it ended (`outcome`: an HTTP status or `disconnected`)."""
        if gen.ended:
            return
        gen.ended = True
        if gen.finish_reason is None:
            self.link.abort(gen.request_id, f"ended at the gateway ({outcome})")
        self.link.release(gen.request_id)
        m = self.metrics
        m.requests.labels(gen.endpoint, outcome).inc()
        m.tokens.inc(gen.completion_tokens)
        if gen.first_token_at is not None:
            m.ttft.labels(gen.slo_class).observe(gen.first_token_at - gen.started)
            if gen.completion_tokens > 1 and gen.last_token_at is not None:
                decoding = gen.last_token_at - gen.first_token_at
                m.tpot.labels(gen.slo_class).observe(decoding / (gen.completion_tokens - 1))

    async def first(self, gen: Generation, request: Request) -> TokenChunk | None:
        """The first chunk, before any response is sent; None if the client went away."""
        try:
            return await self.next_chunk(gen, request)
        except ClientGone:
            self.finish(gen, "disconnected")
            return None
        except ApiError as err:
            self.finish(gen, str(err.status))
            raise

    async def text(self, gen: Generation, first: TokenChunk, request: Request) -> str | None:
        """The whole output, for a response that is not streamed; None if the client went away."""
        texts, outcome = [first.text], "disconnected"
        try:
            while gen.finish_reason is None:
                texts.append((await self.next_chunk(gen, request)).text)
            outcome = "200"
        except ClientGone:
            return None
        except ApiError as err:
            outcome = str(err.status)
            raise
        finally:
            self.finish(gen, outcome)
        return "".join(texts)

    async def sse(self, gen: Generation, first: TokenChunk, request: Request,
                  event: Callable[[str, str | None, bool], dict], continuous_usage: bool,
                  final_usage: dict | None) -> AsyncIterator[str]:
        """Server-sent events: `event(text, finish, first)` builds each chunk's object; with
        `continuous_usage` every chunk carries the usage so far, and `final_usage` (the last
        chunk's object less its usage) closes the stream with the totals."""

        def line(text: str, finish: str | None, is_first: bool = False) -> str:
            obj = event(text, finish, is_first)
            if continuous_usage:
                obj["usage"] = gen.usage()
            return f"data: {json.dumps(obj)}\n\n"

        outcome = "disconnected"
        try:
            yield line(first.text, None, True)
            while gen.finish_reason is None:
                chunk = await self.next_chunk(gen, request)
                if chunk.text or (continuous_usage and chunk.token_ids):
                    yield line(chunk.text, None)
            yield line("", gen.finish_reason)
            if final_usage is not None:
                yield f"data: {json.dumps({**final_usage, 'usage': gen.usage()})}\n\n"
            yield "data: [DONE]\n\n"
            outcome = "200"
        except ApiError as err:
            outcome = str(err.status)
            yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.type}})}\n\n"
            yield "data: [DONE]\n\n"
        except ClientGone:
            pass
        finally:
            self.finish(gen, outcome)
