"""Drives `VLLMEngine` the way the planner would (`bench.drive`), in a process of its own: vLLM
binds the threads of the process it runs in, which other tests must not inherit.

    python vllm_driver.py '{"model": DIR, "prompts": [[1, 2]], "chunk": 7, "stagger": 1, "max_tokens": 12}'

With `"spec_len": k`, every decode may speculate k tokens (vLLM's n-gram proposals). Prints
one JSON object: each prompt's tokens, the steps in which vLLM ran other token counts than
ordered, the speculative tokens proposed and accepted, and the KV blocks free at the end
against those there are.
"""

import json
import sys
from pathlib import Path


def main() -> None:
    from bench.drive import drive
    from engine.engine import StepResult
    from engine.vllm_engine import VLLMEngine
    from shared.messages import BatchOrder, SamplingParams

    args = json.loads(sys.argv[1])
    spec_len = args.get("spec_len", 0)
    engine = VLLMEngine(Path(args["model"]), kv_cache_mb=64, speculator="ngram" if spec_len else "none")
    differing: list[dict[str, tuple[int, int]]] = []
    speculated = {"proposed": 0, "accepted": 0}
    step = engine.step

    def counted(order: BatchOrder) -> StepResult:
        result = step(order)
        speculated["proposed"] += sum(o.num_proposed for o in result.outputs)
        speculated["accepted"] += sum(o.num_accepted for o in result.outputs)
        return result

    engine.step = counted  # type: ignore[method-assign]

    def check(engine: VLLMEngine) -> None:
        granted, ran = engine.scheduler.granted, engine.scheduler.scheduled
        if granted != ran:
            differing.append({rid: (granted.get(rid, 0), ran.get(rid, 0)) for rid in granted.keys() | ran.keys()})

    params = SamplingParams(max_tokens=args["max_tokens"], temperature=0.0, ignore_eos=True)
    tokens = drive(engine, args["prompts"], chunk=args["chunk"], stagger=args["stagger"], params=params,
                   after_step=check, spec_len=lambda i, step: spec_len)
    print(json.dumps({"tokens": [tokens[f"r{i}"] for i in range(len(args["prompts"]))], "differing": differing,
                      **speculated, "free_blocks": engine.num_free_blocks, "num_blocks": engine.num_blocks,
                      "held": len(engine.seqs)}), flush=True)


if __name__ == "__main__":
    main()
