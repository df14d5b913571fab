from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from shared.settings import Settings, load
from slos_serve.launcher import place, spawn, taken_ports, up, wire


def test_unpinned_by_default() -> None:
    placement = place(Settings(workers=2), {0, 1, 2, 3})
    assert placement.core is None and placement.workers == {"worker-0": None, "worker-1": None}


def test_worker_cores_are_shared_out_and_the_rest_feed_them() -> None:
    placement = place(load(mode="disaggregated", prefill_workers=1, decode_workers=1, worker_cpus=[1, 2, 3, 4]),
                      set(range(6)))
    assert placement.workers == {"prefill-0": {1, 2}, "decode-0": {3, 4}}
    assert placement.core == {0, 5}


def test_more_workers_than_cores_take_turns_and_all_cores_to_workers_leaves_them_shared() -> None:
    placement = place(load(workers=3, worker_cpus=[0, 1]), {0, 1})
    assert placement.workers == {"worker-0": {0}, "worker-1": {1}, "worker-2": {0}}
    assert placement.core == {0, 1}


def test_bad_core_lists_are_rejected() -> None:
    for cpus in ([], [-1], [1, 1]):
        with pytest.raises(ValueError):
            load(worker_cpus=cpus)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_a_spawned_process_runs_on_its_cores() -> None:
    core = max(os.sched_getaffinity(0))
    proc = spawn(["--help"], dict(os.environ), {core})
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            allowed = next(line for line in f if line.startswith("Cpus_allowed_list"))
        assert allowed.split()[-1] == str(core)
    finally:
        proc.wait(timeout=60)


def test_a_second_server_on_a_taken_admin_port_stops_before_touching_the_first_ones_token(tmp_path: Path) -> None:
    """Before, it wrote over the first server's admin-token file, failed to bind, and still
    announced itself ready."""
    with socket.socket() as first:
        first.bind(("127.0.0.1", 0))
        first.listen()
        taken = first.getsockname()[1]
        token = tmp_path / "admin-token"
        token.write_text("the first server's\n")
        settings = Settings(port=0, admin_port=taken, admin_token_file=token)
        assert taken_ports(settings) == [taken]
        assert up(settings) == 1
        assert token.read_text() == "the first server's\n"


def test_up_makes_a_cluster_secret_unless_one_is_given(tmp_path: Path) -> None:
    made = wire(Settings(admin_token="t"), tmp_path).cluster_secret
    assert made is not None and len(made) >= 32 and made != wire(Settings(admin_token="t"), tmp_path).cluster_secret
    assert wire(Settings(admin_token="t", cluster_secret="g" * 20), tmp_path).cluster_secret == "g" * 20
    assert wire(Settings(admin_token="t", cluster_secret_file=tmp_path / "f"), tmp_path).cluster_secret is None
