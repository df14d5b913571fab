"""The worker's own bookkeeping, without processes: how long orders keep it waiting."""

from __future__ import annotations

from engine.engine import RequestOutput, StepResult
from shared.messages import BatchOrder, ExportedRequest, KVEndpoint, PrefillChunk, SamplingParams
from workers.worker import OrderWait, Step, messages_for


def out(rid: str, finish: str | None = None) -> RequestOutput:
    return RequestOutput(rid, [1], "", 4, 5, 1, finish)  # type: ignore[arg-type]


def test_a_wait_counts_only_when_the_order_continues_a_request_under_way() -> None:
    wait = OrderWait()
    wait.reported(Step(StepResult([out("a"), out("b", "stop")], [], 0.02)), at=10.0)
    assert wait.waited(BatchOrder(step_id=2, decode=["a"]), at=10.25) == 0.25
    assert wait.waited(BatchOrder(step_id=2, prefill=[PrefillChunk("a", 16)]), at=10.5) == 0.5
    assert wait.waited(BatchOrder(step_id=2, decode=["b"]), at=12.0) == 0.0  # b had finished
    assert wait.waited(BatchOrder(step_id=2, prefill=[PrefillChunk("c", 16)]), at=12.0) == 0.0


def test_an_exported_request_is_not_waited_for() -> None:
    wait = OrderWait()
    endpoint = KVEndpoint("zmq", "p0", [64])
    export = ExportedRequest("a", [1, 2, 3], 2, 2, SamplingParams(), [0], endpoint)
    wait.reported(Step(StepResult([out("a")], [], 0.02), exports=[export]), at=1.0)
    assert wait.waited(BatchOrder(step_id=2, decode=["a"]), at=3.0) == 0.0


def test_the_report_carries_the_wait() -> None:
    order = BatchOrder(step_id=7, decode=["a"])
    _, report = messages_for("w0", order, Step(StepResult([out("a")], [], 0.02)), free=9, waited_s=0.003)
    assert (report.step_id, report.duration_s, report.waited_s) == (7, 0.02, 0.003)
