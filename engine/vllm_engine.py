"""vLLM's engine core, run under the planner: the same orders, reports and streamed text as
our engine, with vLLM's kernels, KV cache and sampler.

vLLM's v1 `EngineCore` runs in this process (no engine-core process of its own) with
`OrderedScheduler`, so each `BatchOrder` becomes exactly one vLLM step of what it grants.
Requests end by our rule (`engine.sequence.finish_reason`: EOS, stop tokens and strings,
max_tokens, the context window), as in our engine; vLLM gets `ignore_eos` and is told to
drop a request that our rule ended. Prefix caching is off, so a prompt runs in the chunks
ordered.

Disaggregated, a prefill worker exports a request as our engine does (its vLLM blocks stay
until the planner aborts it there) and a decode worker adopts it (`OrderedScheduler.adopt`),
reading its KV blocks straight into vLLM's cache with our KV transport: vLLM's cache is one
tensor per layer with the block first, each a segment the transport moves.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from vllm import SamplingParams as VLLMSamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.engine import EngineCoreRequest
from vllm.v1.engine.core import EngineCore
from vllm.v1.executor.abstract import Executor
from vllm.v1.request import Request

from engine.config import ModelConfig
from engine.engine import RequestOutput, StepResult, add_new_requests, default_dtype
from engine.kv_transfer import KVTransferError, KVTransport
from engine.loader import load_tokenizer
from engine.sequence import Sequence, append_until_finished, streamed_detokenizer
from engine.speculative import NgramProposer
from engine.vllm_scheduler import OrderedScheduler
from shared.messages import MAX_SPEC_LEN, BatchOrder, ExportedRequest, KVEndpoint, SamplingParams
from shared.model_info import context_window

log = logging.getLogger(__name__)

CPU_BLOCK_MULTIPLE = 32  # vLLM's CPU attention takes KV blocks of a multiple of 32 tokens
MIN_STEP_TOKENS = 8192
NGRAM_MAX_N = NgramProposer.max_n  # the longest suffix looked up in the context, as our engine's


def vllm_params(params: SamplingParams, max_tokens: int) -> VLLMSamplingParams:
    """Sampling as vLLM draws it; stopping is left to our rule."""
    return VLLMSamplingParams(
        max_tokens=max_tokens,
        temperature=0.0 if params.greedy else params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        seed=params.seed,
        ignore_eos=True,
    )


def bind_threads_to_affinity() -> None:
    """vLLM's CPU backend binds its threads to cores of its own choosing and keeps one back;
    bind them to the cores this process was given (`--worker-cpus`) unless told otherwise."""
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(os.sched_getaffinity(0))))
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


class VLLMEngine:
    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        block_size: int = 16,
        kv_cache_mb: int = 256,
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        speculator: str = "none",
        compile_model: bool | None = None,
    ) -> None:
        """`compile_model`: let vLLM compile the model (default: on a GPU, not on a CPU, where
        compiling costs minutes at each start)."""
        if speculator not in ("none", "ngram"):
            raise ValueError(f"vLLM's engine here speculates with ngram or not at all, not {speculator}")
        if device == "cpu":
            bind_threads_to_affinity()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # else vLLM's CPU backend runs the model in a child
        self.tokenizer = load_tokenizer(model_dir)
        cfg = ModelConfig.from_dir(model_dir)
        self.eos_token_ids = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        torch_dtype = default_dtype(device) if dtype == "auto" else getattr(torch, dtype)
        if device == "cpu":
            block_size = -(-block_size // CPU_BLOCK_MULTIPLE) * CPU_BLOCK_MULTIPLE
        # vLLM refuses a context its KV cache cannot hold once (beside the one block it keeps
        # empty): serve the longest one it can
        blocks = kv_cache_mb * 2**20 // (cfg.kv_bytes_per_token(torch_dtype.itemsize) * block_size) - 1
        fits, window = blocks * block_size, context_window(model_dir, max_model_len)
        self.max_model_len = min(window, fits)
        if self.max_model_len < window:
            log.warning("a KV cache of %d MB holds %d tokens: serving contexts of %d tokens at most",
                        kv_cache_mb, fits, self.max_model_len)
        args = EngineArgs(
            model=str(model_dir),
            dtype=str(torch_dtype).removeprefix("torch."),
            seed=0,
            max_model_len=self.max_model_len,
            block_size=block_size,
            kv_cache_memory_bytes=kv_cache_mb * 2**20,
            max_num_seqs=max_num_seqs,
            # above any order: whole prompts (a context's worth, or fcfs's batches), beside every decode
            max_num_batched_tokens=max(self.max_model_len, MIN_STEP_TOKENS) + max_num_seqs * (1 + MAX_SPEC_LEN),
            enable_chunked_prefill=True,
            enable_prefix_caching=False,
            async_scheduling=False,
            enforce_eager=not compile_model if compile_model is not None else device == "cpu",
            scheduler_cls=OrderedScheduler,
            # vLLM proposes up to the most the planner orders; each order's k truncates the proposal
            speculative_config={"method": "ngram", "num_speculative_tokens": MAX_SPEC_LEN, "prompt_lookup_min": 1,
                                "prompt_lookup_max": NGRAM_MAX_N} if speculator == "ngram" else None,
            distributed_executor_backend="uni",  # the model runs in this process
        )
        config = args.create_engine_config()
        self.core = EngineCore(config, Executor.get_class(config), log_stats=False)
        self.scheduler: OrderedScheduler = self.core.scheduler  # type: ignore[assignment]
        self.block_size = config.cache_config.block_size
        self.num_blocks = self.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
        self.seqs: dict[str, Sequence] = {}
        self.requests: dict[str, Request] = {}  # vLLM's side of each request
        self.held: set[str] = set()  # not yet handed to vLLM: no order has granted them tokens

    @property
    def num_free_blocks(self) -> int:
        return self.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()

    @property
    def kv_segments(self) -> list[torch.Tensor]:
        """vLLM's cache as the KV transport moves it: each layer's tensor, or its K and V
        halves where K/V comes first (vLLM's GPU layout)."""
        blocks = self.scheduler.kv_cache_config.num_blocks
        layers = self.core.model_executor.driver_worker.worker.model_runner.kv_caches
        unique = list({t.data_ptr(): t for t in layers}.values())  # layers may share a cache
        return [half for t in unique for half in ([t] if t.shape[0] == blocks else list(t))]

    def export(self, request_id: str, source: KVEndpoint) -> ExportedRequest:
        """What a decode worker needs to take the request over; vLLM keeps its blocks until
        the planner aborts it here. A seeded sampler starts afresh on the decode worker."""
        seq, request = self.seqs[request_id], self.requests[request_id]
        computed = request.num_computed_tokens
        blocks = self.scheduler.kv_cache_manager.get_block_ids(request_id)[0][: -(-computed // self.block_size)]
        return ExportedRequest(request_id, list(seq.token_ids), seq.num_prompt, computed, seq.params, list(blocks),
                               source)

    def import_request(self, export: ExportedRequest, transport: KVTransport) -> None:
        """Take over a request prefilled elsewhere: its blocks' KV read into blocks vLLM
        allocates for it; vLLM runs it from the first token not computed."""
        rid = export.request_id
        self.add_request(rid, export.token_ids[: export.num_prompt], export.params,
                         export.token_ids[export.num_prompt:])
        blocks = self.scheduler.adopt(self.requests[rid], export.num_computed)
        try:
            if blocks is None:
                raise KVTransferError(f"no room for {export.num_computed} tokens of KV")
            if len(blocks) != len(export.blocks):
                raise ValueError(f"{len(export.blocks)} blocks for {export.num_computed} tokens")
            transport.read(export.source, rid, export.blocks, blocks)
        except Exception:
            self.abort(rid)
            raise

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    resume_token_ids: list[int] | tuple[int, ...] = ()) -> None:
        """A new request; `resume_token_ids` is output it produced elsewhere, prefilled with the
        prompt and counted as output already streamed."""
        if request_id in self.seqs:
            raise ValueError(f"request {request_id} already exists")
        tokens = list(prompt_token_ids) + list(resume_token_ids)
        if not prompt_token_ids or len(tokens) >= self.max_model_len:
            raise ValueError(f"prompt of {len(tokens)} tokens; must be 1..{self.max_model_len - 1}")
        self.seqs[request_id] = Sequence(request_id, tokens, len(prompt_token_ids), params, None,
                                         streamed_detokenizer(self.tokenizer, params, resume_token_ids))
        core_request = EngineCoreRequest(request_id, tokens, None,
                                         vllm_params(params, max(1, params.max_tokens - len(resume_token_ids))),
                                         None, time.time(), None, None, None)
        self.requests[request_id], _ = self.core.preprocess_add_request(core_request)
        self.held.add(request_id)

    def assume_computed(self, request_id: str, num_tokens: int) -> None:
        """For profiling, as our engine's: a new request's first tokens count as computed, in
        blocks of stale KV."""
        seq, request = self.seqs[request_id], self.requests[request_id]
        if request_id not in self.held or not 0 < num_tokens < len(seq.token_ids):
            raise ValueError(f"cannot assume {num_tokens} of {len(seq.token_ids)} tokens computed")
        if self.scheduler.adopt(request, num_tokens) is None:
            raise ValueError(f"no KV blocks for {num_tokens} tokens")

    def abort(self, request_id: str) -> bool:
        if self.seqs.pop(request_id, None) is None:
            return False
        request = self.requests.pop(request_id)
        if request_id in self.held:
            self.held.discard(request_id)
            if request_id in self.scheduler.adopted:
                self.scheduler.drop_adopted(request)
        else:
            self.core.abort_requests([request_id])
        return True

    def step(self, order: BatchOrder) -> StepResult:
        start = time.perf_counter()
        for rid in order.aborts:
            self.abort(rid)
        refused = add_new_requests(self, order.new_requests)
        work = [(c.request_id, c.num_tokens, 0) for c in order.prefill]
        work += [(rid, 1, order.spec_lens.get(rid, 0)) for rid in order.decode]
        grants, proposed, out_of_blocks = self._grants(work)
        for rid in [rid for rid in grants if rid in self.held]:
            self.held.discard(rid)
            self.core.add_request(self.requests[rid])
        outputs: dict[str, list[int]] = {}
        self.scheduler.granted, self.scheduler.scheduled = grants, {}
        if grants:
            engine_outputs, ran = self.core.step()
            self.core.post_step(ran)  # the next step's proposals
            for batch in engine_outputs.values():
                outputs.update((o.request_id, o.new_token_ids) for o in batch.outputs)
            short = {rid: (n, self.scheduler.scheduled.get(rid, 0)) for rid, n in grants.items()
                     if self.scheduler.scheduled.get(rid, 0) != n}
            if short:
                log.warning("step %d: vLLM ran other token counts than ordered (ordered, ran): %s",
                            order.step_id, short)
        results = [self._advance(rid, outputs.get(rid, []), proposed.get(rid, 0)) for rid in grants]
        return StepResult(refused + results, out_of_blocks, time.perf_counter() - start)

    def _grants(self, work: list[tuple[str, int, int]]) -> tuple[dict[str, int], dict[str, int], list[str]]:
        """Tokens for each item (n known ones, then up to k of vLLM's proposal, as far as the
        request may still produce), kept while their KV blocks fit, in order, as our engine
        does: vLLM would otherwise preempt a request of its choosing. Also: the proposed tokens
        granted to each."""
        grants: dict[str, int] = {}
        proposed: dict[str, int] = {}
        out_of_blocks: list[str] = []
        free = self.num_free_blocks
        for rid, n, k in work:
            seq = self.seqs.get(rid)
            if seq is None:
                log.warning("request %s: ordered but unknown (aborted?)", rid)
                continue
            request = self.requests[rid]
            computed = request.num_computed_tokens
            n = min(n, len(seq.token_ids) - computed)
            if n <= 0:
                log.warning("request %s: ordered with no tokens left to compute", rid)
                continue
            room = seq.params.max_tokens - seq.num_output - 1
            k = max(0, min(k, len(request.spec_token_ids), room)) if computed + n == len(seq.token_ids) else 0
            end = computed + n + k + self.scheduler.num_lookahead_tokens
            need = -(-end // self.block_size) - self.scheduler.num_blocks_held(rid)
            if need > free:
                log.warning("request %s: out of KV blocks (%d needed, %d free)", rid, need, free)
                out_of_blocks.append(rid)
                continue
            free -= max(0, need)
            grants[rid] = n + k
            proposed[rid] = k
        return grants, proposed, out_of_blocks

    def _advance(self, rid: str, tokens: list[int], proposed: int) -> RequestOutput:
        """Append the step's tokens until one ends the request; end it in vLLM too if vLLM
        has not."""
        seq, request = self.seqs[rid], self.requests[rid]
        new, finish = append_until_finished(seq, tokens, self.eos_token_ids, self.max_model_len)
        if finish is None and request.is_finished():  # vLLM's own limits agree with ours; should they not, it ends
            log.warning("request %s: vLLM ended it (%s) before our rule did", rid, request.status.name)
            finish = "length"
        out = RequestOutput(rid, new, seq.detokenizer.release(finished=finish is not None), seq.num_prompt,
                            min(request.num_computed_tokens, len(seq.token_ids)), seq.num_output, finish,
                            proposed, max(0, len(tokens) - 1) if proposed else 0)
        if finish is not None and request.is_finished():
            del self.seqs[rid], self.requests[rid]
        elif finish is not None:
            self.abort(rid)
        return out
