"""Settings for every process: command-line flags > environment (`SLOS_*`) > TOML file.

The TOML file is named by `SLOS_CONFIG`. `slos-serve up` hands its resolved settings to the
processes it starts through the environment (`as_env`), so every process sees the same values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from shared.messages import MAX_SPEC_LEN, Stage
from shared.slo import DEFAULT_CLASSES, SLOClass, SLOTarget

ENV_PREFIX = "SLOS_"
CONFIG_ENV = "SLOS_CONFIG"


class StageSetting(BaseModel):
    tokens: int | None = Field(None, ge=1)
    tpot_ms: float | None = Field(None, gt=0)


class SLOClassSetting(BaseModel):
    ttft_ms: float | None = Field(None, gt=0)
    tpot_ms: float | None = Field(None, gt=0)
    stages: list[StageSetting] = []
    output_tokens: int = Field(256, ge=1, description="typical output length, until the planner has seen some")

    def resolved(self) -> SLOClass:
        stages = tuple(Stage(s.tokens, s.tpot_ms) for s in self.stages)
        return SLOClass(SLOTarget(self.ttft_ms, self.tpot_ms, stages), self.output_tokens)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    host: str = Field("127.0.0.1", description="HTTP bind address of the gateway")
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(None, description="required as a Bearer token when set")
    model_dir: Path | None = Field(None, description="HF model directory; None = built-in model")
    served_model_name: str | None = None
    planner_address: str = Field("", description="ZeroMQ ROUTER the workers connect to")
    planner_intake_address: str = Field("", description="ZeroMQ PULL the gateway sends to")
    gateway_address: str = Field("", description="ZeroMQ PULL receiving tokens and verdicts")
    bus_bind_host: str | None = Field(None, description="host the planner's and gateway's ZeroMQ sockets bind to, "
                                      "when their addresses name one others dial (a Kubernetes Service); "
                                      "default: the address's own host")
    cluster_secret: str | None = Field(None, repr=False, description="shared by every process of a cluster: "
                                       "their ZeroMQ sockets, the KV servers' too, let in only processes that hold "
                                       "it, and the bus's are encrypted (`shared.bus`); `up` makes one when none is "
                                       "given; at least 16 characters")
    cluster_secret_file: Path | None = Field(None, description="a file holding the cluster secret (a mounted "
                                             "Kubernetes Secret)")
    mode: Literal["colocated", "disaggregated"] = "colocated"
    engine: Literal["ours", "vllm"] = Field("ours", description="what runs the workers' steps: our torch engine, "
                                            "or vLLM's engine core under the planner (`pip install -e .[vllm]`; "
                                            "colocated workers; ngram speculation or none)")
    workers: int = Field(1, ge=1, description="colocated workers")
    prefill_workers: int = Field(1, ge=1, description="prefill workers in disaggregated mode")
    decode_workers: int = Field(1, ge=1, description="decode workers in disaggregated mode")
    kv_transport: Literal["auto", "nixl", "zmq"] = Field(
        "auto", description="how KV moves from prefill to decode workers; auto: nixl when importable")
    kv_host: str = Field("127.0.0.1", description="address this worker's ZeroMQ KV server binds to and peers "
                         "dial: an IP, a host name, or `hostname` for this host's own name (a container's address)")
    policy: Literal["slos", "fcfs", "sarathi", "distserve", "edf"] = Field(
        "slos", description="slos (SLO-aware admission and planning) or a baseline: fcfs (vLLM-like), "
        "sarathi (chunked prefill), distserve (disaggregated FCFS), edf (deadline first, early rejection)")
    profile: Path | None = Field(None, description="performance-model profile the planner prices batches "
                                 "with; default: the shipped CPU profile of the served model (else the built-in's)")
    draft_profile: Path | None = Field(None, description="profile of the draft model, to price draft steps")
    best_effort_limit: int = Field(256, ge=0, description="parked requests with objectives before new ones with "
                                   "objectives are refused (plain requests always wait)")
    ttft_reserve: float = Field(0.25, ge=0.0, lt=1.0, description="share of the time left before a TTFT deadline "
                                "that slos does not plan to use when it makes a promise (for what its model misses)")
    front_end_ms: float = Field(50.0, ge=0.0, description="a token's trip from a worker to the client, which slos "
                                "plans TTFTs to leave room for")
    block_size: int = Field(16, ge=1)
    kv_cache_mb: int = Field(256, ge=1, description="KV cache memory per worker")
    max_model_len: int | None = Field(None, ge=16, description="default: the model's")
    max_num_seqs: int = Field(128, ge=1, description="most requests a worker runs at once (128: vLLM's default for "
                              "its CPU server; the KV cache and, under slos, the TPOTs bound batches as well)")
    max_batch_tokens: int = Field(512, ge=16)
    device: str = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on CPU, bfloat16 on GPU")
    speculator: Literal["none", "ngram", "draft"] = Field(
        "none", description="how workers propose speculative tokens")
    draft_model_dir: Path | None = Field(None, description="draft model; default: the built-in draft")
    spec_len: int = Field(0, ge=0, le=MAX_SPEC_LEN, description="speculative tokens per decode step under the "
                          "baseline policies; slos chooses its own per SLO tier")
    threads_per_worker: int | None = Field(None, ge=1, description="default: the worker's share of its cores")
    worker_cpus: list[int] | None = Field(None, description="cores the workers run on, shared out among them in "
                                          "order; the gateway and the planner run on the others; default: unpinned")
    heartbeat_s: float = Field(0.25, gt=0)
    request_timeout_s: float = Field(600.0, gt=0)
    max_request_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="larger request bodies get a 413")
    slo_classes: dict[str, SLOClassSetting] = {
        name: SLOClassSetting(ttft_ms=c.target.ttft_ms, tpot_ms=c.target.tpot_ms, output_tokens=c.output_tokens,
                              stages=[StageSetting(tokens=s.tokens, tpot_ms=s.tpot_ms) for s in c.target.stages])
        for name, c in DEFAULT_CLASSES.items()
    }
    default_slo_class: str | None = Field(None, description="the SLO class of requests that name no objectives "
                                         "(most OpenAI clients); default: none, they are served best effort")
    log_level: str = "INFO"
    admin_port: int = Field(8001, ge=0, le=65535, description="the planner's admin API (on `host`)")
    admin_token: str | None = Field(None, description="bearer token of the admin API; default: a random one, "
                                    "written to the planner's log and to `admin_token_file`")
    admin_token_file: Path | None = Field(None, description="where the planner writes its admin token")

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.policy == "distserve" and self.mode != "disaggregated":
            raise ValueError("policy distserve runs prefill and decode pools: it needs mode disaggregated")
        if self.engine == "vllm" and self.speculator == "draft":
            raise ValueError("engine vllm speculates with ngram or not at all, so far")
        if self.worker_cpus is not None and (not self.worker_cpus or min(self.worker_cpus) < 0
                                             or len(set(self.worker_cpus)) < len(self.worker_cpus)):
            raise ValueError("worker_cpus: distinct core numbers, at least one")
        if self.default_slo_class is not None and self.default_slo_class not in self.slo_classes:
            raise ValueError(f"default_slo_class {self.default_slo_class!r} is not one of slo_classes: "
                             f"{', '.join(sorted(self.slo_classes))}")
        return self

    def classes(self) -> dict[str, SLOClass]:
        """The SLO classes, resolved."""
        return {name: c.resolved() for name, c in self.slo_classes.items()}

    def bus_secret(self) -> str:
        """The cluster secret, from the settings or from its file."""
        if self.cluster_secret:
            return self.cluster_secret
        if self.cluster_secret_file is not None:
            return self.cluster_secret_file.read_text().strip()
        raise ValueError("no cluster secret: set SLOS_CLUSTER_SECRET or cluster_secret_file to the same secret in "
                         "every process (`slos-serve up` makes one for the processes it starts)")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_ENV)
        if config_file:
            if not Path(config_file).is_file():
                raise FileNotFoundError(f"{CONFIG_ENV}={config_file} is not a file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)


def load(**flags: Any) -> Settings:
    """Settings with the given flags on top; flags left at None do not override."""
    return Settings(**{k: v for k, v in flags.items() if v is not None})


def as_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process load exactly these settings."""
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        key = ENV_PREFIX + name.upper()
        env[key] = value if isinstance(value, str) else json.dumps(value)
    return env
