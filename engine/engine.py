"""The engine: runs batch orders (mixed prefill chunks, decode tokens and speculative
verification) on the model.

It holds each request's tokens, KV blocks, sampler and detokenizer, but makes no policy: what
runs in a step, and how many tokens each decoding request speculates, is decided by whoever
writes the `BatchOrder`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from engine.config import ModelConfig
from engine.kv_cache import KVCache, OutOfKVBlocks
from engine.kv_transfer import KVTransport
from engine.loader import load_tokenizer
from engine.model_runner import ModelRunner, Work
from engine.sampling import make_generator, sample, verify
from engine.sequence import Sequence, append_until_finished, streamed_detokenizer
from engine.speculative import Proposal, Speculator, make_proposer
from shared.messages import (
    MAX_SPEC_LEN,
    BatchOrder,
    ExportedRequest,
    FinishReason,
    KVEndpoint,
    NewRequest,
    SamplingParams,
)
from shared.model_info import context_window

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    text: str
    num_prompt_tokens: int
    num_computed_tokens: int
    num_output_tokens: int
    finish_reason: FinishReason | None
    num_proposed: int = 0  # speculative tokens verified in this step
    num_accepted: int = 0  # of which the target accepted


@dataclass
class StepResult:
    outputs: list[RequestOutput]
    out_of_blocks: list[str]
    duration_s: float


@dataclass
class _Item:
    """One request's part of a step: `n` known tokens, then the proposal to verify, if any."""

    seq: Sequence
    n: int
    draft: Proposal | None = None

    @property
    def completes(self) -> bool:
        """The step reaches the end of the known tokens, so it yields a new token."""
        return self.seq.num_computed + self.n == len(self.seq.token_ids)


class AddsRequests(Protocol):
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    resume_token_ids: list[int] | tuple[int, ...] = ()) -> None: ...


def add_new_requests(engine: AddsRequests, requests: list[NewRequest]) -> list[RequestOutput]:
    """Add an order's new requests to either engine; one that cannot be added ends alone, with
    an error, instead of failing the step."""
    refused = []
    for req in requests:
        try:
            engine.add_request(req.request_id, req.prompt_token_ids, req.params, req.resume_token_ids)
        except Exception as exc:
            log.error("request %s: cannot be added: %s", req.request_id, exc)
            refused.append(RequestOutput(req.request_id, [], "", len(req.prompt_token_ids), 0, 0, "error"))
    return refused


def default_dtype(device: str) -> torch.dtype:
    return torch.float32 if device == "cpu" else torch.bfloat16


class Engine:
    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        block_size: int = 16,
        kv_cache_mb: int = 256,
        num_kv_blocks: int | None = None,
        max_model_len: int | None = None,
        speculator: Speculator = "none",
        draft_dir: Path | None = None,
    ) -> None:
        self.device = device
        self.dtype = dtype or default_dtype(device)
        self.tokenizer = load_tokenizer(model_dir)
        self.max_model_len = context_window(model_dir, max_model_len)
        num_blocks = num_kv_blocks or KVCache.num_blocks_for(ModelConfig.from_dir(model_dir), block_size,
                                                             kv_cache_mb, self.dtype)
        self.runner = ModelRunner(model_dir, device, self.dtype, num_blocks, block_size)
        self.cfg = self.runner.cfg
        self.kv = self.runner.kv
        self.proposer = make_proposer(speculator, draft_dir, self.runner)
        self.eos_token_ids = set(self.cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.seqs: dict[str, Sequence] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.kv.allocator.num_free

    @property
    def num_blocks(self) -> int:
        return self.kv.allocator.num_blocks

    @property
    def block_size(self) -> int:
        return self.kv.block_size

    @property
    def kv_segments(self) -> list[torch.Tensor]:
        """The cache as the KV transport moves it: one tensor, the block first."""
        return [self.kv.data]

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    resume_token_ids: list[int] | tuple[int, ...] = ()) -> None:
        """A new request; `resume_token_ids` is output it produced elsewhere (on a worker that
        died), prefilled with the prompt and counted as output already streamed."""
        if request_id in self.seqs:
            raise ValueError(f"request {request_id} already exists")
        length = len(prompt_token_ids) + len(resume_token_ids)
        if not prompt_token_ids or length >= self.max_model_len:
            raise ValueError(f"prompt of {length} tokens; must be 1..{self.max_model_len - 1}")
        self.seqs[request_id] = Sequence(
            request_id=request_id,
            token_ids=list(prompt_token_ids) + list(resume_token_ids),
            num_prompt=len(prompt_token_ids),
            params=params,
            generator=make_generator(params, self.device),
            detokenizer=streamed_detokenizer(self.tokenizer, params, resume_token_ids),
        )

    def assume_computed(self, request_id: str, num_tokens: int) -> None:
        """For profiling: mark the first tokens as computed without running them. Their KV
        blocks are allocated but hold stale values, which changes no timing, so a step at a
        long context can be timed without first prefilling it."""
        seq = self.seqs[request_id]
        if not 0 <= num_tokens < len(seq.token_ids):
            raise ValueError(f"cannot assume {num_tokens} of {len(seq.token_ids)} tokens computed")
        seq.blocks += self.kv.allocator.allocate(self.kv.blocks_needed(num_tokens) - len(seq.blocks))
        seq.num_computed = num_tokens

    def export(self, request_id: str, source: KVEndpoint) -> ExportedRequest:
        """What a decode worker needs to take the request over; the request stays here, its
        blocks untouched, until the planner aborts it after the handover."""
        seq = self.seqs[request_id]
        state = bytes(seq.generator.get_state().numpy()) if seq.generator is not None else b""
        return ExportedRequest(request_id, list(seq.token_ids), seq.num_prompt, seq.num_computed, seq.params,
                               list(seq.blocks), source, state)

    def import_request(self, export: ExportedRequest, transport: KVTransport) -> None:
        """Take over a request prefilled elsewhere: read its KV blocks into free ones of ours
        and continue its sampler and detokenizer where the source left them."""
        if export.request_id in self.seqs:
            raise ValueError(f"request {export.request_id} already exists")
        if len(export.blocks) != self.kv.blocks_needed(export.num_computed):
            raise ValueError(f"request {export.request_id}: {len(export.blocks)} blocks for "
                             f"{export.num_computed} tokens")
        blocks = self.kv.allocator.allocate(len(export.blocks))
        try:
            transport.read(export.source, export.request_id, export.blocks, blocks)
        except Exception:
            self.kv.allocator.free(blocks)
            raise
        generator = make_generator(export.params, self.device)
        if generator is not None and export.generator_state:
            generator.set_state(torch.frombuffer(bytearray(export.generator_state), dtype=torch.uint8))
        detokenizer = streamed_detokenizer(self.tokenizer, export.params, export.token_ids[export.num_prompt:])
        self.seqs[export.request_id] = Sequence(export.request_id, list(export.token_ids), export.num_prompt,
                                                export.params, generator, detokenizer, blocks,
                                                export.num_computed)

    def abort(self, request_id: str) -> bool:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.kv.allocator.free(seq.blocks)
        if self.proposer is not None:
            self.proposer.release(request_id)
        return True

    def step(self, order: BatchOrder) -> StepResult:
        """Runs the order; a request that cannot be added, sampled or advanced ends alone with
        an error, and a failed forward pass is retried request by request, so one bad request
        never fails the others in its batch."""
        start = time.perf_counter()
        for rid in order.aborts:  # first: a resubmitted request may reuse an aborted one's id
            self.abort(rid)
        refused = add_new_requests(self, order.new_requests)
        work = [(c.request_id, c.num_tokens, 0) for c in order.prefill]
        work += [(rid, 1, order.spec_lens.get(rid, 0)) for rid in order.decode]
        items, out_of_blocks = self._reserve(work)
        outputs = self._run(items) if items else []
        return StepResult(refused + outputs, out_of_blocks, time.perf_counter() - start)

    def _spec_len(self, seq: Sequence, asked: int) -> int:
        """The speculative length actually run: none without a proposer, and never past the
        context window or the tokens the request may still produce."""
        if self.proposer is None:
            return 0
        room = min(self.max_model_len - len(seq.token_ids), seq.params.max_tokens - seq.num_output - 1)
        return max(0, min(asked, MAX_SPEC_LEN, room))

    def _reserve(self, work: list[tuple[str, int, int]]) -> tuple[list[_Item], list[str]]:
        """Clamp each item to the tokens it has left, get proposals for the speculating ones,
        and give each the KV blocks it needs (dropping a proposal that does not fit)."""
        items: list[_Item] = []
        wants: list[tuple[Sequence, int]] = []
        for rid, n, k in work:
            seq = self.seqs.get(rid)
            if seq is None:
                log.warning("request %s: ordered but unknown (aborted?)", rid)
                continue
            n = min(n, len(seq.token_ids) - seq.num_computed)
            if n <= 0:
                log.warning("request %s: ordered with no tokens left to compute", rid)
                continue
            item = _Item(seq, n)
            items.append(item)
            k = self._spec_len(seq, k) if item.completes else 0
            if k:
                wants.append((seq, k))
        proposals = self.proposer.propose(wants) if wants else {}
        reserved, out_of_blocks = [], []
        for item in items:
            item.draft = proposals.get(item.seq.request_id)
            ok = self._allocate(item)
            if not ok and item.draft is not None:  # retry as a plain decode
                item.draft = None
                self.proposer.rollback(item.seq)
                ok = self._allocate(item)
            if ok:
                reserved.append(item)
            else:
                out_of_blocks.append(item.seq.request_id)
        return reserved, out_of_blocks

    def _allocate(self, item: _Item) -> bool:
        seq = item.seq
        length = seq.num_computed + item.n + (len(item.draft.tokens) if item.draft else 0)
        try:
            seq.blocks += self.kv.allocator.allocate(max(0, self.kv.blocks_needed(length) - len(seq.blocks)))
        except OutOfKVBlocks as exc:
            log.warning("request %s: %s", seq.request_id, exc)
            return False
        return True

    def _run(self, items: list[_Item]) -> list[RequestOutput]:
        work = []
        for it in items:
            c, draft = it.seq.num_computed, it.draft.tokens if it.draft else []
            work.append(Work(it.seq.token_ids[c : c + it.n] + draft, c, it.seq.blocks,
                             1 + len(draft) if it.completes else 0))
        try:
            logits = self.runner.forward(work).split([w.num_logits for w in work])
        except Exception:  # nothing has advanced yet, so each request can run again alone
            if len(items) == 1:
                return [self._fail(items[0], "its step failed")]
            log.exception("a step of %d requests failed; running them one at a time", len(items))
            return [out for it in items for out in self._run([it])]
        tokens = self._sample(items, logits)
        outputs = []
        for i, it in enumerate(items):
            try:
                outputs.append(self._advance(it, tokens[i]) if i in tokens else self._fail(it, "sampling failed"))
            except Exception:
                log.exception("request %s: could not advance", it.seq.request_id)
                outputs.append(self._fail(it, "it could not advance"))
        return outputs

    def _sample(self, items: list[_Item], logits: tuple[torch.Tensor, ...]) -> dict[int, list[int]]:
        """Each item's new tokens (none for a prompt chunk that does not complete it); an item
        whose sampling fails has no entry."""
        tokens: dict[int, list[int]] = {i: [] for i, it in enumerate(items) if not it.completes}
        plain = [i for i, it in enumerate(items) if it.completes and it.draft is None]
        try:
            sampled = sample(torch.cat([logits[i] for i in plain]), [items[i].seq.params for i in plain],
                             [items[i].seq.generator for i in plain]) if plain else []
            tokens.update({i: [t] for i, t in zip(plain, sampled)})
        except Exception:
            log.exception("sampling %d requests together failed; sampling them one at a time", len(plain))
            for i in plain:
                try:
                    tokens[i] = sample(logits[i], [items[i].seq.params], [items[i].seq.generator])
                except Exception:
                    log.exception("request %s: sampling failed", items[i].seq.request_id)
        for i, it in enumerate(items):
            if it.draft is not None:
                try:
                    tokens[i] = verify(logits[i], it.draft.tokens, it.draft.probs, it.seq.params, it.seq.generator)
                except Exception:
                    log.exception("request %s: verifying its proposal failed", it.seq.request_id)
        return tokens

    def _fail(self, item: _Item, why: str) -> RequestOutput:
        """End the request alone with an error, its blocks freed."""
        seq = item.seq
        log.error("request %s: ends with an error: %s", seq.request_id, why)
        self.abort(seq.request_id)
        return RequestOutput(seq.request_id, [], "", seq.num_prompt, seq.num_computed, seq.num_output, "error")

    def _advance(self, item: _Item, tokens: list[int]) -> RequestOutput:
        """Append the step's tokens until one ends the request, roll the KV caches back past
        rejected proposals, and free the request if it is done."""
        seq = item.seq
        proposed = len(item.draft.tokens) if item.draft else 0
        accepted = len(tokens) - 1 if item.draft else 0
        new, finish = append_until_finished(seq, tokens, self.eos_token_ids, self.max_model_len)
        seq.num_computed += item.n + min(len(new), accepted)
        keep = self.kv.blocks_needed(seq.num_computed)
        self.kv.allocator.free(seq.blocks[keep:])
        del seq.blocks[keep:]
        if item.draft is not None:
            self.proposer.rollback(seq)
        out = RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new,
            text=seq.detokenizer.release(finished=finish is not None),
            num_prompt_tokens=seq.num_prompt,
            num_computed_tokens=seq.num_computed,
            num_output_tokens=seq.num_output,
            finish_reason=finish,
            num_proposed=proposed,
            num_accepted=accepted,
        )
        if finish is not None:
            self.abort(seq.request_id)
        return out
