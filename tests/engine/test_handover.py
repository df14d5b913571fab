"""A request prefilled on one engine and decoded on another, its KV read across, produces
exactly the tokens of one engine doing both, for greedy and for seeded sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.drive import drive
from engine.engine import Engine
from engine.kv_transfer import make_transport
from shared.bus import Bus
from shared.messages import BatchOrder, NewRequest, PrefillChunk, SamplingParams

PARAMS = [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
          SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)]


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(10, 500, (n,), generator=gen).tolist() for n in (3, 18, 40)]


@pytest.mark.parametrize("kind", ["zmq", "nixl"])
@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "seeded"])
def test_prefill_here_decode_there_equals_one_engine(tiny_model: Path, kind: str, params: SamplingParams) -> None:
    if kind == "nixl":
        pytest.importorskip("nixl._api")
    reference = drive(Engine(tiny_model, kv_cache_mb=4), prompts(), chunk=64, stagger=0, params=params)
    source, target = Engine(tiny_model, kv_cache_mb=4), Engine(tiny_model, num_kv_blocks=64)
    bus = Bus("test-cluster-secret-0123456789")
    src_t = make_transport(kind, "prefill", source.kv_segments, bus)
    dst_t = make_transport(kind, "decode", target.kv_segments, bus)
    try:
        ids = [f"r{i}" for i in range(len(prompts()))]
        first = source.step(BatchOrder(0, [NewRequest(r, p, params) for r, p in zip(ids, prompts())],
                                       [PrefillChunk(r, 7) for r in ids]))  # a chunk, then the rest
        rest = source.step(BatchOrder(1, prefill=[PrefillChunk(r, 64) for r in ids]))
        got = {o.request_id: list(o.new_token_ids) for o in first.outputs}
        for o in rest.outputs:
            got[o.request_id] += o.new_token_ids
        for rid in ids:
            export = source.export(rid, src_t.endpoint)
            src_t.offer(rid, export.blocks)
            target.import_request(export, dst_t)
            src_t.withdraw(rid)
            source.abort(rid)
        assert source.num_free_blocks == source.kv.allocator.num_blocks
        live = list(ids)
        step = 2
        while live:
            for o in target.step(BatchOrder(step, decode=live)).outputs:
                got[o.request_id] += o.new_token_ids
                if o.finish_reason:
                    live.remove(o.request_id)
            step += 1
        assert got == reference
        assert target.num_free_blocks == target.kv.allocator.num_blocks
    finally:
        src_t.close()
        dst_t.close()
        bus.close()
