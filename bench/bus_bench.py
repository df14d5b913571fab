"""`slos-serve bench bus`: what the bus's CURVE encryption adds to a planner-worker round trip.

One ROUTER (the planner) and one DEALER (a worker) in this process, over an ipc socket as `up`
wires them: the planner sends an order, the worker answers with a report of the same size,
and the round trip is timed; plain ZeroMQ sockets against the bus's (`shared.bus.Bus`).
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from shared.bus import Bus


@dataclass
class RoundTrips:
    sockets: str
    size: int
    median_us: float
    p99_us: float


def _timed(router: zmq.Socket, dealer: zmq.Socket, size: int, count: int) -> list[float]:
    message = os.urandom(size)
    dealer.send(message)  # the hello, and the handshake before it
    identity, _ = router.recv_multipart()
    times = []
    for _ in range(count):
        start = time.perf_counter()
        router.send_multipart([identity, message])
        dealer.recv()
        dealer.send(message)
        router.recv_multipart()
        times.append(time.perf_counter() - start)
    return sorted(times)


def measure(size: int, count: int) -> list[RoundTrips]:
    rows = []
    with tempfile.TemporaryDirectory() as run_dir:
        for name in ("plain", "curve"):
            address = f"ipc://{Path(run_dir) / name}.sock"
            bus = Bus(secrets.token_urlsafe(32))
            if name == "plain":
                router, dealer = bus.ctx.socket(zmq.ROUTER), bus.ctx.socket(zmq.DEALER)
                router.bind(address)
                dealer.connect(address)
            else:
                router = bus.socket(zmq.ROUTER, bind=address)
                dealer = bus.socket(zmq.DEALER, connect=address)
            try:
                times = _timed(router, dealer, size, count)
            finally:
                bus.close()
            rows.append(RoundTrips(name, size, times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6))
    return rows
