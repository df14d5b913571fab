"""KV blocks cross process boundaries byte for byte over NIXL and over ZeroMQ, and a bad
fetch neither crashes the serving side nor lands in the cache."""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.synchronize import Event

import msgspec
import pytest
import torch
import zmq

from engine.kv_transfer import KVTransferError, make_transport, spans
from shared.messages import KVEndpoint

SHAPE = (12, 2, 2, 4, 2, 8)  # blocks, layers, K/V, block size, KV heads, head dim


def cache(seed: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


def serve(kind: str, dtype: torch.dtype, endpoints: mp.Queue, done: Event) -> None:
    data = cache(7, dtype)
    transport = make_transport(kind, "source", data)
    endpoints.put(msgspec.msgpack.encode(transport.endpoint))
    done.wait(60)
    transport.close()


def test_spans_coalesce_consecutive_runs() -> None:
    assert spans([4, 5, 6, 9, 2], [0, 1, 2, 3, 7]) == [(4, 0, 3), (9, 3, 1), (2, 7, 1)]
    assert spans([], []) == []


@pytest.mark.parametrize("kind,dtype", [("nixl", torch.float32), ("zmq", torch.float32), ("zmq", torch.bfloat16)])
def test_blocks_arrive_byte_for_byte_across_processes(kind: str, dtype: torch.dtype) -> None:
    if kind == "nixl":
        pytest.importorskip("nixl._api")
    ctx = mp.get_context("spawn")
    endpoints, done = ctx.Queue(), ctx.Event()
    source = ctx.Process(target=serve, args=(kind, dtype, endpoints, done))
    source.start()
    try:
        peer = msgspec.msgpack.decode(endpoints.get(timeout=60), type=KVEndpoint)
        local = torch.zeros(SHAPE, dtype=dtype)
        reader = make_transport(kind, "reader", local)
        remote_blocks, local_blocks = [5, 6, 7, 2, 9, 11], [0, 1, 2, 8, 3, 4]
        reader.read(peer, remote_blocks, local_blocks)
        expected = cache(7, dtype)
        for r, loc in zip(remote_blocks, local_blocks):
            assert torch.equal(local[loc].view(torch.uint8), expected[r].view(torch.uint8))
        untouched = [b for b in range(SHAPE[0]) if b not in local_blocks]
        assert not local[untouched].any()
        with pytest.raises(KVTransferError):
            reader.read(peer, [1, 2], [0])
        reader.close()
    finally:
        done.set()
        source.join(30)
    assert source.exitcode == 0


def test_zmq_server_answers_garbage_with_nothing_and_keeps_serving() -> None:
    data = cache(3, torch.float32)
    server = make_transport("zmq", "source", data)
    reader = make_transport("zmq", "reader", torch.zeros(SHAPE))
    try:
        ctx = zmq.Context.instance()
        rogue = ctx.socket(zmq.DEALER)
        rogue.connect(server.endpoint.zmq_address)
        for junk in (b"\x00garbage", b"\x01\x92\x01"):
            rogue.send(junk)
            assert rogue.poll(5000) and rogue.recv() == b""
        peer = server.endpoint
        with pytest.raises(KVTransferError, match="sent 0 bytes"):
            reader.read(peer, [99], [0])  # out of range on the server
        reader.read(peer, [4], [0])
        assert torch.equal(reader.data[0], data[4])
        rogue.close(0)
    finally:
        reader.close()
        server.close()
