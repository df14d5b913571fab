"""Greedy tokens of real vLLM for given prompts, to compare with the engine's token for token.

Run by the vLLM virtualenv's Python (never imported by slos-serve):
    python vllm_greedy.py '{"model": DIR, "prompts": [[1, 2, 3]], "max_tokens": 16, "dtype": "float32"}'
(with `"enforce_eager": true`, vLLM skips compiling: the same tokens, a minute sooner on CPU).
Prints one JSON line, its last: the generated token ids of each prompt.
"""

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    args = json.loads(sys.argv[1])
    # an explicit KV size: else vLLM's CPU backend wants 90 % of the machine's memory free
    llm = LLM(model=args["model"], dtype=args["dtype"], seed=0, max_model_len=2048, kv_cache_memory_bytes=2**30,
              enforce_eager=args.get("enforce_eager", False))
    params = SamplingParams(max_tokens=args["max_tokens"], temperature=0.0, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in args["prompts"]], params, use_tqdm=False)
    print(json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)


if __name__ == "__main__":
    main()
