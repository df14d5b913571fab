"""Fixtures shared by every test folder: a random-weight model built in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.build import make_random


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random(tmp_path_factory.mktemp("tiny-model"))
