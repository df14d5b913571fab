"""`slos-serve bench aiperf`: our load test checked by a client nobody here wrote.

NVIDIA's `aiperf` (from its own virtualenv: `pip install aiperf`) replays the very requests
`bench live` sends, at the same times: each arrival becomes a line of a Mooncake-format trace
carrying its timestamp and its complete request body (same token-id prompt, same max_tokens,
EOS ignored, the same SLO fields), which aiperf sends verbatim on its fixed schedule. Both
tools run against the same server, one after the other; their times to first token and output
throughputs should agree.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.live import prompt_ids, slo_fields
from bench.load_test import Endpoint, Run
from bench.workloads import Arrival


def single_calls(arrivals: list[Arrival]) -> list[Arrival]:
    """The arrivals shifted so that the first goes at 0 s (as aiperf's schedule starts), without
    the later calls of tool loops, which a fixed schedule cannot chain."""
    first = min(a.at for a in arrivals)
    return [dataclasses.replace(a, at=a.at - first, then=None) for a in arrivals]


def trace_lines(arrivals: list[Arrival], model: str, vocab: int) -> list[str]:
    return [json.dumps({"timestamp": round(a.at * 1e3, 3), "payload": {
        "model": model, "prompt": prompt_ids(a, vocab), "max_tokens": a.output_tokens, "temperature": 0.0,
        "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        **slo_fields(a)}}) for a in arrivals]


@dataclass
class Summary:
    """What both tools report, in their own way of measuring it."""

    requests: int
    ttft_ms: dict[str, float]  # avg, p50, p90
    output_tok_s: float  # output tokens over the time from the first request to the last response


def ours(run: Run) -> Summary:
    ttft = [o.ttft_s * 1e3 for o in run.outcomes if o.finished and o.ttft_s is not None]
    return Summary(len(run.outcomes), {"avg": float(np.mean(ttft)), "p50": float(np.percentile(ttft, 50)),
                                       "p90": float(np.percentile(ttft, 90))}, run.output_tokens / run.wall_s)


def run_aiperf(aiperf: Path, endpoint: Endpoint, arrivals: list[Arrival], vocab: int, tokenizer: Path,
               workdir: Path) -> Summary:
    """aiperf's `profile` on the trace, and its own summary of it."""
    trace = workdir / "trace.jsonl"
    trace.write_text("\n".join(trace_lines(arrivals, endpoint.model, vocab)) + "\n")
    artifacts = workdir / "aiperf"
    args = [str(aiperf), "profile", "--url", endpoint.url.removesuffix("/v1"), "--endpoint-type", "completions",
            "--streaming", "--model", endpoint.model, "--api-key", endpoint.api_key, "--tokenizer", str(tokenizer),
            "--input-file", str(trace), "--custom-dataset-type", "mooncake_trace", "--fixed-schedule",
            "--use-server-token-count", "--output-artifact-dir", str(artifacts), "--no-auto-plot",
            "--ui-type", "none"]
    with open(workdir / "aiperf.log", "w") as log:
        subprocess.run(args, check=True, stdout=log, stderr=subprocess.STDOUT)
    found = json.loads(next(artifacts.rglob("profile_export_aiperf.json")).read_text())
    ttft = found["time_to_first_token"]
    return Summary(int(found["request_count"]["avg"]), {k: float(ttft[k]) for k in ("avg", "p50", "p90")},
                   float(found["output_token_throughput"]["avg"]))
