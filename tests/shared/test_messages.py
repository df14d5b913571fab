from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.messages import (
    PROTOCOL_VERSION,
    Abort,
    Admitted,
    BatchOrder,
    ClusterStatus,
    DecodeFailure,
    ExportedRequest,
    GatewayHello,
    Heartbeat,
    KVEndpoint,
    KVFetch,
    Lost,
    NewRequest,
    Parked,
    PrefillChunk,
    Refused,
    RequestProgress,
    SamplingParams,
    SLOSpec,
    SpecCounts,
    StepReport,
    Submit,
    TokenChunk,
    WorkerHello,
    WorkerStatus,
    decode,
    encode,
)

PARAMS = SamplingParams(max_tokens=7, temperature=0.5, top_k=3, top_p=0.9, seed=1, stop=("\n",),
                        stop_token_ids=(2,), ignore_eos=True)
ENDPOINT = KVEndpoint("nixl", "w0", [4096], b"\x00\x01meta", [140_000_000], "")
EXPORT = ExportedRequest("r1", [1, 2, 3, 9], 3, 3, PARAMS, [4, 5], ENDPOINT, b"\x07" * 16)
EXAMPLES = [
    Submit("r1", [1, 2, 3], PARAMS, SLOSpec("coding", 100.0, None), 12.5, [4, 5]),
    Submit("r1", [1], PARAMS, SLOSpec(), 1.0, [4], after_restart=True),
    Abort("r1", "client disconnected"),
    GatewayHello("0a1b2c3d"),
    Admitted("r1"),
    Lost("r1", "worker w1 died"),
    Parked("r1", "queue full"),
    Refused("r1", "overloaded", 2.0),
    BatchOrder(3, [NewRequest("r1", [1, 2], PARAMS)], [PrefillChunk("r1", 2)], ["r0"], ["r9"], {"r0": 3},
               [EXPORT]),
    TokenChunk("r1", [5, 6], "hi", "stop", 3, 7),
    StepReport("w0", 3, 0.01, [RequestProgress("r1", 3, 1, None, 4, 2)], ["r2"], 10, [EXPORT], ["r3"]),
    WorkerHello("w0", "prefill", 100, 16, 2048, 42, "ngram", ENDPOINT),
    KVFetch("r1", [3, 1, 2]),
    Heartbeat("w0", 99),
    ClusterStatus([WorkerStatus("w0", "colocated", True, 100, 90, 2)], 1, 2, 30, 0,
                  {"coding": SpecCounts(10, 7)}, planner_id="9f8e"),
]


def test_every_message_type_is_covered() -> None:
    from shared.messages import Message

    assert {type(m) for m in EXAMPLES} == set(Message.__args__)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: msgspec.Struct) -> None:
    data = encode(msg)
    assert data[0] == PROTOCOL_VERSION
    assert decode(data) == msg


@pytest.mark.parametrize("data", [
    b"",
    b"\x00",
    bytes([PROTOCOL_VERSION + 1]) + encode(Admitted("r"))[1:],
    bytes([PROTOCOL_VERSION]) + b"\xc1garbage",
    bytes([PROTOCOL_VERSION]) + msgspec.msgpack.encode({"type": "Admitted"}),
    bytes([PROTOCOL_VERSION]) + msgspec.msgpack.encode({"type": "Nope", "request_id": "r"}),
    bytes([PROTOCOL_VERSION]) + msgspec.msgpack.encode({"type": "Heartbeat", "worker_id": 3, "free_blocks": "x"}),
])
def test_bad_bytes_are_a_value_not_an_exception(data: bytes) -> None:
    assert isinstance(decode(data), DecodeFailure)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data: bytes) -> None:
    decode(data)
    decode(bytes([PROTOCOL_VERSION]) + data)
