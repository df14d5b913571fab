"""Drives `VLLMEngine` the way the planner would (`bench.drive`), in a process of its own: vLLM
binds the threads of the process it runs in, which other tests must not inherit.

    python vllm_driver.py '{"model": DIR, "prompts": [[1, 2]], "chunk": 7, "stagger": 1, "max_tokens": 12}'

With `"spec_len": k`, every decode may speculate k tokens (vLLM's n-gram proposals). With
`"handover": "nixl"` (or "zmq"), a second engine decodes what the first prefilled, each
request's KV read across by that transport. Prints
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
    from engine.kv_transfer import make_transport
    from engine.vllm_engine import VLLMEngine
    from shared.bus import Bus
    from shared.messages import BatchOrder, SamplingParams

    args = json.loads(sys.argv[1])
    spec_len = args.get("spec_len", 0)
    engine = VLLMEngine(Path(args["model"]), kv_cache_mb=64, speculator="ngram" if spec_len else "none")
    engines = [engine]
    hand_over, closing = None, []
    if args.get("handover"):
        decoder = VLLMEngine(Path(args["model"]), kv_cache_mb=64)
        engines.append(decoder)
        bus = Bus("test-cluster-secret-0123456789")
        source, reader = (make_transport(args["handover"], name, e.kv_segments, bus)
                          for name, e in (("prefill", engine), ("decode", decoder)))
        closing = [source.close, reader.close, bus.close]  # else NIXL's threads outlive the interpreter

        def hand_over(rid: str) -> None:
            export = engine.export(rid, source.endpoint)
            source.offer(rid, export.blocks)
            decoder.import_request(export, reader)
            source.withdraw(rid)
            engine.abort(rid)

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
                   after_step=check, spec_len=lambda i, step: spec_len,
                   decoder=engines[-1] if hand_over else None, hand_over=hand_over or (lambda rid: None))
    print(json.dumps({"tokens": [tokens[f"r{i}"] for i in range(len(args["prompts"]))], "differing": differing,
                      **speculated, "free_blocks": sum(e.num_free_blocks for e in engines),
                      "num_blocks": sum(e.num_blocks for e in engines), "held": sum(len(e.seqs) for e in engines)}),
          flush=True)
    for close in closing:
        close()


if __name__ == "__main__":
    main()
