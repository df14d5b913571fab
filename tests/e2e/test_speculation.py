"""A server whose workers speculate with a draft model streams exactly the greedy tokens of
the plain engine, reports acceptance per SLO class, and frees every block of both caches."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from engine.engine import Engine
from server_process import IGNORE_EOS, Server, generate, start, wait_idle
from shared.messages import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serial")]

PROMPTS = ["def parse(line):", "The queue holds", "Return a list of the lines in the file.",
           "abc abc abc abc", "Once upon a time", "import os\nimport sys\n", "x = 1\ny = 2\nz =", "Hello"]
MAX_TOKENS = 16


@pytest.fixture(scope="module", params=[("--mode", "colocated"), ("--mode", "disaggregated", "--kv-transport", "zmq")],
                ids=["colocated", "disaggregated"])
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Server]:
    srv = start(tiny_model, tmp_path_factory.mktemp("spec-server"), workers=1,
                extra=("--speculator", "draft", "--draft-model", str(tiny_model), "--spec-len", "4", *request.param))
    yield srv
    srv.stop()


def test_concurrent_greedy_streams_equal_plain_decoding(server: Server, tiny_model: Path) -> None:
    client = server.client()

    def stream(prompt: str) -> str:
        chunks = client.completions.create(model=server.model, prompt=prompt, max_tokens=MAX_TOKENS,
                                           temperature=0, stream=True,
                                           extra_body={**IGNORE_EOS, "slo_class": "coding"})
        return "".join(c.choices[0].text for c in chunks)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        texts = list(pool.map(stream, PROMPTS))
    engine = Engine(tiny_model, kv_cache_mb=4)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    assert texts == [generate(engine, prompt, greedy)[1] for prompt in PROMPTS]
    metrics = wait_idle(server, min_generated=len(PROMPTS) * MAX_TOKENS)
    proposed = metrics['slos_spec_proposed_tokens_total{slo_class="coding"}']
    accepted = metrics['slos_spec_accepted_tokens_total{slo_class="coding"}']
    assert proposed >= len(PROMPTS) * 4 and accepted >= 0.8 * proposed  # its own draft agrees
