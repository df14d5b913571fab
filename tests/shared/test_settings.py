from __future__ import annotations

from pathlib import Path

import pytest

from shared.settings import Settings, as_env, load


def test_flags_beat_env_beat_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "slos.toml"
    config.write_text('port = 9000\nworkers = 3\nblock_size = 32\n[slo_classes.coding]\ntpot_ms = 40\n')
    monkeypatch.setenv("SLOS_CONFIG", str(config))
    monkeypatch.setenv("SLOS_WORKERS", "5")
    monkeypatch.setenv("SLOS_BLOCK_SIZE", "8")
    s = load(block_size=64, port=None)
    assert (s.port, s.workers, s.block_size) == (9000, 5, 64)
    assert s.slo_classes["coding"].tpot_ms == 40


def test_secure_defaults() -> None:
    s = Settings()
    assert s.host == "127.0.0.1"


def test_the_cluster_secret_comes_from_the_settings_or_its_file_and_stays_out_of_reprs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no cluster secret"):
        Settings().bus_secret()
    assert Settings(cluster_secret="s" * 20).bus_secret() == "s" * 20
    assert "s" * 20 not in repr(Settings(cluster_secret="s" * 20))
    (tmp_path / "secret").write_text("t" * 20 + "\n")
    assert Settings(cluster_secret_file=tmp_path / "secret").bus_secret() == "t" * 20


def test_as_env_reproduces_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load(port=1234, api_key="k", model_dir=Path("/m"), workers=2, cluster_secret="c" * 20)
    for key, value in as_env(s).items():
        monkeypatch.setenv(key, value)
    assert Settings() == s


def test_bad_values_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLOS_WORKERS", "0")
    with pytest.raises(ValueError):
        Settings()
