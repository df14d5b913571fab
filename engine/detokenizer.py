"""Incremental detokenization with stop strings.

Text is released only once it is final: bytes of an unfinished UTF-8 character and a tail
that could still become a stop string are held back until the next token decides them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase


@dataclass
class Detokenizer:
    tokenizer: PreTrainedTokenizerBase
    stop: list[str]
    text: str = ""
    emitted: int = 0
    _ids: list[int] = field(default_factory=list)
    _prefix_offset: int = 0
    _read_offset: int = 0

    def add(self, token_id: int) -> bool:
        """Append a token; True when a stop string ended the text."""
        self._ids.append(token_id)
        prefix = self.tokenizer.decode(
            self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True
        )
        full = self.tokenizer.decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        if full.endswith("\ufffd"):
            return False
        before = len(self.text)
        self.text += full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        hits = [self.text.find(s, max(0, before - len(s) + 1)) for s in self.stop]
        hits = [h for h in hits if h != -1]
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)

    def release(self, finished: bool) -> str:
        """Text not yet handed out that can no longer change."""
        hold = 0 if finished or not self.stop else max(len(s) for s in self.stop) - 1
        end = max(self.emitted, len(self.text) - hold)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
