"""Moving KV blocks between workers' caches: NIXL (UCX) reads, or ZeroMQ as the fallback.

A cache is one or more segments, tensors whose first dimension is the block (ours is one
tensor; vLLM's is one per layer), so a block is one contiguous piece of each segment and a
transfer copies whole blocks from a peer's cache into free blocks of ours. The reader pulls (a
NIXL READ, or a ZeroMQ fetch) and the source keeps the blocks until the reader confirms. Peers
learn how to reach each other from a `KVEndpoint` that travels in msgspec messages on the
authenticated bus; nothing is ever unpickled.

What a peer may read: over ZeroMQ, the KV server lets in only processes holding the cluster
secret (`shared.bus`; its bytes, like NIXL's, are not encrypted), and it serves only blocks of
requests this worker exported and the planner has not yet aborted. A NIXL read is one-sided
(the source's CPU takes no part), so it cannot be checked at the source; it needs the source
agent's metadata, which travels only on the bus, and UCX listens only on the interface of the
worker's `kv_host`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
import warnings
from typing import Literal, Protocol

import numpy as np
import psutil
import torch
import zmq

from shared.bus import Bus, DropCounter, tcp_address
from shared.messages import KVEndpoint, KVFetch, encode

log = logging.getLogger(__name__)

TransportKind = Literal["auto", "nixl", "zmq"]
CHUNK_BYTES = 64 << 20
FETCH_MAX_BYTES = 4 << 20  # a fetch names at most a chunk's blocks: far below this
PROGRESS_S = 0.001


class KVTransferError(RuntimeError):
    pass


class KVTransport(Protocol):
    endpoint: KVEndpoint

    def read(self, peer: KVEndpoint, request_id: str, remote_blocks: list[int], local_blocks: list[int]) -> None:
        """Copy the peer's `remote_blocks` (the request's) into our `local_blocks`, in order;
        blocks until done."""
        ...

    def offer(self, request_id: str, blocks: list[int]) -> None:
        """Let peers read these blocks, the exported request's, until it is withdrawn."""
        ...

    def withdraw(self, request_id: str) -> None:
        """Before the request's blocks are freed."""
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


def segment_bytes(segments: list[torch.Tensor]) -> list[int]:
    """Each segment's bytes per block; a segment must be contiguous with the block outermost."""
    if not segments or any(not s.is_contiguous() or s.shape[0] != segments[0].shape[0] for s in segments):
        raise ValueError("KV segments must be contiguous tensors with the same number of blocks first")
    return [s[0].numel() * s.element_size() for s in segments]


class NixlTransport:
    """The whole block tensor is registered with a NIXL agent once; reads are UCX READs of
    the peer's registered memory. The source side must make progress for a peer's read to
    finish; NIXL's own progress thread spins a whole core, too much beside the engine on a
    small machine, so a thread of ours progresses the agent every PROGRESS_S instead."""

    def __init__(self, name: str, segments: list[torch.Tensor], host: str = "127.0.0.1",
                 timeout_s: float = 30.0) -> None:
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

        sizes = segment_bytes(segments)
        device = interface_of(host)
        if device is not None:
            os.environ.setdefault("UCX_NET_DEVICES", device)  # read by UCX when the agent starts
        self.segments = segments
        self.timeout_s = timeout_s
        self.mem_type = "DRAM" if segments[0].device.type == "cpu" else "VRAM"
        self.device_id = segments[0].device.index or 0
        self.agent = nixl_agent(name, nixl_agent_config(
            enable_prog_thread=False, backends=["UCX"], sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT))
        self.agent.register_memory(segments)
        self._stop = threading.Event()
        self._progress = threading.Thread(target=self._progress_loop, daemon=True, name="nixl-progress")
        self._progress.start()
        self.endpoint = KVEndpoint("nixl", name, sizes, nixl_metadata=self.agent.get_agent_metadata(),
                                   base_addresses=[s.data_ptr() for s in segments])
        self._peers: dict[str, bytes] = {}

    def read(self, peer: KVEndpoint, request_id: str, remote_blocks: list[int], local_blocks: list[int]) -> None:
        _check(self.endpoint, peer, remote_blocks, local_blocks, self.segments[0].shape[0])
        if self._peers.get(peer.name) != peer.nixl_metadata:
            if peer.name in self._peers:  # the peer restarted under the same name
                self.agent.remove_remote_agent(peer.name)
            self.agent.add_remote_agent(peer.nixl_metadata)
            self._peers[peer.name] = peer.nixl_metadata
        runs = spans(remote_blocks, local_blocks)
        places = list(zip(peer.base_addresses, [s.data_ptr() for s in self.segments], self.endpoint.segment_bytes))
        remote = self.agent.get_xfer_descs(
            [(theirs + r * size, n * size, self.device_id) for r, _, n in runs for theirs, _, size in places],
            self.mem_type)
        local = self.agent.get_xfer_descs(
            [(ours + loc * size, n * size, self.device_id) for _, loc, n in runs for _, ours, size in places],
            self.mem_type)
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

    def offer(self, request_id: str, blocks: list[int]) -> None:
        """Nothing to do: a peer's read is one-sided (see the module's docstring)."""

    def withdraw(self, request_id: str) -> None:
        """Nothing to do, as for `offer`."""

    def _progress_loop(self) -> None:
        while not self._stop.wait(PROGRESS_S):
            self.agent.get_new_notifs()

    def close(self) -> None:
        self._stop.set()
        self._progress.join()
        self.agent.deregister_memory(self.agent.get_reg_descs(self.segments))


class ZmqTransport:
    """Serves the offered blocks on a ROUTER socket from a thread of its own; reads a peer's with
    a DEALER socket per peer. A reply is the blocks' raw bytes, segment after segment, checked
    for length; an empty reply means the fetch was refused."""

    def __init__(self, name: str, segments: list[torch.Tensor], bus: Bus, host: str = "127.0.0.1",
                 timeout_s: float = 30.0) -> None:
        sizes = segment_bytes(segments)
        self.segments = segments
        self.timeout_s = timeout_s
        self.bus = bus
        self.drops = DropCounter()
        self.refused = 0
        server = bus.socket(zmq.ROUTER, bind=tcp_address(host, "*"), max_message_bytes=FETCH_MAX_BYTES,
                            encrypted=False)
        address = server.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.endpoint = KVEndpoint("zmq", name, sizes, zmq_address=address)
        self._offers: dict[str, set[int]] = {}
        self._lock = threading.Lock()  # held while blocks are copied out, so none is freed meanwhile
        self._peers: dict[str, zmq.Socket] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(server,), daemon=True, name="kv-serve")
        self._thread.start()

    def offer(self, request_id: str, blocks: list[int]) -> None:
        with self._lock:
            self._offers[request_id] = set(blocks)

    def withdraw(self, request_id: str) -> None:
        with self._lock:
            self._offers.pop(request_id, None)

    def _serve(self, server: zmq.Socket) -> None:
        """Never ends on a bad fetch: whatever goes wrong with one is answered with nothing."""
        while not self._stop.is_set():
            if not server.poll(100):
                continue
            frames = server.recv_multipart()
            try:
                reply = self._blocks_for(frames)
            except Exception:
                log.exception("kv server: a fetch failed")
                reply = None
            if reply is None:
                self.refused += 1
            server.send_multipart([frames[0], b"" if reply is None else reply], copy=False)
        server.close()

    def _blocks_for(self, frames: list[bytes]) -> np.ndarray | None:
        msg = self.drops.accept(frames[-1], "kv peer") if len(frames) == 2 else None
        if not isinstance(msg, KVFetch):
            return None
        with self._lock:
            offered = self._offers.get(msg.request_id)
            # a fetch names each offered block once at most: a block named a million times under
            # the message size limit would cost a reply a million blocks long
            if (offered is None or not msg.blocks or len(msg.blocks) > len(offered)
                    or not offered.issuperset(msg.blocks)):
                log.warning("request %s: refused a fetch of blocks it was not offered", msg.request_id)
                return None
            index = torch.tensor(msg.blocks, dtype=torch.long, device=self.segments[0].device)
            return torch.cat([_raw(s).index_select(0, index).flatten() for s in self.segments]).cpu().numpy()

    def read(self, peer: KVEndpoint, request_id: str, remote_blocks: list[int], local_blocks: list[int]) -> None:
        """Fetched in chunks of about CHUNK_BYTES, so memory stays bounded for long prompts."""
        _check(self.endpoint, peer, remote_blocks, local_blocks, self.segments[0].shape[0])
        per_chunk = max(1, CHUNK_BYTES // sum(self.endpoint.segment_bytes))
        for i in range(0, len(remote_blocks), per_chunk):
            self._fetch(peer, request_id, remote_blocks[i : i + per_chunk], local_blocks[i : i + per_chunk])

    def _fetch(self, peer: KVEndpoint, request_id: str, remote_blocks: list[int], local_blocks: list[int]) -> None:
        sock = self._peers.get(peer.zmq_address)
        if sock is None:
            sock = self._peers[peer.zmq_address] = self.bus.socket(zmq.DEALER, connect=peer.zmq_address,
                                                                    encrypted=False)
            sock.setsockopt(zmq.SNDTIMEO, int(self.timeout_s * 1000))
        try:
            sock.send(encode(KVFetch(request_id, remote_blocks)))
            replied = bool(sock.poll(int(self.timeout_s * 1000)))
        except zmq.Again:  # no connection to send on: the peer refused our handshake, or is gone
            replied = False
        if not replied:
            sock.close()  # a late reply must not answer the next fetch
            del self._peers[peer.zmq_address]
            raise KVTransferError(f"no reply from {peer.name} at {peer.zmq_address}")
        reply = sock.recv(copy=False).buffer
        sizes = [len(remote_blocks) * size for size in self.endpoint.segment_bytes]
        if len(reply) != sum(sizes):
            raise KVTransferError(f"{peer.name} sent {len(reply)} bytes for {len(remote_blocks)} blocks")
        with warnings.catch_warnings():  # read-only buffer: we only copy out of it
            warnings.simplefilter("ignore", UserWarning)
            parts = torch.frombuffer(reply, dtype=torch.uint8).split(sizes)
        index = torch.tensor(local_blocks, dtype=torch.long, device=self.segments[0].device)
        for segment, part in zip(self.segments, parts):
            raw = _raw(segment)
            raw.index_copy_(0, index, part.view(len(remote_blocks), -1).to(raw.device))

    def close(self) -> None:
        """Closes our sockets; the bus is the caller's."""
        self._stop.set()
        self._thread.join()
        for sock in self._peers.values():
            sock.close()


def make_transport(kind: TransportKind, name: str, segments: list[torch.Tensor], bus: Bus,
                   host: str = "127.0.0.1") -> KVTransport:
    """NIXL unless ZeroMQ is asked for; `auto` falls back to ZeroMQ when nixl is missing.
    Either listens only at `host`."""
    if kind in ("auto", "nixl"):
        try:
            return NixlTransport(name, segments, host)
        except ImportError:
            if kind == "nixl":
                raise
            log.warning("nixl is not importable; KV moves over ZeroMQ")
    return ZmqTransport(name, segments, bus, host)


def interface_of(host: str) -> str | None:
    """The network interface holding `host`'s address, for UCX; None for the wildcard address.
    An address no interface holds is an error: UCX would listen on every one."""
    addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in socket.getaddrinfo(host, None)}
    if any(a.is_unspecified for a in addresses):
        return None
    for name, held in psutil.net_if_addrs().items():
        mine = {ipaddress.ip_address(a.address.split("%")[0]) for a in held
                if a.family in (socket.AF_INET, socket.AF_INET6)}
        if addresses & mine or (all(a.is_loopback for a in addresses) and any(a.is_loopback for a in mine)):
            return name
    raise KVTransferError(f"no network interface of this host has the address of {host}")


def _raw(segment: torch.Tensor) -> torch.Tensor:
    """A segment as [blocks, bytes]."""
    return segment.view(torch.uint8).view(segment.shape[0], -1)


def _check(ours: KVEndpoint, peer: KVEndpoint, remote: list[int], local: list[int], num_blocks: int) -> None:
    if peer.segment_bytes != ours.segment_bytes:
        raise KVTransferError(f"peer {peer.name} has blocks of {peer.segment_bytes} bytes, ours are "
                              f"{ours.segment_bytes}")
    if len(remote) != len(local) or not all(0 <= b < num_blocks for b in local):
        raise KVTransferError(f"bad block lists: {len(remote)} remote, {len(local)} local")
