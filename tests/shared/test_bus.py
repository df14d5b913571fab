"""Bind addresses: a name others dial binds where told, and `hostname` is this host's name."""

from __future__ import annotations

import socket

import zmq

from shared.bus import bind_address, make_socket, own_host


def test_bind_address_swaps_the_host_of_tcp_addresses_only() -> None:
    assert bind_address("tcp://slos-serve-planner:5555", "10.1.2.3") == "tcp://10.1.2.3:5555"
    assert bind_address("tcp://planner:5555", "fd00::3") == "tcp://[fd00::3]:5555"
    assert bind_address("tcp://planner:5555", None) == "tcp://planner:5555"
    assert bind_address("ipc:///run/planner.sock", "10.1.2.3") == "ipc:///run/planner.sock"


def test_a_service_name_binds_on_the_given_host_and_is_dialled_by_name() -> None:
    ctx = zmq.Context()
    try:
        server = make_socket(ctx, zmq.PULL, bind=bind_address("tcp://no-such-service.invalid:0", "127.0.0.1"))
        port = server.getsockopt(zmq.LAST_ENDPOINT).decode().rpartition(":")[2]
        client = make_socket(ctx, zmq.PUSH, connect=f"tcp://localhost:{port}")
        client.send(b"hello")
        assert server.poll(5000) and server.recv() == b"hello"
    finally:
        ctx.destroy(linger=0)


def test_own_host() -> None:
    assert own_host("hostname") == socket.gethostname()
    assert own_host("10.0.0.7") == "10.0.0.7"
