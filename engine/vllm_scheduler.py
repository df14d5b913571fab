"""vLLM's scheduler, made to run the planner's orders and nothing else.

vLLM's v1 scheduler walks its running and waiting requests and gives each as many tokens as
its budget allows. Every request's share passes through one hook, `_reserve_prefill_lookahead`,
just before vLLM allocates its KV blocks; capping the share there at what the order grants
(none for a request the order leaves out) makes vLLM's own loop schedule exactly the order,
while its block allocation, batch building and bookkeeping stay vLLM's. The engine sizes the
token budget above any order, holds back requests until an order first grants them tokens (a
waiting request granted none would stop vLLM's waiting queue), and checks KV blocks itself
first, so vLLM never has to preempt on its own.
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

    def _reserve_prefill_lookahead(self, request: Request, num_computed_tokens: int, num_new_tokens: int) -> int:
        num_new_tokens = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        return min(num_new_tokens, self.granted.get(request.request_id, 0))

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        output = super().schedule(*args, **kwargs)
        self.scheduled = dict(output.num_scheduled_tokens)
        return output

    def num_blocks_held(self, request_id: str) -> int:
        """KV blocks the request holds now (none before it first runs)."""
        if request_id not in self.requests:
            return 0
        return len(self.kv_cache_manager.get_block_ids(request_id)[0])
