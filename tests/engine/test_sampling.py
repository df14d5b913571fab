from __future__ import annotations

from pathlib import Path

import torch

from engine.engine import Engine
from engine.sampling import filter_logits, make_generator, sample
from shared.messages import BatchOrder, NewRequest, PrefillChunk, SamplingParams


def test_top_k_and_top_p_keep_only_the_head() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=1.0)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=0.7)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=0.4)).tolist() == [True, False, False, False]


def test_sampling_follows_the_distribution_and_the_seed() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = torch.log(probs).expand(4000, 4)
    params = SamplingParams(temperature=1.0, seed=3)
    draws = sample(logits, [params] * 4000, [make_generator(params, "cpu")] * 4000)
    freq = torch.bincount(torch.tensor(draws), minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)
    again = sample(logits, [params] * 4000, [make_generator(params, "cpu")] * 4000)
    assert draws == again


def test_greedy_ignores_generators() -> None:
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 0.0, 0.0]])
    greedy = SamplingParams(temperature=0.0)
    assert sample(logits, [greedy, greedy], [None, None]) == [1, 0]


def _run(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[int], str, str]:
    engine.step(BatchOrder(step_id=0, new_requests=[NewRequest("r", prompt, params)]))
    result = engine.step(BatchOrder(step_id=1, prefill=[PrefillChunk("r", len(prompt))]))
    tokens, text = [], ""
    for step in range(2, 200):
        out = result.outputs[0]
        tokens += out.new_token_ids
        text += out.text
        if out.finish_reason:
            return tokens, text, out.finish_reason
        result = engine.step(BatchOrder(step_id=step, decode=["r"]))
    raise AssertionError("never finished")


def test_stop_strings_eos_and_max_tokens(tiny_model: Path) -> None:
    engine = Engine(tiny_model, kv_cache_mb=2)
    prompt = engine.tokenizer("The quick brown fox")["input_ids"]
    tokens, text, reason = _run(engine, prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    assert reason == "length" and len(tokens) == 40
    assert text == engine.tokenizer.decode(tokens, skip_special_tokens=True)
    stop = text[10:13]
    _, stopped, reason = _run(engine, prompt, SamplingParams(max_tokens=40, temperature=0.0, stop=(stop,),
                                                             ignore_eos=True))
    assert reason == "stop" and stopped == text[: text.index(stop)]
    stop_id = tokens[5]
    stopped_tokens, _, reason = _run(engine, prompt, SamplingParams(max_tokens=40, temperature=0.0,
                                                                    stop_token_ids=[stop_id]))
    assert reason == "stop" and stopped_tokens == tokens[: tokens.index(stop_id) + 1]
    assert engine.num_free_blocks == engine.kv.allocator.num_blocks


def test_a_top_p_that_rounds_to_zero_keeps_the_likeliest_token() -> None:
    """5e-324 is a valid top_p in float64 and 0 in float32: it must not mask every token."""
    logits = torch.tensor([1.0, 3.0, 2.0])
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=5e-324)).tolist() == [False, True, False]
    params = SamplingParams(temperature=1.0, top_p=5e-324, seed=1)
    assert sample(logits[None], [params], [make_generator(params, "cpu")]) == [1]


def test_a_vanishing_temperature_is_greedy() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    params = SamplingParams(temperature=1e-300, seed=1)
    assert params.greedy and make_generator(params, "cpu") is None
    assert sample(logits, [params], [None]) == [1]
