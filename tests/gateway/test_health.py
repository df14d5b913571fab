"""The gateway is healthy only when live workers can both prefill and decode."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from gateway.planner_link import PlannerLink
from shared.messages import ClusterStatus, WorkerStatus


def test_health_needs_both_halves_and_a_fresh_status(tmp_path: Path) -> None:
    link = PlannerLink(f"ipc://{tmp_path}/intake.sock", f"ipc://{tmp_path}/gateway.sock",
                       "test-cluster-secret-0123456789")

    def seen(*workers: tuple[str, bool]) -> bool:
        link.status = ClusterStatus([WorkerStatus(f"w{i}", role, alive, 10, 10, 0)
                                     for i, (role, alive) in enumerate(workers)], 0, 0, 0, 0)
        link.status_time = time.monotonic()
        return link.healthy()

    assert not link.healthy()
    assert not seen(("prefill", True))  # nobody to decode yet
    assert not seen(("prefill", True), ("decode", False))
    assert seen(("prefill", True), ("decode", True))
    assert seen(("colocated", True))
    link.status_time -= 5
    assert not link.healthy()
    asyncio.run(link.close())
