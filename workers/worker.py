"""A worker: receives batch orders from the planner, runs them on the engine, streams tokens
straight to the gateway and reports progress and free KV blocks to the planner."""

from __future__ import annotations

import logging
import os
import threading

import torch
import zmq

from engine.runner import Engine, RequestOutput, StepResult
from shared.bus import DropCounter, make_socket
from shared.messages import (
    BatchOrder,
    Heartbeat,
    RequestProgress,
    Role,
    StepReport,
    TokenChunk,
    WorkerHello,
    encode,
)
from shared.settings import Settings

log = logging.getLogger(__name__)


def run_order(engine: Engine, order: BatchOrder) -> StepResult:
    """Run one order; if the engine fails, end every request in it with an error instead of
    taking the worker down."""
    try:
        return engine.step(order)
    except Exception:
        log.exception("step %d failed; ending its requests with an error", order.step_id)
        rids = {r.request_id for r in order.new_requests} | {c.request_id for c in order.prefill}
        rids |= set(order.decode)
        for rid in rids:
            engine.abort(rid)
        return StepResult(
            [RequestOutput(rid, [], "", 0, 0, 0, "error") for rid in sorted(rids)], [], 0.0
        )


def messages_for(
    worker_id: str, order: BatchOrder, result: StepResult, free: int
) -> tuple[list[TokenChunk], StepReport]:
    chunks = [
        TokenChunk(o.request_id, o.new_token_ids, o.text, o.finish_reason, o.num_prompt_tokens)
        for o in result.outputs
        if o.new_token_ids or o.text or o.finish_reason
    ]
    report = StepReport(
        worker_id=worker_id,
        step_id=order.step_id,
        duration_s=result.duration_s,
        progress=[
            RequestProgress(o.request_id, o.num_computed_tokens, o.num_output_tokens, o.finish_reason,
                            o.num_proposed, o.num_accepted)
            for o in result.outputs
        ],
        out_of_blocks=result.out_of_blocks,
        free_blocks=free,
    )
    return chunks, report


def heartbeat(ctx: zmq.Context, settings: Settings, worker_id: str, engine: Engine,
              stop: threading.Event) -> None:
    """Beat from a thread of its own, so a long step does not make the worker look dead."""
    sock = make_socket(ctx, zmq.PUSH, connect=settings.planner_intake_address)
    while not stop.wait(settings.heartbeat_s):
        sock.send(encode(Heartbeat(worker_id, engine.num_free_blocks)))
    sock.close()


def serve(settings: Settings, worker_id: str, role: Role, stop: threading.Event) -> None:
    """Load the engine, say hello, then execute orders until `stop` is set."""
    engine = Engine(
        settings.model_dir,
        device=settings.device,
        dtype=None if settings.dtype == "auto" else getattr(torch, settings.dtype),
        block_size=settings.block_size,
        kv_cache_mb=settings.kv_cache_mb,
        max_model_len=settings.max_model_len,
        speculator=settings.speculator,
        draft_dir=settings.draft_model_dir,
    )
    ctx = zmq.Context()
    planner = make_socket(ctx, zmq.DEALER, connect=settings.planner_address, identity=worker_id.encode())
    gateway = make_socket(ctx, zmq.PUSH, connect=settings.gateway_address)
    drops = DropCounter()
    planner.send(encode(WorkerHello(worker_id, role, engine.kv.allocator.num_blocks,
                                    engine.kv.block_size, engine.max_model_len, os.getpid(),
                                    settings.speculator)))
    log.info("worker %s up: role %s, %d KV blocks", worker_id, role, engine.kv.allocator.num_blocks)
    beat = threading.Thread(target=heartbeat, args=(ctx, settings, worker_id, engine, stop), daemon=True)
    beat.start()
    try:
        while not stop.is_set():
            if not planner.poll(timeout=int(settings.heartbeat_s * 1000)):
                continue
            msg = drops.accept(planner.recv(), "planner")
            if isinstance(msg, BatchOrder):
                result = run_order(engine, msg)
                chunks, report = messages_for(worker_id, msg, result, engine.num_free_blocks)
                for chunk in chunks:
                    gateway.send(encode(chunk))
                planner.send(encode(report))
            elif msg is not None:
                log.warning("ignored unexpected %s", type(msg).__name__)
    finally:
        stop.set()
        beat.join()
        ctx.destroy(linger=0)
