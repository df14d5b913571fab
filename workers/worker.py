"""A worker: receives batch orders from the planner, runs them on the engine, streams tokens
straight to the gateway and reports progress and free KV blocks to the planner.

One loop serves every role. A prefill worker holds each request whose prompt it finished (and
whose first token it streamed) and reports it as an export; a decode worker takes exported
requests over by reading their KV blocks from the prefill worker; a colocated worker does both
halves itself and moves no KV. The planner may change a worker's role with any order (falling
back to colocated when a pool is lost, or moving a worker between the pools); a worker that
starts moving KV then opens its transport. When the planner restarts, a worker drops what it
holds (the gateway sends it all again) and says hello to the new one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from engine.engine import Engine, RequestOutput, StepResult
from engine.kv_transfer import KVTransferError, KVTransport, make_transport
from engine.speculative import Speculator
from shared.bus import Bus, DropCounter, own_host
from shared.messages import (
    BatchOrder,
    ExportedRequest,
    Heartbeat,
    RequestProgress,
    Role,
    StepReport,
    TokenChunk,
    WorkerHello,
    encode,
)
from shared.settings import Settings

if TYPE_CHECKING:
    from engine.vllm_engine import VLLMEngine

log = logging.getLogger(__name__)


@dataclass
class Step:
    result: StepResult
    exports: list[ExportedRequest] = field(default_factory=list)
    failed_imports: list[str] = field(default_factory=list)


@dataclass
class OrderWait:
    """How long orders keep the worker waiting while its requests go on: the time from a
    report to the next order, counted when that order continues a request the report left
    unfinished. It is the planner's turnaround and the bus's latency on the critical path; a
    wait for new work is not counted."""

    reported_at: float = 0.0
    going_on: frozenset[str] = frozenset()

    def reported(self, step: Step, at: float) -> None:
        exported = {e.request_id for e in step.exports}
        self.going_on = frozenset(o.request_id for o in step.result.outputs
                                  if o.finish_reason is None and o.request_id not in exported)
        self.reported_at = at

    def waited(self, order: BatchOrder, at: float) -> float:
        ordered = {*order.decode, *(c.request_id for c in order.prefill)}
        return at - self.reported_at if not self.going_on.isdisjoint(ordered) else 0.0


def run_order(engine: Engine, order: BatchOrder, role: Role, transport: KVTransport | None) -> Step:
    """Take over the order's imports, run the step, and export what a prefill worker finished.
    If the engine fails, end every request in the order with an error instead of taking the
    worker down."""
    failed = []
    for export in order.kv_imports:
        try:
            if transport is None:
                raise KVTransferError("this worker has no KV transport")
            engine.import_request(export, transport)
        except Exception as exc:  # a dead source or a bad record must not stop the worker
            log.error("request %s: KV import from %s failed: %s", export.request_id, export.source.name, exc)
            failed.append(export.request_id)
    order.decode = [rid for rid in order.decode if rid not in failed]
    if transport is not None:
        for rid in order.aborts:  # the step frees their blocks
            transport.withdraw(rid)
    try:
        result = engine.step(order)
    except Exception:
        log.exception("step %d failed; ending its requests with an error", order.step_id)
        rids = {r.request_id for r in order.new_requests} | {c.request_id for c in order.prefill}
        rids |= set(order.decode)
        for rid in rids:
            engine.abort(rid)
        return Step(StepResult([RequestOutput(rid, [], "", 0, 0, 0, "error") for rid in sorted(rids)], [], 0.0),
                    failed_imports=failed)
    exports = []
    if role == "prefill" and transport is not None:
        exports = [engine.export(o.request_id, transport.endpoint) for o in result.outputs
                   if o.finish_reason is None and o.new_token_ids]
        for export in exports:
            transport.offer(export.request_id, export.blocks)
    return Step(result, exports, failed)


def messages_for(worker_id: str, order: BatchOrder, step: Step, free: int,
                 waited_s: float = 0.0) -> tuple[list[TokenChunk], StepReport]:
    chunks = [
        TokenChunk(o.request_id, o.new_token_ids, o.text, o.finish_reason, o.num_prompt_tokens,
                   o.num_output_tokens - len(o.new_token_ids))
        for o in step.result.outputs
        if o.new_token_ids or o.text or o.finish_reason
    ]
    report = StepReport(
        worker_id=worker_id,
        step_id=order.step_id,
        duration_s=step.result.duration_s,
        progress=[
            RequestProgress(o.request_id, o.num_computed_tokens, o.num_output_tokens, o.finish_reason,
                            o.num_proposed, o.num_accepted)
            for o in step.result.outputs
        ],
        out_of_blocks=step.result.out_of_blocks,
        free_blocks=free,
        exports=step.exports,
        failed_imports=step.failed_imports,
        waited_s=waited_s,
    )
    return chunks, report


def heartbeat(bus: Bus, settings: Settings, worker_id: str, engine: Engine, stop: threading.Event) -> None:
    """Beat from a thread of its own, so a long step does not make the worker look dead."""
    sock = bus.socket(zmq.PUSH, connect=settings.planner_intake_address)
    while not stop.wait(settings.heartbeat_s):
        sock.send(encode(Heartbeat(worker_id, engine.num_free_blocks)))
    sock.close()


def make_engine(settings: Settings, speculator: Speculator) -> Engine | VLLMEngine:
    """The engine `settings.engine` names; vLLM's is imported only when asked for."""
    if settings.engine == "vllm":
        from engine.vllm_engine import VLLMEngine

        return VLLMEngine(settings.model_dir, device=settings.device, dtype=settings.dtype,
                          block_size=settings.block_size, kv_cache_mb=settings.kv_cache_mb,
                          max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
                          speculator=speculator)
    return Engine(
        settings.model_dir,
        device=settings.device,
        dtype=None if settings.dtype == "auto" else getattr(torch, settings.dtype),
        block_size=settings.block_size,
        kv_cache_mb=settings.kv_cache_mb,
        max_model_len=settings.max_model_len,
        speculator=speculator,
        draft_dir=settings.draft_model_dir,
    )


def serve(settings: Settings, worker_id: str, role: Role, stop: threading.Event) -> None:
    """Load the engine, say hello, then execute orders until `stop` is set."""
    speculator = "none" if role == "prefill" else settings.speculator  # the draft lives where decoding is
    engine = make_engine(settings, speculator)
    bus = Bus(settings.bus_secret())

    def open_transport() -> KVTransport:
        return make_transport(settings.kv_transport, worker_id, engine.kv_segments, bus, own_host(settings.kv_host))

    transport = open_transport() if role != "colocated" else None
    planner = bus.socket(zmq.DEALER, connect=settings.planner_address, identity=worker_id.encode())
    handshakes = planner.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    gateway = bus.socket(zmq.PUSH, connect=settings.gateway_address)
    drops = DropCounter()

    def hello() -> None:
        planner.send(encode(WorkerHello(worker_id, role, engine.num_blocks,
                                        engine.block_size, engine.max_model_len, os.getpid(),
                                        speculator, transport.endpoint if transport else None)))

    hello()
    log.info("worker %s up: %s engine, role %s, %d KV blocks", worker_id, settings.engine, role, engine.num_blocks)
    beat = threading.Thread(target=heartbeat, args=(bus, settings, worker_id, engine, stop), daemon=True)
    beat.start()
    poller = zmq.Poller()
    poller.register(planner, zmq.POLLIN)
    poller.register(handshakes, zmq.POLLIN)
    connections = 0
    wait = OrderWait()
    try:
        while not stop.is_set():
            ready = dict(poller.poll(timeout=int(settings.heartbeat_s * 1000)))
            if handshakes in ready:
                recv_monitor_message(handshakes)
                connections += 1
                if connections > 1:  # a new planner, which knows nothing of us or of what we hold
                    log.warning("worker %s: the planner restarted; dropping %d requests and saying hello again",
                                worker_id, len(engine.seqs))
                    for rid in list(engine.seqs):
                        if transport is not None:
                            transport.withdraw(rid)
                        engine.abort(rid)
                    hello()
            if planner not in ready:
                continue
            msg = drops.accept(planner.recv(), "planner")
            if isinstance(msg, BatchOrder):
                waited = wait.waited(msg, time.perf_counter())
                if msg.role is not None and msg.role != role:
                    log.info("worker %s: role %s -> %s", worker_id, role, msg.role)
                    role = msg.role
                    if role != "colocated" and transport is None:
                        transport = open_transport()
                step = run_order(engine, msg, role, transport)
                chunks, report = messages_for(worker_id, msg, step, engine.num_free_blocks, waited)
                for chunk in chunks:
                    gateway.send(encode(chunk))
                planner.send(encode(report))
                wait.reported(step, time.perf_counter())
            elif msg is not None:
                log.warning("ignored unexpected %s", type(msg).__name__)
    finally:
        stop.set()
        beat.join()
        planner.disable_monitor()
        handshakes.close()
        if transport is not None:
            transport.close()
        bus.close()
