"""The planner's admin API: what the cluster is doing, and the operator's levers.

FastAPI on a port of its own, every route behind a bearer token that is not the gateway's API
key. It runs in a thread of the planner process and touches the planner only while holding
the lock the planner's loop holds for each round of messages and scheduling.

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
import threading
from collections.abc import Callable
from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from planner.policies import POLICY_NAMES, Policy
from planner.service import Planner
from planner.state import WorkerState
from shared.messages import Role


class PolicyChange(BaseModel):
    policy: Literal["slos", "fcfs", "sarathi", "distserve", "edf"]


class ModeChange(BaseModel):
    mode: Literal["colocated", "disaggregated"]


class RoleChange(BaseModel):
    role: Literal["colocated", "prefill", "decode"]


def create_admin_app(planner: Planner, lock: threading.Lock, token: str,
                     make_policy: Callable[[str], Policy]) -> FastAPI:
    app = FastAPI(title="slos-serve admin", docs_url=None, redoc_url=None)

    def authorize(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given, token):
            raise HTTPException(401, "invalid or missing admin token")

    @app.exception_handler(HTTPException)
    async def _error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": {"message": exc.detail, "code": exc.status_code}}, status_code=exc.status_code)

    def worker_or_404(worker_id: str) -> WorkerState:
        worker = planner.state.workers.get(worker_id)
        if worker is None:
            raise HTTPException(404, f"no worker {worker_id}")
        return worker

    @app.get("/admin/workers", dependencies=[Depends(authorize)])
    def workers() -> list[dict]:
        with lock:
            return [{"worker_id": w.worker_id, "role": w.role, "home_role": w.home_role, "target_role": w.target_role,
                     "alive": w.alive, "draining": w.draining, "speculator": w.speculator,
                     "block_size": w.block_size, "max_model_len": w.max_model_len, "kv_blocks": w.num_blocks,
                     "kv_blocks_reserved": w.reserved_blocks, "kv_blocks_free": w.reported_free_blocks,
                     "step_fit": {"fixed": w.fit.fixed, "work": w.fit.work, "error": w.fit.error},
                     "requests": list(w.requests)}
                    for w in planner.state.workers.values()]

    @app.post("/admin/workers/{worker_id}/drain", dependencies=[Depends(authorize)])
    def drain(worker_id: str) -> dict:
        with lock:
            worker_or_404(worker_id).draining = True
            return {"worker_id": worker_id, "draining": True}

    @app.post("/admin/workers/{worker_id}/undrain", dependencies=[Depends(authorize)])
    def undrain(worker_id: str) -> dict:
        with lock:
            worker_or_404(worker_id).draining = False
            return {"worker_id": worker_id, "draining": False}

    @app.put("/admin/workers/{worker_id}/role", dependencies=[Depends(authorize)])
    def set_role(worker_id: str, change: RoleChange) -> dict:
        with lock:
            worker = worker_or_404(worker_id)
            role: Role = change.role
            worker.home_role = role
            planner.move(worker, role)
            return {"worker_id": worker_id, "role": worker.role, "target_role": worker.target_role}

    @app.get("/admin/queues", dependencies=[Depends(authorize)])
    def queues() -> dict:
        with lock:
            reqs = planner.state.requests.values()
            return {"waiting": [r for r in planner.state.waiting if not planner.state.requests[r].parked],
                    "parked": [r.request_id for r in reqs if r.parked and r.worker_id is None],
                    "running": {w.worker_id: list(w.requests) for w in planner.state.workers.values()}}

    @app.get("/admin/slo", dependencies=[Depends(authorize)])
    def slo() -> dict:
        with lock:
            return {"attainment": {k: {"met": a.met, "total": a.total, "share": a.met / a.total if a.total else None}
                                   for k, a in planner.state.attainment.items()},
                    "speculation": {k: {"proposed": c.proposed, "accepted": c.accepted, "steps": c.steps}
                                    for k, c in planner.state.speculation.items()},
                    "preemptions": planner.preemptions}

    @app.get("/admin/policy", dependencies=[Depends(authorize)])
    def get_policy() -> dict:
        with lock:
            return {"policy": planner.policy.name, "mode": planner.state.mode, "policies": list(POLICY_NAMES)}

    @app.put("/admin/policy", dependencies=[Depends(authorize)])
    def set_policy(change: PolicyChange) -> dict:
        with lock:
            roles = {w.role for w in planner.state.workers.values() if w.alive}
            if change.policy == "distserve" and not {"prefill", "decode"} <= roles:
                raise HTTPException(409, "distserve needs live prefill and decode workers")
            planner.policy = make_policy(change.policy)
            return {"policy": planner.policy.name}

    @app.put("/admin/mode", dependencies=[Depends(authorize)])
    def set_mode(change: ModeChange) -> dict:
        with lock:
            planner.state.mode = change.mode
            for worker in planner.state.workers.values():
                if worker.alive:
                    planner.move(worker, "colocated" if change.mode == "colocated" else worker.home_role or worker.role)
            return {"mode": change.mode}

    @app.get("/admin/requests/{request_id}", dependencies=[Depends(authorize)])
    def explain(request_id: str) -> dict:
        with lock:
            verdict = planner.explain(request_id)
        if verdict is None:
            raise HTTPException(404, f"no verdict on record for request {request_id}")
        return {"request_id": request_id, "verdict": verdict}

    return app
