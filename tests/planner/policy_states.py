"""Hand-built planner states for the policy tests: workers that run as an A100-like profile
says, requests decoding or waiting, and what a step of them costs by that profile."""

from __future__ import annotations

from planner.calibration import StepFit
from planner.state import PlannerState, RequestState, WorkerState
from shared.messages import SamplingParams
from shared.roofline import Batches, ModelShape, Profile, RooflineParams
from shared.slo import SLOTarget

SHAPE = ModelShape("m", layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=11008, vocab=32000)
GPU = Profile(SHAPE, "gpu", RooflineParams(0.002, 0.0, 1 / 200e12, 1 / 1.5e12, "max"))
TIGHT = SLOTarget(ttft_ms=1000.0, tpot_ms=30.0)
LOOSE = SLOTarget(ttft_ms=5000.0, tpot_ms=200.0)


def worker(wid: str, role: str = "colocated", blocks: int = 4000, speculator: str = "none") -> WorkerState:
    """A worker whose steps are known to run as the profile says (no margin)."""
    return WorkerState(wid, role, blocks, 16, 8192, last_seen=0.0, speculator=speculator,  # type: ignore[arg-type]
                       fit=StepFit(margin=1.0))


def request(rid: str, prompt: int, slo: SLOTarget = LOOSE, arrival: float = 0.0, max_tokens: int = 128,
            slo_class: str | None = None) -> RequestState:
    return RequestState(rid, [1] * prompt, SamplingParams(max_tokens=max_tokens), slo, arrival, slo_class,
                        expected_output=max_tokens)


def state(workers: list[WorkerState], waiting: list[RequestState] = (), running: dict[str, list[RequestState]] = {},
          ) -> PlannerState:
    s = PlannerState()
    s.workers = {w.worker_id: w for w in workers}
    for r in waiting:
        s.requests[r.request_id] = r
        s.waiting.add(r)
    for wid, reqs in running.items():
        w = s.workers[wid]
        for r in reqs:
            r.worker_id, r.phase, r.num_computed, r.num_output = wid, "decode", r.prompt_len, 1
            r.reserved_blocks = w.blocks_for(r.tokens_on(w.role))
            w.reserved_blocks += r.reserved_blocks
            w.requests.append(r.request_id)
            s.requests[r.request_id] = r
    return s


def step_time(s: PlannerState, prefill: list[tuple[str, int]], decode: list[str], spec: dict[str, int]) -> float:
    contexts = [s.requests[r].prompt_len + s.requests[r].num_output for r in decode]
    verify = [1 + spec.get(r, 0) for r in decode]
    pre = [(s.requests[r].num_computed, n) for r, n in prefill]
    return float(GPU.predict(Batches.of(
        prefill_tokens=sum(n for _, n in pre), decode_seqs=len(decode), verify_len=sum(verify) / max(1, len(decode)),
        kv_read=sum(contexts) + sum(c + n for c, n in pre), num_seqs=len(decode) + len(pre),
        attention_pairs=sum(v * c for v, c in zip(verify, contexts)) + sum(n * (c + n / 2) for c, n in pre))))
