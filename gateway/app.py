"""The OpenAI-compatible HTTP API: validation, auth, SLO extraction, SSE streaming.

Every request is checked before it reaches the planner (model name, types, context length,
SLO class), so the planner only sees work it can run. A client that goes away has its request
aborted, which frees its KV blocks on the worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import AutoTokenizer

from gateway.metrics import GatewayMetrics
from gateway.planner_link import PlannerLink
from gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    _Common,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    now_s,
    usage,
)
from shared.messages import Refused, SLOSpec, Submit, TokenChunk
from shared.model_info import context_window
from shared.settings import Settings

log = logging.getLogger(__name__)

SLO_HEADERS = {"ttft_ms": "x-slo-ttft-ms", "tpot_ms": "x-slo-tpot-ms"}
DISCONNECT_POLL_S = 0.5


class ApiError(Exception):
    """An error the client caused or must know about, rendered as an OpenAI error body."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_response(err: ApiError) -> JSONResponse:
    body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


class ClientGone(Exception):
    pass


@dataclass
class Generation:
    """One request in flight at the gateway."""

    request_id: str
    queue: asyncio.Queue
    prompt_tokens: int
    started: float
    completion_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish_reason: str | None = None
    pending: list[TokenChunk] = field(default_factory=list)

    def record(self, chunk: TokenChunk) -> None:
        now = time.monotonic()
        if chunk.token_ids:
            self.first_token_at = self.first_token_at or now
            self.last_token_at = now
            self.completion_tokens += len(chunk.token_ids)
        if chunk.num_prompt_tokens:
            self.prompt_tokens = chunk.num_prompt_tokens
        self.finish_reason = chunk.finish_reason or self.finish_reason


def create_app(settings: Settings) -> FastAPI:
    if settings.model_dir is None:
        raise ValueError("the gateway needs settings.model_dir")
    tokenizer = AutoTokenizer.from_pretrained(str(settings.model_dir))
    max_len = context_window(settings.model_dir, settings.max_model_len)
    model_name = settings.served_model_name or settings.model_dir.name
    link = PlannerLink(settings.planner_intake_address, settings.gateway_address)
    metrics = GatewayMetrics(link)
    created = now_s()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        link.start()
        yield
        await link.close()

    app = FastAPI(title="slos-serve", lifespan=lifespan)
    app.state.link = link

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"{'.'.join(loc) + ': ' if loc else ''}{first.get('msg', 'invalid request')}"
        return error_response(ApiError(400, message, param=".".join(loc) or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(exc.status_code, str(exc.detail), type_="not_found_error"
                                       if exc.status_code == 404 else "invalid_request_error"))

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token, settings.api_key):
            raise ApiError(401, "invalid or missing API key", type_="authentication_error",
                           code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != model_name:
            raise ApiError(404, f"the model `{name}` does not exist; this server serves `{model_name}`",
                           param="model", code="model_not_found")

    def slo_spec(body: _Common, request: Request) -> SLOSpec:
        values: dict[str, float | None] = {}
        for name, header in SLO_HEADERS.items():
            raw = request.headers.get(header)
            values[name] = getattr(body, name)
            if raw is not None and values[name] is None:
                try:
                    values[name] = float(raw)
                except ValueError:
                    raise ApiError(400, f"header {header} must be a number of milliseconds") from None
                if values[name] <= 0:
                    raise ApiError(400, f"header {header} must be positive")
        if body.slo_class is not None and body.slo_class not in settings.slo_classes:
            known = ", ".join(sorted(settings.slo_classes))
            raise ApiError(400, f"unknown slo_class `{body.slo_class}`; known: {known}", param="slo_class")
        stages = [s.stage() for s in body.slo_stages or []]
        return SLOSpec(body.slo_class, values["ttft_ms"], values["tpot_ms"], stages, body.slo_task)

    def output_budget(prompt_len: int, requested: int | None) -> int:
        room = max_len - prompt_len
        if room < 1 or (requested is not None and requested > room):
            asked = prompt_len + (requested or 1)
            raise ApiError(400, f"this model's maximum context length is {max_len} tokens; the "
                                f"request needs {asked} ({prompt_len} in the prompt)",
                           param="max_tokens" if room >= 1 else "messages",
                           code="context_length_exceeded")
        return requested if requested is not None else room

    async def next_chunk(gen: Generation, request: Request, deadline: float) -> TokenChunk:
        """The next token chunk; raises on refusal, timeout or a client that went away."""
        while True:
            try:
                event = await asyncio.wait_for(gen.queue.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    raise ClientGone from None
                if time.monotonic() > deadline:
                    raise ApiError(504, "the request timed out", type_="timeout_error") from None
                continue
            if isinstance(event, Refused):
                raise ApiError(429, f"request refused: {event.reason}", type_="rate_limit_error",
                               headers={"Retry-After": str(max(1, round(event.retry_after_s)))})
            if isinstance(event, TokenChunk):
                gen.record(event)
                if event.finish_reason in ("error", "abort"):
                    raise ApiError(500, "the request failed on a worker", type_="server_error")
                return event

    async def start(body: _Common, request: Request, prompt_ids: list[int], prefix: str) -> Generation:
        max_tokens = output_budget(len(prompt_ids), body.max_tokens)
        submit = Submit(
            request_id=f"{prefix}-{uuid.uuid4().hex}",
            prompt_token_ids=prompt_ids,
            params=body.sampling(max_tokens),
            slo=slo_spec(body, request),
            arrival_time=time.time(),
        )
        gen = Generation(submit.request_id, link.open(submit.request_id), len(prompt_ids),
                         time.monotonic())
        await link.submit(submit)
        return gen

    def finish_metrics(gen: Generation, endpoint: str, outcome: str) -> None:
        metrics.requests.labels(endpoint, outcome).inc()
        metrics.tokens.inc(gen.completion_tokens)
        if gen.first_token_at is not None:
            metrics.ttft.observe(gen.first_token_at - gen.started)
            if gen.completion_tokens > 1 and gen.last_token_at is not None:
                metrics.tpot.observe((gen.last_token_at - gen.first_token_at) / (gen.completion_tokens - 1))

    async def respond(body: _Common, request: Request, prompt_ids: list[int], chat: bool):
        endpoint = "chat" if chat else "completions"
        gen = await start(body, request, prompt_ids, "chatcmpl" if chat else "cmpl")
        deadline = gen.started + settings.request_timeout_s
        try:
            first = await next_chunk(gen, request, deadline)
        except ClientGone:
            finish_metrics(gen, endpoint, "disconnected")
            link.abort(gen.request_id, "client disconnected before the first token")
            link.release(gen.request_id)
            return PlainTextResponse("", status_code=499)
        except ApiError as err:
            finish_metrics(gen, endpoint, str(err.status))
            link.abort(gen.request_id, err.message)
            link.release(gen.request_id)
            raise
        if body.stream:
            return StreamingResponse(stream(gen, first, body, request, chat, endpoint),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": gen.request_id})
        texts = [first.text]
        try:
            while gen.finish_reason is None:
                texts.append((await next_chunk(gen, request, deadline)).text)
        except ClientGone:
            finish_metrics(gen, endpoint, "disconnected")
            link.abort(gen.request_id, "client disconnected")
            return PlainTextResponse("", status_code=499)
        except ApiError as err:
            finish_metrics(gen, endpoint, str(err.status))
            link.abort(gen.request_id, err.message)
            raise
        finally:
            link.release(gen.request_id)
        finish_metrics(gen, endpoint, "200")
        build = chat_response if chat else completion_response
        return build(gen.request_id, body.model, now_s(), "".join(texts), gen.finish_reason,
                     usage(gen.prompt_tokens, gen.completion_tokens))

    async def stream(gen: Generation, first: TokenChunk, body: _Common, request: Request, chat: bool,
                     endpoint: str) -> AsyncIterator[str]:
        ts = now_s()

        def event(text: str, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
                obj = chat_chunk(gen.request_id, body.model, ts, delta, finish)
            else:
                obj = completion_chunk(gen.request_id, body.model, ts, text, finish)
            if body.continuous_usage:
                obj["usage"] = usage(gen.prompt_tokens, gen.completion_tokens)
            return f"data: {json.dumps(obj)}\n\n"

        deadline = gen.started + settings.request_timeout_s
        outcome = "disconnected"
        try:
            chunk = first
            yield event(chunk.text, None, role=True) if chat else event(chunk.text, None)
            while gen.finish_reason is None:
                chunk = await next_chunk(gen, request, deadline)
                if chunk.text or (body.continuous_usage and chunk.token_ids):
                    yield event(chunk.text, None)
            yield event("", gen.finish_reason)
            if body.include_usage:
                use = {"id": gen.request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                       "created": ts, "model": body.model, "choices": [],
                       "usage": usage(gen.prompt_tokens, gen.completion_tokens)}
                yield f"data: {json.dumps(use)}\n\n"
            yield "data: [DONE]\n\n"
            outcome = "200"
        except ApiError as err:
            outcome = str(err.status)
            yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.type}})}\n\n"
            yield "data: [DONE]\n\n"
        except ClientGone:
            pass
        finally:
            if gen.finish_reason is None:
                link.abort(gen.request_id, f"stream ended ({outcome})")
            link.release(gen.request_id)
            finish_metrics(gen, endpoint, outcome)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return await respond(body, request, ids, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        if isinstance(body.prompt, str):
            ids = tokenizer(body.prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = list(body.prompt)
            if any(not 0 <= t < len(tokenizer) for t in ids):
                raise ApiError(400, f"prompt token ids must be in [0, {len(tokenizer)})", param="prompt")
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", param="prompt")
        return await respond(body, request, ids, chat=False)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "slos-serve",
             "max_model_len": max_len}
        ]}

    @app.get("/health")
    async def health() -> JSONResponse:
        status = link.status
        workers = sum(w.alive for w in status.workers) if status else 0
        ok = link.healthy()
        return JSONResponse({"status": "ok" if ok else "unavailable", "workers_alive": workers},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
