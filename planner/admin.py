"""The planner's admin API: what the cluster is doing, and the operator's levers.

FastAPI on a port of its own, every route behind a bearer token that is not the gateway's API
key. It runs in a thread of the planner process and never touches planner state: each route
sends a command (`planner.control`) into the planner's loop and renders the reply.

    GET  /admin/workers                      workers, roles, KV blocks, requests held, and how their
                                             steps run against the profile (calibration factors)
    POST /admin/workers/{id}/drain|undrain   stop (or resume) giving a worker new requests
    PUT  /admin/workers/{id}/role            {"role": "prefill"}: its home role from now on
    GET  /admin/queues                       waiting, parked and running requests
    GET  /admin/slo                          SLO attainment and speculative acceptance per class
    GET  /admin/policy, PUT /admin/policy    {"policy": "slos"}: the scheduling policy
    PUT  /admin/mode                         {"mode": "colocated"}: colocated or disaggregated
    GET  /admin/requests/{id}                the latest verdict: admitted where, parked or refused and why
"""

from __future__ import annotations

import secrets
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from planner.control import (
    Command,
    CommandQueue,
    Explain,
    SetDraining,
    SetMode,
    SetPolicy,
    SetRole,
    ShowPolicy,
    ShowQueues,
    ShowSLO,
    ShowWorkers,
)


class PolicyChange(BaseModel):
    policy: Literal["slos", "fcfs", "sarathi", "distserve", "edf"]


class ModeChange(BaseModel):
    mode: Literal["colocated", "disaggregated"]


class RoleChange(BaseModel):
    role: Literal["colocated", "prefill", "decode"]


def create_admin_app(commands: CommandQueue, token: str) -> FastAPI:
    app = FastAPI(title="slos-serve admin", docs_url=None, redoc_url=None)

    def authorize(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given, token):
            raise HTTPException(401, "invalid or missing admin token")

    @app.exception_handler(HTTPException)
    async def _error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": {"message": exc.detail, "code": exc.status_code}}, status_code=exc.status_code)

    def ask(command: Command) -> Any:
        """Run on FastAPI's thread pool: waiting for the loop blocks no other route."""
        reply = commands.ask(command)
        if reply.status != 200:
            raise HTTPException(reply.status, reply.body)
        return reply.body

    auth = [Depends(authorize)]

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness, unauthenticated: the admin API answers, so the planner's loop started it."""
        return {"status": "ok"}

    @app.get("/admin/workers", dependencies=auth)
    def workers() -> list[dict]:
        return ask(ShowWorkers())

    @app.post("/admin/workers/{worker_id}/drain", dependencies=auth)
    def drain(worker_id: str) -> dict:
        return ask(SetDraining(worker_id, True))

    @app.post("/admin/workers/{worker_id}/undrain", dependencies=auth)
    def undrain(worker_id: str) -> dict:
        return ask(SetDraining(worker_id, False))

    @app.put("/admin/workers/{worker_id}/role", dependencies=auth)
    def set_role(worker_id: str, change: RoleChange) -> dict:
        return ask(SetRole(worker_id, change.role))

    @app.get("/admin/queues", dependencies=auth)
    def queues() -> dict:
        return ask(ShowQueues())

    @app.get("/admin/slo", dependencies=auth)
    def slo() -> dict:
        return ask(ShowSLO())

    @app.get("/admin/policy", dependencies=auth)
    def get_policy() -> dict:
        return ask(ShowPolicy())

    @app.put("/admin/policy", dependencies=auth)
    def set_policy(change: PolicyChange) -> dict:
        return ask(SetPolicy(change.policy))

    @app.put("/admin/mode", dependencies=auth)
    def set_mode(change: ModeChange) -> dict:
        return ask(SetMode(change.mode))

    @app.get("/admin/requests/{request_id}", dependencies=auth)
    def explain(request_id: str) -> dict:
        return ask(Explain(request_id))

    return app
