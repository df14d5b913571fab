"""Every message that crosses a process boundary, defined once.

Messages are msgspec Structs tagged by class name and encoded as msgpack behind a one-byte
protocol version. Decoding never raises: bad bytes come back as a `DecodeFailure` that the
receiver counts and drops, so a peer sending garbage cannot take a loop down.
"""

from __future__ import annotations

from typing import Literal, Union

import msgspec

PROTOCOL_VERSION = 1
MAX_SPEC_LEN = 10  # the most speculative tokens a decode step may verify

Role = Literal["colocated", "prefill", "decode"]
FinishReason = Literal["stop", "length", "abort", "error"]


GREEDY_BELOW = 1e-5  # temperatures below this sample greedily


class SamplingParams(msgspec.Struct, frozen=True, gc=False):
    """How to pick tokens; a temperature below `GREEDY_BELOW` means greedy. Tuples and gc=False
    keep thousands of queued requests out of the garbage collector's way."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        """Dividing logits by a tinier temperature overflows to inf: such a request is greedy,
        which is what it asks for (vLLM draws the same line)."""
        return self.temperature < GREEDY_BELOW


class Stage(msgspec.Struct, frozen=True, gc=False):
    """A part of a request's output with a decode objective of its own (say, thinking then
    answering): its first `tokens` output tokens (None: all the rest) at `tpot_ms`."""

    tokens: int | None = None
    tpot_ms: float | None = None


class SLOSpec(msgspec.Struct, frozen=True):
    """A request's latency objectives in milliseconds; None means no objective. `stages`, when
    given, replace the single `tpot_ms` stage by stage. `task` names the task (an agent's loop
    of calls) the request belongs to: once one of its requests misses, the task is late, and its
    later requests come with their first token due at once. `serve_unmeetable`: objectives no
    worker could keep even alone are served best effort rather than refused."""

    slo_class: str | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    stages: list[Stage] = []
    task: str | None = None
    serve_unmeetable: bool = False


class Submit(msgspec.Struct, tag=True):
    """gateway -> planner: a validated, tokenized request."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    slo: SLOSpec
    arrival_time: float
    resume_token_ids: list[int] = []  # output the client already has: continue after it
    after_restart: bool = False  # sent again to a restarted planner: ignored if it has the request already


class Abort(msgspec.Struct, tag=True):
    """gateway -> planner -> worker: stop a request and free its KV blocks."""

    request_id: str
    reason: str = "client disconnected"


class GatewayHello(msgspec.Struct, tag=True):
    """gateway -> planner, before anything else: a gateway with this id started. The requests
    the planner holds from before belong to a gateway that is gone, whose clients are gone
    with it, so they are aborted."""

    gateway_id: str


class Lost(msgspec.Struct, tag=True):
    """planner -> gateway: the worker serving the request died, or the planner preempted it to
    make room for admitted work; the gateway resubmits it with the tokens the client already
    has, so the stream goes on where it stopped. Preemptions do not count as failures."""

    request_id: str
    reason: str
    preempted: bool = False


class Admitted(msgspec.Struct, tag=True):
    """planner -> gateway: the request is scheduled, with its SLOs promised or as best effort."""

    request_id: str
    promised: bool = True


class Parked(msgspec.Struct, tag=True):
    """planner -> gateway: the request waits in the best-effort queue."""

    request_id: str
    reason: str


QUEUE_FULL = "overloaded: the best-effort queue is full"  # why a request is refused for want of queue room


class Refused(msgspec.Struct, tag=True):
    """planner -> gateway: the request will not be served; the client may retry later."""

    request_id: str
    reason: str
    retry_after_s: float


class NewRequest(msgspec.Struct):
    """What a worker needs to know about a request it has not seen before."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    resume_token_ids: list[int] = []  # output produced elsewhere before: prefilled with the prompt


class PrefillChunk(msgspec.Struct):
    """Run the next `num_tokens` prompt tokens of a request."""

    request_id: str
    num_tokens: int


class BatchOrder(msgspec.Struct, tag=True):
    """planner -> worker: one engine step. A role change applies first, then aborts (a
    resubmitted request may reuse an aborted one's id), then imports and new requests. A decode entry produces one token, or
    up to k + 1 when `spec_lens` gives it a speculative length k (absent: 0)."""

    step_id: int
    new_requests: list[NewRequest] = []
    prefill: list[PrefillChunk] = []
    decode: list[str] = []
    aborts: list[str] = []
    spec_lens: dict[str, int] = {}
    kv_imports: list[ExportedRequest] = []  # take these over (read their KV) before the step
    role: Role | None = None  # play this role from this step on


class TokenChunk(msgspec.Struct, tag=True):
    """worker -> gateway: tokens and text for one request since the last chunk."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    index: int = 0  # position of the first token among the request's output tokens


class RequestProgress(msgspec.Struct):
    """What one step did for one request."""

    request_id: str
    num_computed_tokens: int
    num_output_tokens: int
    finish_reason: FinishReason | None = None
    num_proposed: int = 0  # speculative tokens verified in this step
    num_accepted: int = 0  # of which the target accepted


class StepReport(msgspec.Struct, tag=True):
    """worker -> planner: a batch order finished."""

    worker_id: str
    step_id: int
    duration_s: float
    progress: list[RequestProgress]
    out_of_blocks: list[str]
    free_blocks: int
    exports: list[ExportedRequest] = []  # prefills done, held for a decode worker
    failed_imports: list[str] = []  # kv_imports that could not be read
    waited_s: float = 0.0  # how long this order kept the worker waiting with requests under way (`OrderWait`)


class KVEndpoint(msgspec.Struct, frozen=True):
    """How peers read a worker's KV blocks: a NIXL agent (its metadata blob, and where each
    segment of its cache starts) or a ZeroMQ address that serves blocks on request."""

    transport: Literal["nixl", "zmq"]
    name: str
    segment_bytes: list[int]  # a block's bytes in each segment of the cache
    nixl_metadata: bytes = b""
    base_addresses: list[int] = []
    zmq_address: str = ""


class KVFetch(msgspec.Struct, tag=True):
    """peer -> worker (ZeroMQ transport): send me these blocks' bytes, in this order; they must
    be blocks of the request, which the worker exported."""

    request_id: str
    blocks: list[int]


class ExportedRequest(msgspec.Struct):
    """A prefilled request that a prefill worker holds for a decode worker to take over: its
    tokens so far, where its KV blocks are, and its sampler's state, so that greedy and seeded
    sampling continue exactly as on one worker."""

    request_id: str
    token_ids: list[int]  # prompt, then the output so far
    num_prompt: int
    num_computed: int
    params: SamplingParams
    blocks: list[int]  # on the source, covering num_computed tokens
    source: KVEndpoint
    generator_state: bytes = b""


class WorkerHello(msgspec.Struct, tag=True):
    """worker -> planner: a worker is up and ready for orders."""

    worker_id: str
    role: Role
    num_blocks: int
    block_size: int
    max_model_len: int
    pid: int
    speculator: str = "none"  # how it proposes speculative tokens: none, ngram or draft
    kv_endpoint: KVEndpoint | None = None


class Heartbeat(msgspec.Struct, tag=True):
    """worker -> planner: the worker is alive."""

    worker_id: str
    free_blocks: int


class WorkerStatus(msgspec.Struct):
    worker_id: str
    role: Role
    alive: bool
    num_blocks: int
    free_blocks: int
    running: int
    busy_s: float = 0.0  # seconds of steps run so far
    waited_s: float = 0.0  # seconds spent waiting for orders with requests under way


class SpecCounts(msgspec.Struct):
    """Speculative tokens verified and accepted so far, in `steps` verifications, `rejected` of
    which turned a proposal down (the rest accepted every one)."""

    proposed: int = 0
    accepted: int = 0
    steps: int = 0
    rejected: int = 0


class SLOCount(msgspec.Struct):
    """Requests that met all their SLOs, of those finished or refused."""

    met: int = 0
    total: int = 0


class ClusterStatus(msgspec.Struct, tag=True):
    """planner -> gateway: a periodic snapshot for /health and /metrics."""

    workers: list[WorkerStatus]
    waiting: int
    running: int
    generated_tokens: int
    dropped_messages: int
    speculation: dict[str, SpecCounts] = {}  # by SLO class
    handovers: int = 0  # requests moved from a prefill to a decode worker
    parked: int = 0  # waiting in the best-effort queue
    preemptions: int = 0  # running requests preempted for room
    attainment: dict[str, SLOCount] = {}  # by SLO class, as the planner sees token times
    promises: dict[str, SLOCount] = {}  # the same by how the request was served: promised, best_effort, refused
    caught_up: int = 0  # batches that held prefill back for a promised request behind its TPOT
    planner_id: str = ""  # a new one means the planner restarted and holds none of the requests sent before
    queue_room: int = -1  # requests with objectives the best-effort queue still takes; -1: no bound
    # (the gateway refuses the rest itself, counting what it has sent since: `PlannerLink.queue_room`)


Message = Union[
    Submit,
    Abort,
    GatewayHello,
    Admitted,
    KVFetch,
    Lost,
    Parked,
    Refused,
    BatchOrder,
    TokenChunk,
    StepReport,
    WorkerHello,
    Heartbeat,
    ClusterStatus,
]


class DecodeFailure(msgspec.Struct):
    """Bytes that were not a message of this protocol version."""

    error: str


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)
_VERSION_BYTE = bytes([PROTOCOL_VERSION])


def encode(message: Message) -> bytes:
    return _VERSION_BYTE + _encoder.encode(message)


def decode(data: bytes) -> Message | DecodeFailure:
    if not data or data[0] != PROTOCOL_VERSION:
        return DecodeFailure(f"unknown protocol version byte {data[:1]!r}")
    try:
        return _decoder.decode(memoryview(data)[1:])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return DecodeFailure(str(exc))
