"""Fixtures shared by every test folder: a random-weight model built in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.build import Shape, make_random

# vLLM's CPU attention takes heads of 32 dimensions or more
VLLM_TEST_SHAPE = Shape(hidden=128, layers=2, heads=2, kv_heads=1, intermediate=256, vocab=512)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random model that vLLM's CPU backend runs too."""
    return make_random(tmp_path_factory.mktemp("vllm-model"), VLLM_TEST_SHAPE)
