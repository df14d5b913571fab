"""OpenAI request bodies (validated with pydantic) and the response objects built from them.

Fields OpenAI defines that we cannot honour (n > 1, logprobs, tools) are refused with a clear
error rather than silently ignored. SLO fields are extensions: `slo_class`, `ttft_ms`,
`tpot_ms`, `slo_stages` (a list of {tokens, tpot_ms}: e.g. think fast, then answer) and
`slo_task` (the agent task a call belongs to: once one of its calls misses, the rest are served
best effort, so that tasks still on time keep the capacity) and `slo_unmeetable` ("refuse",
the default: a request whose objectives no worker here could keep even alone is answered 429
at once; "best_effort": it is served without a promise instead).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.messages import SamplingParams, Stage

MAX_OBJECTIVE_MS = 3_600_000.0  # an hour: a TTFT or TPOT beyond it is a mistake, not an objective
MAX_COUNT = 2**31 - 1  # token counts and top-k beyond any context; bounded so that they travel on the bus


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension: usage so far in every chunk


class SLOStage(BaseModel):
    """A stage of the output with its own TPOT: its first `tokens` tokens (the last stage may
    leave it out: all the rest)."""

    model_config = ConfigDict(extra="forbid")

    tokens: int | None = Field(None, ge=1, le=MAX_COUNT)
    tpot_ms: float | None = Field(None, gt=0, le=MAX_OBJECTIVE_MS, allow_inf_nan=False)

    def stage(self) -> Stage:
        return Stage(self.tokens, self.tpot_ms)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_COUNT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=MAX_COUNT)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what a torch generator takes
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    logprobs: bool | int | None = None
    ignore_eos: bool = False
    slo_class: str | None = None
    ttft_ms: float | None = Field(None, gt=0, le=MAX_OBJECTIVE_MS, allow_inf_nan=False)
    tpot_ms: float | None = Field(None, gt=0, le=MAX_OBJECTIVE_MS, allow_inf_nan=False)
    slo_stages: list[SLOStage] | None = Field(None, min_length=1, max_length=16)
    slo_task: str | None = Field(None, min_length=1, max_length=128)
    slo_unmeetable: Literal["refuse", "best_effort"] = "refuse"

    @field_validator("slo_stages")
    @classmethod
    def _open_stage_last(cls, v: list[SLOStage] | None) -> list[SLOStage] | None:
        if v and any(s.tokens is None for s in v[:-1]):
            raise ValueError("only the last stage may leave out `tokens`")
        return v

    @field_validator("n")
    @classmethod
    def _single_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | int | None) -> bool | int | None:
        if v:
            raise ValueError("logprobs are not supported")
        return None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 8 or any(not s for s in stops):
            raise ValueError("stop takes at most 8 non-empty strings")
        return stops

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self.stop or ()),
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_COUNT)
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools are not supported")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionRequest(_Common):
    prompt: str | list[int]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: str | list[int]) -> str | list[int]:
        if len(v) == 0:
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, str], finish: str | None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }


def chat_response(rid: str, model: str, created: int, text: str, finish: str, use: dict) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": use,
    }


def completion_response(rid: str, model: str, created: int, text: str, finish: str, use: dict) -> dict:
    body = completion_chunk(rid, model, created, text, finish)
    body["usage"] = use
    return body


def now_s() -> int:
    return int(time.time())
