"""`slos-serve bench kv-transfer`: how fast a prompt's KV blocks move between two processes,
over NIXL (UCX) and ZeroMQ, beside an in-process copy, and what share of TTFT that is.

The source process fills a cache of the prompt's blocks and serves it on both transports, as a
worker does (the ZeroMQ one lets in only holders of the cluster secret); this process reads
every block into a cache of its own, in a shuffled block order (as a real allocator hands out
blocks), and checks the bytes.
"""

from __future__ import annotations

import multiprocessing as mp
import secrets
import statistics
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Event

import msgspec
import torch

from engine.kv_transfer import make_transport
from shared.bus import Bus
from shared.messages import KVEndpoint
from shared.roofline import Batches, ModelShape, Profile

BLOCK_SIZE = 16
REQUEST_ID = "prompt"


@dataclass(frozen=True)
class Layout:
    name: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def shape(self, blocks: int) -> tuple[int, ...]:
        return (blocks, self.layers, 2, BLOCK_SIZE, self.kv_heads, self.head_dim)


@dataclass
class TransferRow:
    layout: str
    tokens: int
    transport: str
    megabytes: float
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.megabytes / 1e3 / self.seconds


def filled(layout: Layout, blocks: int) -> torch.Tensor:
    return torch.randn(layout.shape(blocks), generator=torch.Generator().manual_seed(blocks)).to(layout.dtype)


def _source(layout: Layout, blocks: int, secret: str, endpoints: mp.Queue, done: Event) -> None:
    data = filled(layout, blocks)
    bus = Bus(secret)
    transports = [make_transport(kind, f"src-{kind}", data, bus) for kind in ("nixl", "zmq")]
    for t in transports:
        t.offer(REQUEST_ID, list(range(blocks)))
        endpoints.put(msgspec.msgpack.encode(t.endpoint))
    done.wait(600)
    for t in transports:
        t.close()
    bus.close()


def measure(layout: Layout, tokens: int, repeats: int) -> list[TransferRow]:
    blocks = tokens // BLOCK_SIZE
    order = torch.randperm(blocks, generator=torch.Generator().manual_seed(0)).tolist()
    ctx = mp.get_context("spawn")
    endpoints, done = ctx.Queue(), ctx.Event()
    secret = secrets.token_urlsafe(32)
    source = ctx.Process(target=_source, args=(layout, blocks, secret, endpoints, done))
    source.start()
    bus = Bus(secret)
    try:
        peers = [msgspec.msgpack.decode(endpoints.get(timeout=300), type=KVEndpoint) for _ in range(2)]
        expected = filled(layout, blocks)
        local = torch.empty_like(expected)
        megabytes = expected.numel() * expected.element_size() / 1e6
        rows = []
        for peer in peers:
            reader = make_transport(peer.transport, f"reader-{peer.transport}", local, bus)
            times = []
            for _ in range(repeats):
                local.zero_()
                start = time.perf_counter()
                reader.read(peer, REQUEST_ID, list(range(blocks)), order)
                times.append(time.perf_counter() - start)
            assert torch.equal(local[order].view(torch.uint8), expected.view(torch.uint8)), peer.transport
            reader.close()
            rows.append(TransferRow(layout.name, tokens, peer.transport, megabytes, statistics.median(times)))
        index = torch.tensor(order)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            local.index_copy_(0, index, expected)
            times.append(time.perf_counter() - start)
        rows.append(TransferRow(layout.name, tokens, "memcpy (one process)", megabytes, statistics.median(times)))
        return rows
    finally:
        bus.close()
        done.set()
        source.join(60)


def ttft_s(profile: Profile, tokens: int) -> float:
    """Predicted time to prefill the prompt in one step."""
    return float(profile.predict(Batches.of(prefill_tokens=tokens, num_seqs=1, kv_read=tokens,
                                            attention_pairs=tokens * (tokens + 1) / 2)))


def layout_of(shape: ModelShape, dtype: torch.dtype) -> Layout:
    return Layout(shape.name, shape.layers, shape.kv_heads, shape.head_dim, dtype)
