"""Speculative decoding: greedy output is exactly plain greedy output for both proposers at
every speculative length, rejection sampling keeps the target distribution, and the KV blocks
of target and draft are accounted for exactly through many accept/reject cycles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.drive import drive
from engine.engine import Engine
from engine.sampling import probabilities, verify
from engine.speculative import DraftProposer, lookup
from engine_driver import DEVICES
from models.build import Shape, make_random
from shared.messages import BatchOrder, NewRequest, PrefillChunk, SamplingParams

DRAFT_SHAPE = Shape(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vocab=512, max_positions=512)
PROMPT_LENGTHS = [3, 9, 40, 17, 70, 1]
LONG = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def draft_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random(tmp_path_factory.mktemp("draft-model"), DRAFT_SHAPE, seed=1)


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    out = [torch.randint(10, 500, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    out[2] = out[2][:8] * 5  # repetitive, so n-gram lookup finds matches
    return out


@pytest.fixture(scope="module")
def plain(tiny_model: Path) -> dict[str, list[int]]:
    return drive(Engine(tiny_model, kv_cache_mb=4), prompts(), chunk=16, stagger=1, params=LONG)


def check_blocks(engine: Engine) -> None:
    """Every block is owned by exactly one live sequence or free, and each sequence holds
    just the blocks of its computed tokens; the same for the draft's cache."""
    kv = engine.kv
    owned = [b for s in engine.seqs.values() for b in s.blocks]
    assert len(owned) == len(set(owned)) and len(owned) + kv.allocator.num_free == kv.allocator.num_blocks
    for s in engine.seqs.values():
        assert len(s.blocks) == kv.blocks_needed(s.num_computed), s.request_id
    if isinstance(engine.proposer, DraftProposer):
        dkv = engine.proposer.runner.kv
        states = engine.proposer.states
        owned = [b for st in states.values() for b in st.blocks]
        assert len(owned) + dkv.allocator.num_free == dkv.allocator.num_blocks
        assert set(states) <= set(engine.seqs)
        for rid, st in states.items():
            assert st.computed <= engine.seqs[rid].num_computed
            assert len(st.blocks) == dkv.blocks_needed(st.computed)


def all_free(engine: Engine) -> bool:
    free = engine.num_free_blocks == engine.kv.allocator.num_blocks
    if isinstance(engine.proposer, DraftProposer):
        dkv = engine.proposer.runner.kv.allocator
        free = free and dkv.num_free == dkv.num_blocks and not engine.proposer.states
    return free


def test_lookup_continues_the_latest_longest_match() -> None:
    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], k=3, max_n=3) == [7, 5, 1]
    assert lookup([4, 5, 6, 4, 5], k=5, max_n=3) == [6, 4, 5]
    assert lookup([1, 2, 3], k=2, max_n=3) == []
    assert lookup([8, 1, 8], k=4, max_n=3) == [1, 8]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("speculator", ["ngram", "draft", "self-draft"])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_greedy_speculation_equals_plain_greedy(tiny_model: Path, draft_model: Path, plain: dict[str, list[int]],
                                                speculator: str, k: int, device: str) -> None:
    """Batched with other requests' prefill chunks; each request speculates k or fewer tokens
    (some steps none), and with the target as its own draft nearly everything is accepted."""
    draft = {"ngram": None, "draft": draft_model, "self-draft": tiny_model}[speculator]
    engine = Engine(tiny_model, kv_cache_mb=4, speculator="ngram" if draft is None else "draft", draft_dir=draft,
                    device=device, dtype=torch.float32)
    stats = {"proposed": 0, "accepted": 0}
    step_outputs = engine.step

    def counting_step(order: BatchOrder):  # noqa: ANN202
        result = step_outputs(order)
        for out in result.outputs:
            stats["proposed"] += out.num_proposed
            stats["accepted"] += out.num_accepted
        return result

    engine.step = counting_step  # type: ignore[method-assign]
    got = drive(engine, prompts(), chunk=16, stagger=1, params=LONG,
                spec_len=lambda i, step: (k + i + step) % (k + 1), after_step=check_blocks)
    assert got == plain
    assert all_free(engine)
    assert stats["proposed"] > 0
    if speculator == "self-draft":
        assert stats["accepted"] >= 0.9 * stats["proposed"]


def test_speculation_respects_max_tokens_and_stop_tokens(tiny_model: Path) -> None:
    engine = Engine(tiny_model, kv_cache_mb=4, speculator="draft", draft_dir=tiny_model)
    reference = drive(Engine(tiny_model, kv_cache_mb=4), prompts()[:2], chunk=64, stagger=0,
                      params=SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True))
    got = drive(engine, prompts()[:2], chunk=64, stagger=0, spec_len=lambda i, step: 8,
                params=SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True))
    assert got == reference and all(len(t) == 7 for t in got.values())
    stop = reference["r0"][3]
    got = drive(engine, prompts()[:1], chunk=64, stagger=0, spec_len=lambda i, step: 8,
                params=SamplingParams(max_tokens=7, temperature=0.0, stop_token_ids=[stop], ignore_eos=True))
    assert got["r0"] == reference["r0"][: reference["r0"].index(stop) + 1]
    assert all_free(engine)


def test_kv_accounting_is_exact_under_sampled_speculation(tiny_model: Path, draft_model: Path) -> None:
    """Many accept/reject cycles with sampling, a cache small enough that proposals
    sometimes do not fit, and an abort in the middle."""
    engine = Engine(tiny_model, num_kv_blocks=40, block_size=4, speculator="draft", draft_dir=draft_model)
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=3, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    reqs = [torch.randint(10, 500, (n,), generator=gen).tolist() for n in (5, 12, 20, 7)]
    for i, p in enumerate(reqs):
        engine.step(BatchOrder(step_id=0, new_requests=[NewRequest(f"r{i}", p, params)],
                               prefill=[PrefillChunk(f"r{i}", len(p))]))
    proposed = accepted = 0
    for step in range(1, 60):
        live = sorted(engine.seqs)
        if not live:
            break
        aborts = ["r1"] if step == 5 else []
        result = engine.step(BatchOrder(step_id=step, decode=live, aborts=aborts,
                                        spec_lens={rid: 1 + (step + j) % 6 for j, rid in enumerate(live)}))
        proposed += sum(o.num_proposed for o in result.outputs)
        accepted += sum(o.num_accepted for o in result.outputs)
        check_blocks(engine)
    for rid in list(engine.seqs):
        engine.abort(rid)
    assert all_free(engine)
    assert proposed > 50 and 0 < accepted < proposed


VOCAB = 6
CHI2_DF5_P001 = 20.515  # chi-square critical value, 5 degrees of freedom, p = 0.001


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was produced"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("proposer", ["sampled draft", "deterministic"])
def test_rejection_sampling_keeps_the_target_distribution(proposer: str) -> None:
    """The first token out of `verify` follows the target's distribution p whatever the
    draft's q, and the second follows p at the next position when the first was accepted.
    20,000 draws, chi-square at p = 0.001 (fixed seed, so the test is deterministic)."""
    params = SamplingParams(temperature=0.8, top_k=5, seed=11)
    target_logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0], [0.0, 1.5, -0.5, 2.0, 0.3, 1.0],
                                  [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    draft_logits = torch.tensor([[0.0, 2.0, 1.0, -1.0, 0.5, 1.0], [1.0, 0.0, 2.0, 0.0, -1.0, 0.5]])
    p = probabilities(target_logits, params)
    q = torch.softmax(draft_logits, dim=-1)
    gen = torch.Generator().manual_seed(params.seed)
    first = torch.zeros(VOCAB)
    second = torch.zeros(VOCAB)
    n = 20_000
    for i in range(n):
        if proposer == "deterministic":
            draft, probs = [1, 3 if i % 2 else 2], None
        else:
            draft, probs = [int(torch.multinomial(q[j], 1, generator=gen)) for j in range(2)], q
        out = verify(target_logits, draft, probs, params, gen)
        first[out[0]] += 1
        if out[0] == draft[0] and len(out) > 1:
            second[out[1]] += 1
    assert chi_square(first, p[0]) < CHI2_DF5_P001
    if proposer == "sampled draft":  # given acceptance, the next draft was drawn independently
        assert chi_square(second, p[1]) < CHI2_DF5_P001


def test_greedy_verify_accepts_the_agreeing_prefix() -> None:
    logits = torch.zeros(4, VOCAB)
    logits[0, 2] = logits[1, 4] = logits[2, 1] = logits[3, 5] = 1.0
    greedy = SamplingParams(temperature=0.0)
    assert verify(logits, [2, 4, 1], None, greedy, None) == [2, 4, 1, 5]
    assert verify(logits, [2, 3, 1], None, greedy, None) == [2, 4]
    assert verify(logits[:1], [], None, greedy, None) == [2]
