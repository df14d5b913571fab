"""The example configurations in deploy/ load as settings, so they do not rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.settings import CONFIG_ENV, load

DEPLOY = Path(__file__).parents[2] / "deploy"


@pytest.mark.parametrize("name,mode", [("colocated.toml", "colocated"), ("disaggregated.toml", "disaggregated")])
def test_example_config_loads(monkeypatch: pytest.MonkeyPatch, name: str, mode: str) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(DEPLOY / name))
    assert load().mode == mode
