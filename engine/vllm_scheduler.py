"""vLLM's scheduler, made to run the planner's orders and nothing else.

vLLM's v1 scheduler walks its running and waiting requests and gives each as many tokens as
its budget allows. Every request's share passes through one hook, `_reserve_prefill_lookahead`,
just before vLLM allocates its KV blocks; capping the share there at what the order grants
(none for a request the order leaves out) makes vLLM's own loop schedule exactly the order,
while its block allocation, batch building and bookkeeping stay vLLM's. The engine sizes the
token budget above any order, holds back requests until an order first grants them tokens (a
waiting request granted none would stop vLLM's waiting queue), and checks KV blocks itself
first, so vLLM never has to preempt on its own.

A request handed over from a prefill worker is *adopted*: its prompt's blocks are allocated
before it is added (as vLLM's own connectors do for KV they load), filled by the KV transport,
and the request enters vLLM with those tokens computed.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request


class OrderedScheduler(Scheduler):
    """Set `granted` (request id -> tokens this step: a prompt chunk, or 1 + speculative
    tokens for a decode) before each engine step; `scheduled` is what vLLM then ran."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.granted: dict[str, int] = {}
        self.scheduled: dict[str, int] = {}
        self.adopted: set[str] = set()  # hold blocks, not yet added

    def _reserve_prefill_lookahead(self, request: Request, num_computed_tokens: int, num_new_tokens: int) -> int:
        num_new_tokens = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        return min(num_new_tokens, self.granted.get(request.request_id, 0))

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        output = super().schedule(*args, **kwargs)
        self.scheduled = dict(output.num_scheduled_tokens)
        return output

    def add_request(self, request: Request) -> None:
        self.adopted.discard(request.request_id)
        super().add_request(request)

    def adopt(self, request: Request, num_computed: int) -> list[int] | None:
        """Blocks for the request's first `num_computed` tokens, whose KV the caller writes
        before adding it (vLLM neither zeroes nor caches them); None when they do not fit."""
        if self.kv_cache_manager.allocate_slots(request, 0, num_external_computed_tokens=num_computed,
                                                delay_cache_blocks=True, skip_zeroing_group_ids=(0,),
                                                has_scheduled_reqs=False) is None:
            return None
        request.num_computed_tokens = num_computed
        self.adopted.add(request.request_id)
        return list(self.kv_cache_manager.get_block_ids(request.request_id)[0])

    def drop_adopted(self, request: Request) -> None:
        """Free an adopted request's blocks when it ends before it was added."""
        self.adopted.discard(request.request_id)
        self.kv_cache_manager.free(request)

    def num_blocks_held(self, request_id: str) -> int:
        """KV blocks the request holds now (none before it first runs, unless adopted)."""
        if request_id not in self.requests and request_id not in self.adopted:
            return 0
        return len(self.kv_cache_manager.get_block_ids(request_id)[0])
