"""The bus: only processes holding the cluster secret get a message through; bind addresses:
a name others dial binds where told, and `hostname` is this host's name."""

from __future__ import annotations

import socket

import pytest
import zmq

from shared.bus import Bus, BusKeys, bind_address, own_host

SECRET = "test-cluster-secret-0123456789"


def _send_if_it_can(sock: zmq.Socket, data: bytes) -> None:
    """A refused peer's connection is dropped, after which a PUSH socket has nowhere to queue a
    message and a blocking send would wait for ever: what a stranger cannot send never arrives."""
    try:
        sock.send(data, zmq.NOBLOCK)
    except zmq.Again:
        pass


def test_bind_address_swaps_the_host_of_tcp_addresses_only() -> None:
    assert bind_address("tcp://slos-serve-planner:5555", "10.1.2.3") == "tcp://10.1.2.3:5555"
    assert bind_address("tcp://planner:5555", "fd00::3") == "tcp://[fd00::3]:5555"
    assert bind_address("tcp://planner:5555", None) == "tcp://planner:5555"
    assert bind_address("ipc:///run/planner.sock", "10.1.2.3") == "ipc:///run/planner.sock"


def test_a_service_name_binds_on_the_given_host_and_is_dialled_by_name() -> None:
    bus = Bus(SECRET)
    try:
        server = bus.socket(zmq.PULL, bind=bind_address("tcp://no-such-service.invalid:0", "127.0.0.1"))
        port = server.getsockopt(zmq.LAST_ENDPOINT).decode().rpartition(":")[2]
        client = bus.socket(zmq.PUSH, connect=f"tcp://localhost:{port}")
        client.send(b"hello")
        assert server.poll(5000) and server.recv() == b"hello"
    finally:
        bus.close()


def test_only_holders_of_the_secret_get_a_message_through() -> None:
    """A plain socket, one with another secret, and one with a key pair of its own that knows
    the server's public key (as if it had leaked) all send; only the member's message arrives."""
    server_bus, member, stranger = Bus(SECRET), Bus(SECRET), Bus("another-secret-0123456789")
    plain = zmq.Context()
    try:
        server = server_bus.socket(zmq.PULL, bind="tcp://127.0.0.1:*")
        address = server.getsockopt(zmq.LAST_ENDPOINT).decode()
        outsider = stranger.socket(zmq.PUSH, connect=address)
        _send_if_it_can(outsider, b"stranger")
        unauthenticated = plain.socket(zmq.PUSH)
        unauthenticated.connect(address)
        _send_if_it_can(unauthenticated, b"plain")
        forged = plain.socket(zmq.PUSH)
        forged.curve_publickey, forged.curve_secretkey = zmq.curve_keypair()
        forged.curve_serverkey = server_bus.keys.public
        forged.connect(address)
        _send_if_it_can(forged, b"forged")
        assert not server.poll(1500)
        assert server_bus.refused >= 1  # the forged key reached the ZAP check and was turned away
        insider = member.socket(zmq.PUSH, connect=address)
        insider.send(b"member")
        assert server.poll(5000) and server.recv() == b"member"
        assert not server.poll(200)
    finally:
        plain.destroy(linger=0)
        for bus in (server_bus, member, stranger):
            bus.close()


def test_unencrypted_sockets_also_let_in_only_holders_of_the_secret() -> None:
    server_bus, member, stranger = Bus(SECRET), Bus(SECRET), Bus("another-secret-0123456789")
    try:
        server = server_bus.socket(zmq.PULL, bind="tcp://127.0.0.1:*", encrypted=False)
        address = server.getsockopt(zmq.LAST_ENDPOINT).decode()
        outsider = stranger.socket(zmq.PUSH, connect=address, encrypted=False)
        _send_if_it_can(outsider, b"stranger")
        assert not server.poll(1500)
        insider = member.socket(zmq.PUSH, connect=address, encrypted=False)
        insider.send(b"member")
        assert server.poll(5000) and server.recv() == b"member"
    finally:
        for bus in (server_bus, member, stranger):
            bus.close()


def test_a_message_over_the_limit_is_not_delivered() -> None:
    bus = Bus(SECRET)
    try:
        server = bus.socket(zmq.PULL, bind="tcp://127.0.0.1:*", max_message_bytes=1000)
        client = bus.socket(zmq.PUSH, connect=server.getsockopt(zmq.LAST_ENDPOINT).decode())
        client.send(b"x" * 2000)
        assert not server.poll(1000)
    finally:
        bus.close()


def test_keys_come_from_the_secret_alone() -> None:
    assert BusKeys.derive(SECRET) == BusKeys.derive(SECRET) != BusKeys.derive(SECRET + "!")
    with pytest.raises(ValueError, match="16 characters"):
        BusKeys.derive("short")


def test_own_host() -> None:
    assert own_host("hostname") == socket.gethostname()
    assert own_host("10.0.0.7") == "10.0.0.7"
