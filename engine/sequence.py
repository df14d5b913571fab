"""A request as an engine holds it: its tokens, KV blocks, sampler and detokenizer; and the
rule that ends it, which every engine applies the same way."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from engine.detokenizer import Detokenizer
from shared.messages import FinishReason, SamplingParams


@dataclass
class Sequence:
    request_id: str
    token_ids: list[int]
    num_prompt: int
    params: SamplingParams
    generator: torch.Generator | None
    detokenizer: Detokenizer
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in `blocks`

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt


def streamed_detokenizer(tokenizer: PreTrainedTokenizerBase, params: SamplingParams,
                         streamed: list[int] | tuple[int, ...]) -> Detokenizer:
    """A detokenizer that has handed out the text of `streamed` already."""
    detokenizer = Detokenizer(tokenizer, list(params.stop))
    for token in streamed:
        detokenizer.add(token)
    detokenizer.release(finished=False)
    return detokenizer


def finish_reason(seq: Sequence, token: int, eos_token_ids: set[int], max_model_len: int) -> FinishReason | None:
    """Why `token`, just appended to `seq`, ends the request, if it does."""
    p = seq.params
    if token in p.stop_token_ids or (token in eos_token_ids and not p.ignore_eos):
        return "stop"
    if seq.detokenizer.add(token):
        return "stop"
    if seq.num_output >= p.max_tokens or len(seq.token_ids) >= max_model_len:
        return "length"
    return None


def append_until_finished(seq: Sequence, tokens: list[int], eos_token_ids: set[int],
                          max_model_len: int) -> tuple[list[int], FinishReason | None]:
    """Append a step's tokens to `seq` until one ends the request: those appended, and why it ended."""
    new: list[int] = []
    for token in tokens:
        new.append(token)
        seq.token_ids.append(token)
        finish = finish_reason(seq, token, eos_token_ids, max_model_len)
        if finish is not None:
            return new, finish
    return new, None
