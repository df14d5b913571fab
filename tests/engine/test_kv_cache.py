from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine.engine import Engine
from engine.kv_cache import BlockAllocator, OutOfKVBlocks
from shared.messages import BatchOrder, NewRequest, PrefillChunk, SamplingParams


def test_allocator_refuses_without_allocating_anything() -> None:
    alloc = BlockAllocator(4)
    held = alloc.allocate(3)
    with pytest.raises(OutOfKVBlocks):
        alloc.allocate(2)
    assert alloc.num_free == 1
    alloc.free(held)
    assert alloc.num_free == 4


def test_allocator_reference_counts() -> None:
    alloc = BlockAllocator(2)
    blocks = alloc.allocate(1)
    alloc.share(blocks)
    alloc.free(blocks)
    assert alloc.num_free == 1
    alloc.free(blocks)
    assert alloc.num_free == 2
    with pytest.raises(ValueError):
        alloc.free(blocks)
    with pytest.raises(ValueError):
        alloc.share(blocks)


def test_no_leak_after_many_requests_with_aborts(tiny_model: Path) -> None:
    engine = Engine(tiny_model, block_size=4, kv_cache_mb=2)
    total = engine.kv.allocator.num_blocks
    rng = random.Random(0)
    live: dict[str, int] = {}
    for step in range(300):
        order = BatchOrder(step_id=step)
        if live and rng.random() < 0.1:  # aborts run before an order's new requests
            victim = rng.choice(sorted(live))
            order.aborts.append(victim)
            live.pop(victim)
        if len(live) < 6:
            rid = f"r{step}"
            n = rng.randint(1, 40)
            params = SamplingParams(max_tokens=rng.randint(1, 12), temperature=0.0, ignore_eos=True)
            order.new_requests.append(NewRequest(rid, [rng.randint(10, 400) for _ in range(n)], params))
            live[rid] = n
        for rid, left in list(live.items()):
            if left > 0:
                chunk = min(left, rng.randint(1, 16))
                order.prefill.append(PrefillChunk(rid, chunk))
                live[rid] = left - chunk
            else:
                order.decode.append(rid)
        for out in engine.step(order).outputs:
            if out.finish_reason:
                live.pop(out.request_id)
    for rid in list(live):
        assert engine.abort(rid)
    assert not engine.seqs
    assert engine.num_free_blocks == total


def test_out_of_blocks_is_reported_and_harms_no_one(tiny_model: Path) -> None:
    engine = Engine(tiny_model, block_size=16, num_kv_blocks=4)
    greedy = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    big = NewRequest("big", [11] * 48, greedy)
    small = NewRequest("small", [12] * 40, greedy)
    result = engine.step(BatchOrder(step_id=0, new_requests=[big],
                                    prefill=[PrefillChunk("big", len(big.prompt_token_ids))]))
    assert result.out_of_blocks == []
    result = engine.step(BatchOrder(step_id=1, new_requests=[small],
                                    prefill=[PrefillChunk("small", 40)], decode=["big"]))
    assert result.out_of_blocks == ["small"]
    assert [o.request_id for o in result.outputs] == ["big"]
    engine.abort("big")
    result = engine.step(BatchOrder(step_id=2, prefill=[PrefillChunk("small", 40)]))
    assert result.out_of_blocks == [] and result.outputs[0].new_token_ids
