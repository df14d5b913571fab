"""Engine throughput of real vLLM, measured the way `bench/engine_bench.py` measures ours.

Run by the vLLM virtualenv's Python (never imported by slos-serve):
    python vllm_peer.py '{"model": DIR, "batch_sizes": [1, 8], "prompt_len": 256, "decode_steps": 32}'
Optional: "dtype" (default vLLM's choice), "enforce_eager" (default false: vLLM compiles).
Prefix caching is off: every repetition sends the same prompts, which a cache would not
prefill again. Prints one JSON line per batch size.
"""

import json
import sys
import time


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    args = json.loads(sys.argv[1])
    llm = LLM(model=args["model"], max_model_len=args["max_model_len"], seed=0,
              max_num_seqs=max(args["batch_sizes"]),
              max_num_batched_tokens=max(args["batch_sizes"]) * args["prompt_len"], enable_prefix_caching=False,
              dtype=args.get("dtype", "auto"), enforce_eager=args.get("enforce_eager", False))
    prefill_only = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    full = SamplingParams(max_tokens=args["decode_steps"] + 1, temperature=0.0, ignore_eos=True)
    for batch in args["batch_sizes"]:
        prompts = [TokensPrompt(prompt_token_ids=[10 + (7 * i + j) % 1000 for j in range(args["prompt_len"])])
                   for i in range(batch)]
        llm.generate(prompts, full, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        llm.generate(prompts, prefill_only, use_tqdm=False)
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        llm.generate(prompts, full, use_tqdm=False)
        decode_s = time.perf_counter() - start - prefill_s
        print(json.dumps({
            "batch": batch,
            "dtype": str(llm.llm_engine.model_config.dtype).removeprefix("torch."),
            "prefill_tok_s": batch * args["prompt_len"] / prefill_s,
            "decode_tok_s": batch * args["decode_steps"] / decode_s,
        }), flush=True)


if __name__ == "__main__":
    main()
