"""ZeroMQ helpers: one authenticated context per process, sockets that never block shutdown,
and receiving that counts garbage.

Every process of a cluster holds one secret. It derives one CURVE key pair, the same
everywhere: every socket that binds is a CURVE server with it, every socket that connects a
CURVE client with it, and a ZAP handler lets a client in only if its key is that one. A
process without the secret cannot complete a handshake, so it can neither send nor receive
a single message, and what travels is encrypted.

Bulk KV bytes are the exception (`encrypted=False`): CURVE cut the ZeroMQ KV transport's
throughput 3-4x on CPU-2 (docs/benchmarks.md), so those sockets use ZeroMQ's PLAIN mechanism with a password
derived from the secret. It keeps out whoever does not hold the secret, but whoever can watch
the network can read the bytes and the password, as they can read NIXL's transfers, which UCX
does not encrypt either: across untrusted networks, run the KV traffic inside a private network
or a VPN.
"""

from __future__ import annotations

import hashlib
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth.thread
from zmq.utils import z85

from shared.messages import DecodeFailure, Message, decode

log = logging.getLogger(__name__)
ZAP_LOG = logging.getLogger(__name__ + ".zap")
ZAP_LOG.setLevel(logging.INFO)  # pyzmq's authenticator logs PLAIN passwords at debug level


MIN_SECRET_CHARS = 16
KEY_CONTEXT = b"slos-serve bus key v1\0"  # distinct derivations of one secret
PASSWORD_CONTEXT = b"slos-serve kv password v1\0"
PLAIN_USER = b"slos-serve"


@dataclass(frozen=True)
class BusKeys:
    public: bytes  # Z85
    secret: bytes  # Z85
    password: bytes  # for the unencrypted sockets

    @classmethod
    def derive(cls, cluster_secret: str) -> BusKeys:
        if len(cluster_secret) < MIN_SECRET_CHARS:
            raise ValueError(f"the cluster secret must have at least {MIN_SECRET_CHARS} characters")
        secret = z85.encode(hashlib.sha256(KEY_CONTEXT + cluster_secret.encode()).digest())
        password = hashlib.sha256(PASSWORD_CONTEXT + cluster_secret.encode()).hexdigest().encode()
        return cls(zmq.curve_public(secret), secret, password)


class Bus:
    """One process's ZeroMQ context, whose sockets all let in only holders of the cluster secret."""

    def __init__(self, cluster_secret: str, context: zmq.Context | None = None) -> None:
        self.keys = BusKeys.derive(cluster_secret)
        self.ctx = context if context is not None else zmq.Context()
        self._auth = zmq.auth.thread.ThreadAuthenticator(self.ctx, log=ZAP_LOG)
        self._auth.start()
        self._auth.configure_curve_callback("*", self)
        self._auth.configure_plain("*", {PLAIN_USER.decode(): self.keys.password.decode()})
        self.refused = 0  # handshakes of CURVE clients whose key was not the cluster's

    def callback(self, _domain: str, client_key: bytes) -> bool:
        """The ZAP check (from the authenticator's thread): the client's key is the cluster's."""
        if client_key == self.keys.public:
            return True
        self.refused += 1
        return False

    def socket(self, kind: int, *, bind: str | None = None, connect: str | None = None,
               identity: bytes | None = None, max_message_bytes: int = -1, encrypted: bool = True) -> zmq.Socket:
        """A socket that binds (as the server) or connects (as a client), not both. A peer
        that sends a longer message than `max_message_bytes` is disconnected."""
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        if identity is not None:
            sock.setsockopt(zmq.IDENTITY, identity)
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if encrypted:
            sock.curve_secretkey, sock.curve_publickey = self.keys.secret, self.keys.public
        if bind:
            if encrypted:
                sock.curve_server = True
            else:
                sock.plain_server = True
            sock.bind(bind)
        elif connect:
            if encrypted:
                sock.curve_serverkey = self.keys.public
            else:
                sock.plain_username, sock.plain_password = PLAIN_USER, self.keys.password
            sock.connect(connect)
        return sock

    def close(self) -> None:
        self._auth.stop()
        self.ctx.destroy(linger=0)


def ipc_address(run_dir: Path, name: str) -> str:
    return f"ipc://{run_dir / name}.sock"


def bind_address(address: str, host: str | None) -> str:
    """`address` with its host replaced by `host` (when given, for TCP): a socket that others
    dial by a name that resolves elsewhere (a Kubernetes Service's virtual IP) binds to its own
    address under the same port."""
    if host is None or not address.startswith("tcp://"):
        return address
    return tcp_address(host, address.rpartition(":")[2])


def tcp_address(host: str, port: str | int) -> str:
    """A ZeroMQ TCP address; an IPv6 host goes in brackets."""
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
