"""The OpenAI-compatible HTTP API: validation, auth, SLO extraction, SSE streaming.

Every request is checked before it reaches the planner (model name, types, context length,
SLO class), so the planner only sees work it can run. A client that goes away has its request
aborted, which frees its KV blocks on the worker (`gateway.generation`).
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from transformers import AutoTokenizer

from gateway.errors import ApiError, install_error_handlers
from gateway.generation import Generations
from gateway.limits import BodyLimit
from gateway.metrics import GatewayMetrics
from gateway.planner_link import PlannerLink
from gateway.protocol import (
    MAX_OBJECTIVE_MS,
    ChatCompletionRequest,
    CompletionRequest,
    _Common,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    now_s,
)
from shared.messages import SLOSpec, Submit
from shared.model_info import context_window
from shared.settings import Settings
from shared.slo import resolve, with_default_class

SLO_HEADERS = {"ttft_ms": "x-slo-ttft-ms", "tpot_ms": "x-slo-tpot-ms"}


class Checks:
    """What a request must pass before it is submitted: the API key, the model's name, its SLO
    fields and headers, and the context window."""

    def __init__(self, settings: Settings, model_name: str, max_len: int) -> None:
        self.settings, self.model_name, self.max_len = settings, model_name, max_len
        self.classes = settings.classes()

    def has_objectives(self, spec: SLOSpec) -> bool:
        """Whether the planner will hold the request to objectives, as it resolves them."""
        return resolve(with_default_class(spec, self.settings.default_slo_class), self.classes).has_objectives()

    def authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token, key):
            raise ApiError(401, "invalid or missing API key", type_="authentication_error", code="invalid_api_key")

    def model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"the model `{name}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    def slo_spec(self, body: _Common, request: Request) -> SLOSpec:
        values: dict[str, float | None] = {}
        for name, header in SLO_HEADERS.items():
            raw = request.headers.get(header)
            values[name] = getattr(body, name)
            if raw is not None and values[name] is None:
                try:
                    values[name] = float(raw)
                except ValueError:
                    raise ApiError(400, f"header {header} must be a number of milliseconds") from None
                if not 0 < values[name] <= MAX_OBJECTIVE_MS:  # nan fails this too
                    raise ApiError(400, f"header {header} must be in (0, {MAX_OBJECTIVE_MS:.0f}] milliseconds")
        classes = self.settings.slo_classes
        if body.slo_class is not None and body.slo_class not in classes:
            raise ApiError(400, f"unknown slo_class `{body.slo_class}`; known: {', '.join(sorted(classes))}",
                           param="slo_class")
        stages = [s.stage() for s in body.slo_stages or []]
        return SLOSpec(body.slo_class, values["ttft_ms"], values["tpot_ms"], stages, body.slo_task,
                       body.slo_unmeetable == "best_effort")

    def output_budget(self, prompt_len: int, requested: int | None) -> int:
        room = self.max_len - prompt_len
        if room < 1 or (requested is not None and requested > room):
            asked = prompt_len + (requested or 1)
            raise ApiError(400, f"this model's maximum context length is {self.max_len} tokens; the "
                                f"request needs {asked} ({prompt_len} in the prompt)",
                           param="max_tokens" if room >= 1 else "messages", code="context_length_exceeded")
        return requested if requested is not None else room


def create_app(settings: Settings) -> FastAPI:
    if settings.model_dir is None:
        raise ValueError("the gateway needs settings.model_dir")
    tokenizer = AutoTokenizer.from_pretrained(str(settings.model_dir))
    max_len = context_window(settings.model_dir, settings.max_model_len)
    model_name = settings.served_model_name or settings.model_dir.name
    link = PlannerLink(settings.planner_intake_address, settings.gateway_address, settings.bus_secret(),
                       settings.bus_bind_host)
    metrics = GatewayMetrics(link)
    generations = Generations(link, metrics, settings.request_timeout_s)
    checks = Checks(settings, model_name, max_len)
    created = now_s()

    tokenizing = threading.Lock()  # the fast tokenizer resets its state each call: one call at a time

    def encode(text: str) -> list[int]:
        """Run in a thread: a long prompt takes the tokenizer a while, and streams must not wait."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ApiError(400, f"the text is not valid Unicode ({exc.reason} at character {exc.start})",
                           param="messages") from None
        with tokenizing:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        link.start()
        yield
        await link.close()

    app = FastAPI(title="slos-serve", lifespan=lifespan)
    app.state.link = link
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    install_error_handlers(app)

    def admissible(body: _Common, request: Request, endpoint: str) -> tuple[SLOSpec, float]:
        """The request's SLOs and when it came, once it is known not to be refused at once:
        a request the planner's queue has no room for is answered before its prompt is
        tokenized, the costly part of a request that goes no further."""
        received = time.monotonic()
        checks.model(body.model)
        slo = checks.slo_spec(body, request)
        generations.turn_away(endpoint, checks.has_objectives(slo), received)
        return slo, received

    async def respond(body: _Common, request: Request, prompt_ids: list[int], slo: SLOSpec, received: float,
                      chat: bool):
        submit = Submit(request_id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", prompt_token_ids=prompt_ids,
                        params=body.sampling(checks.output_budget(len(prompt_ids), body.max_tokens)),
                        slo=slo, arrival_time=time.time())
        gen = await generations.start(submit, "chat" if chat else "completions", checks.has_objectives(slo), received)
        first = await generations.first(gen, request)
        if first is None:
            return PlainTextResponse("", status_code=499)
        rid, ts = gen.request_id, now_s()
        if body.stream:
            def event(text: str, finish: str | None, is_first: bool) -> dict:
                if not chat:
                    return completion_chunk(rid, body.model, ts, text, finish)
                delta = {"role": "assistant", "content": text} if is_first else ({"content": text} if text else {})
                return chat_chunk(rid, body.model, ts, delta, finish)

            final = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": ts,
                     "model": body.model, "choices": []} if body.include_usage else None
            return StreamingResponse(generations.sse(gen, first, request, event, body.continuous_usage, final),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", **gen.headers()})
        text = await generations.text(gen, first, request)
        if text is None:
            return PlainTextResponse("", status_code=499)
        build = chat_response if chat else completion_response
        return JSONResponse(build(rid, body.model, now_s(), text, gen.finish_reason, gen.usage()), headers=gen.headers())

    @app.post("/v1/chat/completions", dependencies=[Depends(checks.authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        slo, received = admissible(body, request, "chat")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = await run_in_threadpool(encode, prompt)
        return await respond(body, request, ids, slo, received, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(checks.authorize)])
    async def completions(body: CompletionRequest, request: Request):
        slo, received = admissible(body, request, "completions")
        if isinstance(body.prompt, str):
            ids = await run_in_threadpool(encode, body.prompt)
        else:
            ids = list(body.prompt)
            if any(not 0 <= t < len(tokenizer) for t in ids):
                raise ApiError(400, f"prompt token ids must be in [0, {len(tokenizer)})", param="prompt")
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", param="prompt")
        return await respond(body, request, ids, slo, received, chat=False)

    @app.get("/v1/models", dependencies=[Depends(checks.authorize)])
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
