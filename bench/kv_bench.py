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
VLLM_CPU_BLOCK_SIZE = 32
REQUEST_ID = "prompt"


@dataclass(frozen=True)
class Layout:
    """Ours: one tensor, all of a block's layers together, 16-token blocks. vLLM's (CPU): one
    tensor per layer with the block first, 32-token blocks, so a block is one piece per layer."""

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    per_layer: bool = False

    @property
    def block_size(self) -> int:
        return VLLM_CPU_BLOCK_SIZE if self.per_layer else BLOCK_SIZE

    def shape(self, blocks: int) -> tuple[int, ...]:
        if self.per_layer:
            return (self.layers, blocks, self.kv_heads, self.block_size, 2, self.head_dim)
        return (blocks, self.layers, 2, self.block_size, self.kv_heads, self.head_dim)

    def segments(self, data: torch.Tensor) -> list[torch.Tensor]:
        return list(data) if self.per_layer else [data]

    def blocks(self, data: torch.Tensor) -> torch.Tensor:
        """[blocks, ...]: each block's bytes, whatever the layout."""
        return data.transpose(0, 1) if self.per_layer else data


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
    transports = [make_transport(kind, f"src-{kind}", layout.segments(data), bus) for kind in ("nixl", "zmq")]
    for t in transports:
        t.offer(REQUEST_ID, list(range(blocks)))
        endpoints.put(msgspec.msgpack.encode(t.endpoint))
    done.wait(600)
    for t in transports:
        t.close()
    bus.close()


def measure(layout: Layout, tokens: int, repeats: int) -> list[TransferRow]:
    blocks = tokens // layout.block_size
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
            reader = make_transport(peer.transport, f"reader-{peer.transport}", layout.segments(local), bus)
            times = []
            for _ in range(repeats):
                local.zero_()
                start = time.perf_counter()
                reader.read(peer, REQUEST_ID, list(range(blocks)), order)
                times.append(time.perf_counter() - start)
            got, want = layout.blocks(local)[order], layout.blocks(expected)
            assert torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)), peer.transport
            reader.close()
            rows.append(TransferRow(layout.name, tokens, peer.transport, megabytes, statistics.median(times)))
        index = torch.tensor(order)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for ours, theirs in zip(layout.segments(local), layout.segments(expected)):
                ours.index_copy_(0, index, theirs)
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


def layout_of(shape: ModelShape, dtype: torch.dtype, per_layer: bool = False) -> Layout:
    return Layout(shape.name, shape.layers, shape.kv_heads, shape.head_dim, dtype, per_layer)
