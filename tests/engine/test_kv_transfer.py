"""KV blocks cross process boundaries byte for byte over NIXL and over ZeroMQ; a bad fetch
neither crashes the serving side nor lands in the cache; only blocks of exported requests are
served, only to holders of the cluster secret; NIXL listens only where it is told."""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.synchronize import Event

import msgspec
import psutil
import pytest
import torch
import zmq

from engine.kv_transfer import KVTransferError, make_transport, spans
from shared.bus import Bus
from shared.messages import KVEndpoint, KVFetch, encode

SECRET = "test-cluster-secret-0123456789"
REMOTE_BLOCKS = [5, 6, 7, 2, 9, 11]

SHAPE = (12, 2, 2, 4, 2, 8)  # blocks, layers, K/V, block size, KV heads, head dim


def cache(seed: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


def segments(data: torch.Tensor, per_layer: bool) -> list[torch.Tensor]:
    """The cache as one tensor (ours), or as one tensor per layer in one buffer (vLLM's)."""
    return list(data.transpose(0, 1).contiguous()) if per_layer else [data]


def serve(kind: str, dtype: torch.dtype, per_layer: bool, endpoints: mp.Queue, done: Event) -> None:
    data = cache(7, dtype)
    bus = Bus(SECRET)
    transport = make_transport(kind, "source", segments(data, per_layer), bus)
    transport.offer("r1", REMOTE_BLOCKS)
    endpoints.put(msgspec.msgpack.encode(transport.endpoint))
    done.wait(60)
    transport.close()
    bus.close()


def test_spans_coalesce_consecutive_runs() -> None:
    assert spans([4, 5, 6, 9, 2], [0, 1, 2, 3, 7]) == [(4, 0, 3), (9, 3, 1), (2, 7, 1)]
    assert spans([], []) == []


@pytest.mark.parametrize("kind,dtype,per_layer", [("nixl", torch.float32, False), ("nixl", torch.float32, True),
                                                   ("zmq", torch.float32, False), ("zmq", torch.bfloat16, False),
                                                   ("zmq", torch.float32, True)])
def test_blocks_arrive_byte_for_byte_across_processes(kind: str, dtype: torch.dtype, per_layer: bool) -> None:
    if kind == "nixl":
        pytest.importorskip("nixl._api")
    ctx = mp.get_context("spawn")
    endpoints, done = ctx.Queue(), ctx.Event()
    source = ctx.Process(target=serve, args=(kind, dtype, per_layer, endpoints, done))
    source.start()
    try:
        peer = msgspec.msgpack.decode(endpoints.get(timeout=60), type=KVEndpoint)
        layers = segments(torch.zeros(SHAPE, dtype=dtype), per_layer)
        bus = Bus(SECRET)
        reader = make_transport(kind, "reader", layers, bus)
        local_blocks = [0, 1, 2, 8, 3, 4]
        reader.read(peer, "r1", REMOTE_BLOCKS, local_blocks)
        local = torch.stack(layers, 1) if per_layer else layers[0]
        expected = cache(7, dtype)
        for r, loc in zip(REMOTE_BLOCKS, local_blocks):
            assert torch.equal(local[loc].view(torch.uint8), expected[r].view(torch.uint8))
        untouched = [b for b in range(SHAPE[0]) if b not in local_blocks]
        assert not local[untouched].any()
        with pytest.raises(KVTransferError):
            reader.read(peer, "r1", [5, 6], [0])
        reader.close()
        bus.close()
    finally:
        done.set()
        source.join(30)
    assert source.exitcode == 0


def test_zmq_server_serves_offered_blocks_only_and_survives_garbage() -> None:
    data = cache(3, torch.float32)
    bus = Bus(SECRET)
    server = make_transport("zmq", "source", [data], bus)
    reader = make_transport("zmq", "reader", [torch.zeros(SHAPE)], bus)
    try:
        server.offer("r1", [4, 5])
        rogue = bus.socket(zmq.DEALER, connect=server.endpoint.zmq_address, encrypted=False)  # an insider sending junk
        for junk in (b"\x00garbage", b"\x01\x92\x01", encode(KVFetch("r1", [99]))):
            rogue.send(junk)
            assert rogue.poll(5000) and rogue.recv() == b""
        peer = server.endpoint
        for request_id, blocks in (("r1", [6]), ("r2", [4]), ("r1", [99])):  # not offered, not exported, out of range
            with pytest.raises(KVTransferError, match="sent 0 bytes"):
                reader.read(peer, request_id, blocks, [0])
        rogue.send(encode(KVFetch("r1", [4] * 3)))  # an offered block, more times than blocks were offered
        assert rogue.poll(5000) and rogue.recv() == b""
        rogue.send(encode(KVFetch("r1", [4] * 5_000_000)))  # 5 MB of block ids: over the size limit
        assert not rogue.poll(1000)
        reader.read(peer, "r1", [5, 4], [0, 1])
        assert torch.equal(reader.segments[0][0], data[5]) and torch.equal(reader.segments[0][1], data[4])
        server.withdraw("r1")
        with pytest.raises(KVTransferError, match="sent 0 bytes"):
            reader.read(peer, "r1", [4], [0])
        assert server.refused == 8  # the oversized fetch never reached it
    finally:
        reader.close()
        server.close()
        bus.close()


def test_zmq_server_says_nothing_to_a_peer_without_the_secret() -> None:
    """Neither to a plain socket nor to a reader of another cluster."""
    bus, other = Bus(SECRET), Bus("another-cluster-secret-0123")
    server = make_transport("zmq", "source", [cache(3, torch.float32)], bus)
    server.offer("r1", [0])
    stranger = make_transport("zmq", "reader", [torch.zeros(SHAPE)], other)
    stranger.timeout_s = 1.5
    ctx = zmq.Context()
    try:
        outsider = ctx.socket(zmq.DEALER)
        outsider.connect(server.endpoint.zmq_address)
        outsider.send(encode(KVFetch("r1", [0])))
        assert not outsider.poll(1500)
        with pytest.raises(KVTransferError, match="no reply"):
            stranger.read(server.endpoint, "r1", [0], [0])
        assert not stranger.segments[0].any()
    finally:
        ctx.destroy(linger=0)
        stranger.close()
        server.close()
        bus.close()
        other.close()


def _listening_addresses(kind: str, host: str, out: mp.Queue) -> None:
    bus = Bus(SECRET)
    transport = make_transport(kind, "source", [cache(3, torch.float32)], bus, host)
    out.put(sorted({c.laddr.ip for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN}))
    transport.close()
    bus.close()


@pytest.mark.parametrize("kind", ["nixl", "zmq"])
def test_a_transport_listens_only_on_its_host(kind: str) -> None:
    """UCX would listen on every interface of the machine unless told which one."""
    if kind == "nixl":
        pytest.importorskip("nixl._api")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_listening_addresses, args=(kind, "127.0.0.1", out))
    child.start()
    try:
        assert out.get(timeout=60) == ["127.0.0.1"]
    finally:
        child.join(30)
