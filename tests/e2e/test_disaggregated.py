"""Disaggregated serving: prefill workers hand their requests' KV to decode workers over NIXL
or ZeroMQ, and the text is the same as colocated serving and as one engine, for greedy and
seeded sampling, with every block freed in both pools."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from engine.engine import Engine
from server_process import IGNORE_EOS, Server, generate, start, wait_idle
from shared.messages import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serial")]

WORDS = "queue worker token block stream prefill decode cache planner gateway".split()
PROMPTS = [" ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(1 + i % 7)) * (1 + i % 3) for i in range(32)]
MAX_TOKENS = 12


def params(i: int) -> SamplingParams:
    """Even requests greedy, odd ones sampled with their own seed."""
    if i % 2 == 0:
        return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.95, seed=i, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> list[str]:
    """One engine doing everything, one request at a time; its greedy texts are those of
    `transformers`."""
    engine = Engine(tiny_model, kv_cache_mb=4)
    hf = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    texts = []
    for i, prompt in enumerate(PROMPTS):
        tokens, text = generate(engine, prompt, params(i))
        texts.append(text)
        if params(i).temperature == 0:
            ids = engine.tokenizer(prompt)["input_ids"]
            with torch.no_grad():
                hf_ids = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                     min_new_tokens=MAX_TOKENS)[0, len(ids):]
            assert tokens == hf_ids.tolist(), i
    return texts


def serve_all(server: Server) -> list[str]:
    client = server.client()

    def one(i: int) -> str:
        p = params(i)
        chunks = client.completions.create(model=server.model, prompt=PROMPTS[i], max_tokens=MAX_TOKENS,
                                           temperature=p.temperature, top_p=p.top_p, seed=p.seed, stream=True,
                                           extra_body=IGNORE_EOS)
        return "".join(c.choices[0].text for c in chunks)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, range(len(PROMPTS))))


@pytest.mark.parametrize("args,handovers", [
    (("--mode", "disaggregated", "--prefill", "2", "--decode", "2", "--kv-transport", "nixl"), 32),
    (("--mode", "disaggregated", "--prefill", "1", "--decode", "1", "--kv-transport", "zmq"), 32),
    (("--mode", "colocated", "--workers", "2"), 0),
], ids=["nixl-2x2", "zmq-1x1", "colocated"])
def test_32_requests_equal_one_engine(tiny_model: Path, tmp_path: Path, reference: list[str],
                                      args: tuple[str, ...], handovers: int) -> None:
    if "nixl" in args:
        pytest.importorskip("nixl._api")
    server = start(tiny_model, tmp_path, workers=1, extra=args)
    try:
        assert serve_all(server) == reference
        metrics = wait_idle(server, min_generated=len(PROMPTS) * MAX_TOKENS)
        assert metrics["slos_kv_handovers_total"] == handovers
    finally:
        server.stop()
