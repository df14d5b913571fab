"""Drives an engine through many requests the way a planner would: requests join in turn,
their prompts prefilled in chunks inside the same steps as the others' decodes. The engine
tests and `bench greedy` run requests this way."""

from __future__ import annotations

from collections.abc import Callable

from engine.engine import Engine
from shared.messages import BatchOrder, NewRequest, PrefillChunk, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def drive(engine: Engine, requests: list[list[int]], chunk: int, stagger: int,
          params: SamplingParams = GREEDY, spec_len: Callable[[int, int], int] = lambda i, step: 0,
          after_step: Callable[[Engine], None] = lambda engine: None, decoder: Engine | None = None,
          hand_over: Callable[[str], None] = lambda rid: None) -> dict[str, list[int]]:
    """Run requests to completion, request i joining at step i*stagger, prefill in chunks of
    `chunk` tokens mixed into the same steps as other requests' decodes, request i speculating
    `spec_len(i, step)` tokens when it decodes. With a `decoder`, as a prefill and a decode
    worker: a request whose prompt is done moves there (`hand_over`) and decodes there, in
    steps beside the prefill engine's."""
    tokens: dict[str, list[int]] = {}
    left = {f"r{i}": len(p) for i, p in enumerate(requests)}
    done: set[str] = set()
    step = 0
    while len(done) < len(requests):
        order, decoding = BatchOrder(step_id=step), BatchOrder(step_id=step)
        for i, prompt in enumerate(requests):
            rid = f"r{i}"
            if rid in done or step < i * stagger:
                continue
            if rid not in tokens:
                tokens[rid] = []
                order.new_requests.append(NewRequest(rid, prompt, params))
            if left[rid] > 0:
                n = min(chunk, left[rid])
                order.prefill.append(PrefillChunk(rid, n))
                left[rid] -= n
            else:
                target = order if decoder is None else decoding
                target.decode.append(rid)
                target.spec_lens[rid] = spec_len(i, step)
        for runner, ordered in [(engine, order)] + ([(decoder, decoding)] if decoder is not None else []):
            for out in runner.step(ordered).outputs:
                tokens[out.request_id] += out.new_token_ids
                if out.finish_reason:
                    done.add(out.request_id)
                elif runner is engine and decoder is not None and out.new_token_ids:
                    hand_over(out.request_id)
            after_step(runner)
        step += 1
    return tokens
