"""The gateway's side of the bus: submissions and aborts go to the planner; verdicts, tokens
and cluster status come back on one PULL socket and are sorted into per-request queues."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from shared.bus import Bus, DropCounter, bind_address
from shared.messages import (
    Abort,
    Admitted,
    ClusterStatus,
    GatewayHello,
    Lost,
    Message,
    Parked,
    Refused,
    Submit,
    TokenChunk,
    encode,
)
from shared.resubmission import Resubmissions

log = logging.getLogger(__name__)

Event = Admitted | Parked | Refused | TokenChunk


@dataclass
class ChunkOrder:
    """Puts one request's token chunks in output order. A decode worker's first chunk may
    overtake the prefill worker's last one, as they travel on different connections; a chunk
    at a position already delivered is a duplicate and is dropped."""

    next_index: int = 0
    held: dict[int, TokenChunk] = field(default_factory=dict)
    delivered: list[int] = field(default_factory=list)  # token ids, in order

    def accept(self, chunk: TokenChunk) -> list[TokenChunk]:
        if not chunk.token_ids:  # an ending without tokens has no position to wait for
            return [chunk]
        if chunk.index < self.next_index:
            log.warning("request %s: dropped a duplicate chunk at %d", chunk.request_id, chunk.index)
            return []
        self.held[chunk.index] = chunk
        ready = []
        while self.next_index in self.held:
            ready.append(self.held.pop(self.next_index))
            self.next_index += len(ready[-1].token_ids)
            self.delivered += ready[-1].token_ids
        return ready


class PlannerLink:
    def __init__(self, intake_address: str, gateway_address: str, cluster_secret: str,
                 bind_host: str | None = None) -> None:
        self._bus = Bus(cluster_secret, zmq.asyncio.Context())
        self._to_planner = self._bus.socket(zmq.PUSH, connect=intake_address)
        self._inbox = self._bus.socket(zmq.PULL, bind=bind_address(gateway_address, bind_host))
        self._queues: dict[str, asyncio.Queue[Event]] = {}
        self._order: dict[str, ChunkOrder] = {}
        self._submits: dict[str, Submit] = {}
        self._resubmissions = Resubmissions()
        self.resubmitted = 0
        self.preempted = 0
        self._task: asyncio.Task[None] | None = None
        self.drops = DropCounter()
        self.status: ClusterStatus | None = None
        self.status_time = 0.0
        self._undecided: set[str] = set()  # sent with objectives, no verdict heard yet
        self._parked_since = 0  # of those, parked since the last status

    def start(self) -> None:
        """Say hello first, so that the planner aborts what a gateway before this one left."""
        self._to_planner.send(encode(GatewayHello(secrets.token_hex(8))), flags=zmq.NOBLOCK)
        self._task = asyncio.create_task(self._receive())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._bus.close()

    def open(self, request_id: str) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._queues[request_id] = queue
        self._order[request_id] = ChunkOrder()
        return queue

    def release(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self._order.pop(request_id, None)
        self._submits.pop(request_id, None)
        self._resubmissions.forget(request_id)
        self._undecided.discard(request_id)

    @property
    def open_requests(self) -> int:
        return len(self._queues)

    async def submit(self, msg: Submit, has_objectives: bool) -> None:
        self._submits[msg.request_id] = msg
        if has_objectives:
            self._undecided.add(msg.request_id)
        await self._to_planner.send(encode(msg))

    async def _resubmit(self, lost: Lost) -> None:
        """Send a lost request again after the tokens the client has (`shared.resubmission`)."""
        original, order = self._submits.get(lost.request_id), self._order.get(lost.request_id)
        if original is None or order is None:
            return
        again = self._resubmissions.again(original, lost, order.delivered)
        if again is None:
            log.error("request %s: lost too often (%s); giving up", lost.request_id, lost.reason)
            self._queues[lost.request_id].put_nowait(TokenChunk(lost.request_id, [], "", "error"))
            return
        log.warning("request %s: %s; resubmitting after %d streamed tokens", lost.request_id, lost.reason,
                    len(order.delivered))
        order.held.clear()  # chunks from the dead worker that never got their turn
        if lost.preempted:
            self.preempted += 1
        else:
            self.resubmitted += 1
        await self._to_planner.send(encode(again))

    async def _resubmit_all(self) -> None:
        """The planner restarted and holds none of our requests: send every open one again."""
        log.warning("the planner restarted; resubmitting the %d open requests", len(self._submits))
        self.resubmitted += len(self._submits)
        for request_id, original in list(self._submits.items()):
            order = self._order[request_id]
            order.held.clear()
            await self._to_planner.send(encode(self._resubmissions.after_restart(original, order.delivered)))

    def abort(self, request_id: str, reason: str) -> None:
        """Synchronous, so it also runs in the cleanup of a cancelled stream."""
        log.info("request %s: abort (%s)", request_id, reason)
        self._to_planner.send(encode(Abort(request_id, reason)), flags=zmq.NOBLOCK)

    def queue_room(self, max_age_s: float = 1.0) -> int | None:
        """How many more requests with objectives the planner's best-effort queue takes, at
        most; None: no bound, or no fresh status. The status says what the room was after the
        planner's last call, and every verdict of that call came before it on this socket; so
        what has been sent since and not yet decided is what the planner has not seen, and may
        fill the room, and what it parked since has taken some. A room that grew since the
        status (parked requests admitted) is not seen here until the next one, which the
        planner sends at once when the room grows."""
        if self.status is None or self.status.queue_room < 0 or time.monotonic() - self.status_time >= max_age_s:
            return None
        return max(0, self.status.queue_room - self._parked_since - len(self._undecided))

    def healthy(self, max_age_s: float = 2.0) -> bool:
        """A fresh status, and live workers that can both prefill and decode."""
        if self.status is None or time.monotonic() - self.status_time >= max_age_s:
            return False
        roles = {w.role for w in self.status.workers if w.alive}
        return "colocated" in roles or {"prefill", "decode"} <= roles

    async def _receive(self) -> None:
        while True:
            data = await self._inbox.recv()
            msg: Message | None = self.drops.accept(data, "bus")
            if isinstance(msg, ClusterStatus):
                restarted = self.status is not None and msg.planner_id != self.status.planner_id
                self.status, self.status_time, self._parked_since = msg, time.monotonic(), 0
                if restarted:
                    await self._resubmit_all()
            elif isinstance(msg, Lost):
                await self._resubmit(msg)
            elif isinstance(msg, (Admitted, Parked, Refused, TokenChunk)):
                if msg.request_id in self._undecided and not isinstance(msg, TokenChunk):
                    self._undecided.discard(msg.request_id)
                    self._parked_since += isinstance(msg, Parked)
                queue = self._queues.get(msg.request_id)
                if queue is None:
                    continue
                ordered = self._order[msg.request_id].accept(msg) if isinstance(msg, TokenChunk) else [msg]
                for event in ordered:
                    queue.put_nowait(event)
            elif msg is not None:
                log.warning("ignored unexpected %s", type(msg).__name__)
