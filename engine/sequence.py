"""A request as the engine holds it: its tokens, KV blocks, sampler and detokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.detokenizer import Detokenizer
from shared.messages import SamplingParams


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
