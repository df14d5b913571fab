"""The trace aiperf replays: the very requests `bench live` sends, at the same times."""

from __future__ import annotations

import json

from bench.aiperf_check import single_calls, trace_lines
from bench.live import prompt_ids
from bench.workloads import Arrival


def test_the_trace_carries_each_request_body_at_its_time() -> None:
    follow = Arrival("a-1", 0.3, 5, 4, "tool_calling")
    arrivals = single_calls([Arrival("a", 2.0, 12, 7, "coding", ttft_ms=900.0, tpot_ms=50.0, then=follow),
                             Arrival("b", 2.5, 3, 9, "chatbot")])
    assert [(a.at, a.then) for a in arrivals] == [(0.0, None), (0.5, None)]
    lines = [json.loads(line) for line in trace_lines(arrivals, "m", 500)]
    assert [line["timestamp"] for line in lines] == [0.0, 500.0]
    body = lines[0]["payload"]
    assert body["prompt"] == prompt_ids(arrivals[0], 500) and len(body["prompt"]) == 12
    assert (body["model"], body["max_tokens"], body["stream"], body["ignore_eos"]) == ("m", 7, True, True)
    assert (body["slo_class"], body["ttft_ms"], body["tpot_ms"]) == ("coding", 900.0, 50.0)
    assert "ttft_ms" not in lines[1]["payload"]
