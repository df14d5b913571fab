"""ZeroMQ helpers: sockets that never block shutdown, and receiving that counts garbage."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import zmq

from shared.messages import DecodeFailure, Message, decode

log = logging.getLogger(__name__)


def make_socket(
    ctx: zmq.Context,
    kind: int,
    *,
    bind: str | None = None,
    connect: str | None = None,
    identity: bytes | None = None,
) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if bind:
        sock.bind(bind)
    if connect:
        sock.connect(connect)
    return sock


def ipc_address(run_dir: Path, name: str) -> str:
    return f"ipc://{run_dir / name}.sock"


def bind_address(address: str, host: str | None) -> str:
    """`address` with its host replaced by `host` (when given, for TCP): a socket that others
    dial by a name that resolves elsewhere (a Kubernetes Service's virtual IP) binds to its own
    address under the same port."""
    if host is None or not address.startswith("tcp://"):
        return address
    port = address.rpartition(":")[2]
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def own_host(host: str) -> str:
    """`hostname` means this host's own name, which a container resolves to its own address."""
    return socket.gethostname() if host == "hostname" else host


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class DropCounter:
    """Counts messages dropped because they did not decode."""

    dropped: int = 0

    def accept(self, data: bytes, source: str) -> Message | None:
        msg = decode(data)
        if isinstance(msg, DecodeFailure):
            self.dropped += 1
            log.warning("dropped undecodable message from %s: %s", source, msg.error)
            return None
        return msg
