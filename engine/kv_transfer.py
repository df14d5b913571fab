"""Moving KV blocks between workers' caches: NIXL (UCX) reads, or ZeroMQ as the fallback.

A cache is one tensor of blocks, each contiguous, so a transfer copies whole blocks from a
peer's cache into free blocks of ours. The reader pulls (a NIXL READ, or a ZeroMQ fetch) and
the source keeps the blocks until the reader confirms. Peers learn how to reach each other from
a `KVEndpoint` that travels in msgspec messages; nothing is ever unpickled.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from typing import Literal, Protocol

import torch
import zmq

from shared.bus import DropCounter, make_socket
from shared.messages import KVEndpoint, KVFetch, encode

log = logging.getLogger(__name__)

TransportKind = Literal["auto", "nixl", "zmq"]
CHUNK_BYTES = 64 << 20
PROGRESS_S = 0.001


class KVTransferError(RuntimeError):
    pass


class KVTransport(Protocol):
    endpoint: KVEndpoint

    def read(self, peer: KVEndpoint, remote_blocks: list[int], local_blocks: list[int]) -> None:
        """Copy the peer's `remote_blocks` into our `local_blocks`, in order; blocks until done."""
        ...

    def close(self) -> None: ...


def spans(remote: list[int], local: list[int]) -> list[tuple[int, int, int]]:
    """(remote start, local start, count) runs where both sides are consecutive, so a transfer
    moves few large regions instead of many blocks."""
    out: list[tuple[int, int, int]] = []
    for r, loc in zip(remote, local):
        if out and out[-1][0] + out[-1][2] == r and out[-1][1] + out[-1][2] == loc:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((r, loc, 1))
    return out


def block_bytes(data: torch.Tensor) -> int:
    return data[0].numel() * data.element_size()


class NixlTransport:
    """The whole block tensor is registered with a NIXL agent once; reads are UCX READs of
    the peer's registered memory. The source side must make progress for a peer's read to
    finish; NIXL's own progress thread spins a whole core, too much beside the engine on a
    small machine, so a thread of ours progresses the agent every PROGRESS_S instead."""

    def __init__(self, name: str, data: torch.Tensor, timeout_s: float = 30.0) -> None:
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

        self.data = data
        self.timeout_s = timeout_s
        self.mem_type = "DRAM" if data.device.type == "cpu" else "VRAM"
        self.device_id = data.device.index or 0
        self.agent = nixl_agent(name, nixl_agent_config(
            enable_prog_thread=False, backends=["UCX"], sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT))
        self.agent.register_memory(data)
        self._stop = threading.Event()
        self._progress = threading.Thread(target=self._progress_loop, daemon=True, name="nixl-progress")
        self._progress.start()
        self.endpoint = KVEndpoint("nixl", name, block_bytes(data), nixl_metadata=self.agent.get_agent_metadata(),
                                   base_address=data.data_ptr())
        self._peers: dict[str, bytes] = {}

    def read(self, peer: KVEndpoint, remote_blocks: list[int], local_blocks: list[int]) -> None:
        _check(self.endpoint, peer, remote_blocks, local_blocks, self.data.shape[0])
        if self._peers.get(peer.name) != peer.nixl_metadata:
            if peer.name in self._peers:  # the peer restarted under the same name
                self.agent.remove_remote_agent(peer.name)
            self.agent.add_remote_agent(peer.nixl_metadata)
            self._peers[peer.name] = peer.nixl_metadata
        size = self.endpoint.block_bytes
        runs = spans(remote_blocks, local_blocks)
        remote = self.agent.get_xfer_descs(
            [(peer.base_address + r * size, n * size, self.device_id) for r, _, n in runs], self.mem_type)
        local = self.agent.get_xfer_descs(
            [(self.data.data_ptr() + loc * size, n * size, self.device_id) for _, loc, n in runs], self.mem_type)
        handle = self.agent.initialize_xfer("READ", local, remote, peer.name)
        try:
            state = self.agent.transfer(handle)
            deadline = time.monotonic() + self.timeout_s
            while state == "PROC" and time.monotonic() < deadline:
                state = self.agent.check_xfer_state(handle)
        finally:
            self.agent.release_xfer_handle(handle)
        if state != "DONE":
            raise KVTransferError(f"NIXL read from {peer.name} ended in state {state}")

    def _progress_loop(self) -> None:
        while not self._stop.wait(PROGRESS_S):
            self.agent.get_new_notifs()

    def close(self) -> None:
        self._stop.set()
        self._progress.join()
        self.agent.deregister_memory(self.agent.get_reg_descs(self.data))


class ZmqTransport:
    """Serves our blocks on a ROUTER socket from a thread of its own; reads a peer's with a
    DEALER socket per peer. A reply is the blocks' raw bytes, checked for length."""

    def __init__(self, name: str, data: torch.Tensor, bind: str = "tcp://127.0.0.1:*",
                 timeout_s: float = 30.0) -> None:
        self.data = data
        self.timeout_s = timeout_s
        self.ctx = zmq.Context()
        self.drops = DropCounter()
        server = make_socket(self.ctx, zmq.ROUTER, bind=bind)
        address = server.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.endpoint = KVEndpoint("zmq", name, block_bytes(data), zmq_address=address)
        self._peers: dict[str, zmq.Socket] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(server,), daemon=True, name="kv-serve")
        self._thread.start()

    def _serve(self, server: zmq.Socket) -> None:
        raw = _raw(self.data)
        while not self._stop.is_set():
            if not server.poll(100):
                continue
            frames = server.recv_multipart()
            msg = self.drops.accept(frames[-1], "kv peer") if len(frames) == 2 else None
            if not isinstance(msg, KVFetch) or not all(0 <= b < raw.shape[0] for b in msg.blocks):
                if msg is not None or len(frames) != 2:
                    log.warning("kv server: dropped a bad fetch")
                server.send_multipart([frames[0], b""])  # an empty reply tells the reader it failed
                continue
            blocks = raw.index_select(0, torch.tensor(msg.blocks, dtype=torch.long, device=raw.device)).cpu()
            server.send_multipart([frames[0], blocks.numpy()], copy=False)
        server.close()

    def read(self, peer: KVEndpoint, remote_blocks: list[int], local_blocks: list[int]) -> None:
        """Fetched in chunks of about CHUNK_BYTES, so memory stays bounded for long prompts."""
        _check(self.endpoint, peer, remote_blocks, local_blocks, self.data.shape[0])
        per_chunk = max(1, CHUNK_BYTES // self.endpoint.block_bytes)
        for i in range(0, len(remote_blocks), per_chunk):
            self._fetch(peer, remote_blocks[i : i + per_chunk], local_blocks[i : i + per_chunk])

    def _fetch(self, peer: KVEndpoint, remote_blocks: list[int], local_blocks: list[int]) -> None:
        sock = self._peers.get(peer.zmq_address)
        if sock is None:
            sock = self._peers[peer.zmq_address] = make_socket(self.ctx, zmq.DEALER, connect=peer.zmq_address)
        sock.send(encode(KVFetch(remote_blocks)))
        if not sock.poll(int(self.timeout_s * 1000)):
            sock.close()  # a late reply must not answer the next fetch
            del self._peers[peer.zmq_address]
            raise KVTransferError(f"no reply from {peer.name} at {peer.zmq_address}")
        reply = sock.recv(copy=False).buffer
        if len(reply) != len(remote_blocks) * self.endpoint.block_bytes:
            raise KVTransferError(f"{peer.name} sent {len(reply)} bytes for {len(remote_blocks)} blocks")
        with warnings.catch_warnings():  # read-only buffer: we only copy out of it
            warnings.simplefilter("ignore", UserWarning)
            src = torch.frombuffer(reply, dtype=torch.uint8).view(len(remote_blocks), -1)
        raw = _raw(self.data)
        raw.index_copy_(0, torch.tensor(local_blocks, dtype=torch.long, device=raw.device), src.to(raw.device))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.ctx.destroy(linger=0)


def make_transport(kind: TransportKind, name: str, data: torch.Tensor,
                   zmq_bind: str = "tcp://127.0.0.1:*") -> KVTransport:
    """NIXL unless ZeroMQ is asked for; `auto` falls back to ZeroMQ when nixl is missing."""
    if kind in ("auto", "nixl"):
        try:
            return NixlTransport(name, data)
        except ImportError:
            if kind == "nixl":
                raise
            log.warning("nixl is not importable; KV moves over ZeroMQ")
    return ZmqTransport(name, data, zmq_bind)


def _raw(data: torch.Tensor) -> torch.Tensor:
    """The block tensor as [blocks, bytes]."""
    return data.view(torch.uint8).view(data.shape[0], -1)


def _check(ours: KVEndpoint, peer: KVEndpoint, remote: list[int], local: list[int], num_blocks: int) -> None:
    if peer.block_bytes != ours.block_bytes:
        raise KVTransferError(f"peer {peer.name} has {peer.block_bytes}-byte blocks, ours are {ours.block_bytes}")
    if len(remote) != len(local) or not all(0 <= b < num_blocks for b in local):
        raise KVTransferError(f"bad block lists: {len(remote)} remote, {len(local)} local")
