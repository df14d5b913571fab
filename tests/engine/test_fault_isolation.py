"""One bad request ends alone with an error, its blocks freed, while the rest of its batch goes
on with exactly the tokens it would have had. The faults are injected (none of these fails on
valid input any more), except the prompt too long for the context, which is real."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import engine.engine as engine_module
from engine.engine import Engine
from engine.model_runner import Work
from shared.messages import BatchOrder, NewRequest, PrefillChunk, SamplingParams

POISON = 7  # a token only the bad request's prompt holds
GOOD = [[11 + (5 * i + j) % 400 for j in range(10 + 6 * i)] for i in range(3)]
BAD = [20, 21, POISON, 22, 23]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
BAD_PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, seed=13)


def run(engine: Engine, bad_prompt: list[int] | None) -> dict[str, tuple[list[int], str | None]]:
    """Every request joins in the first step (prompt whole), then decodes together to the end;
    each request's tokens and how it ended."""
    new = [NewRequest(f"g{i}", p, GREEDY) for i, p in enumerate(GOOD)]
    if bad_prompt is not None:
        new.append(NewRequest("bad", bad_prompt, BAD_PARAMS))
    got: dict[str, tuple[list[int], str | None]] = {r.request_id: ([], None) for r in new}
    order = BatchOrder(0, new, [PrefillChunk(r.request_id, len(r.prompt_token_ids)) for r in new])
    for step in range(1, 20):
        for out in engine.step(order).outputs:
            got[out.request_id] = (got[out.request_id][0] + out.new_token_ids, out.finish_reason)
        live = [rid for rid, (_, finish) in got.items() if finish is None]
        if not live:
            break
        order = BatchOrder(step, decode=live)
    assert not engine.seqs and engine.num_free_blocks == engine.num_blocks
    return got


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> dict[str, tuple[list[int], str | None]]:
    return run(Engine(tiny_model, kv_cache_mb=4), None)


def forward_fails_with_poison(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    forward = engine.runner.forward

    def failing(work: list[Work]):  # noqa: ANN202
        if any(POISON in w.tokens for w in work):
            raise RuntimeError("injected: the forward pass failed")
        return forward(work)

    monkeypatch.setattr(engine.runner, "forward", failing)


def sampling_fails_for_seed_13(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    sample = engine_module.sample

    def failing(logits, params, generators):  # noqa: ANN001, ANN202
        if any(p.seed == 13 for p in params):
            raise RuntimeError("injected: sampling failed")
        return sample(logits, params, generators)

    monkeypatch.setattr(engine_module, "sample", failing)


def advancing_fails_for_bad(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    append = engine_module.append_until_finished

    def failing(seq, tokens, eos, max_len):  # noqa: ANN001, ANN202
        if seq.request_id == "bad":
            raise RuntimeError("injected: detokenizing failed")
        return append(seq, tokens, eos, max_len)

    monkeypatch.setattr(engine_module, "append_until_finished", failing)


@pytest.mark.parametrize("fault", [forward_fails_with_poison, sampling_fails_for_seed_13, advancing_fails_for_bad],
                         ids=["forward", "sampling", "advancing"])
def test_a_failing_request_ends_alone(tiny_model: Path, reference: dict, monkeypatch: pytest.MonkeyPatch,
                                      fault: Callable[[Engine, pytest.MonkeyPatch], None]) -> None:
    engine = Engine(tiny_model, kv_cache_mb=4)
    fault(engine, monkeypatch)
    got = run(engine, BAD)
    assert got.pop("bad") == ([], "error")
    assert got == reference


def test_a_request_that_cannot_be_added_ends_alone(tiny_model: Path, reference: dict) -> None:
    engine = Engine(tiny_model, kv_cache_mb=4)
    got = run(engine, [30] * engine.max_model_len)  # longer than the context
    assert got.pop("bad") == ([], "error")
    assert got == reference
