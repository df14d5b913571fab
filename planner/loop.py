"""The planner process: a busy loop around the state machine (`planner.core.Planner`).

It receives msgspec messages from the gateway (PULL) and the workers (ROUTER), hands each to the
planner, schedules, and sends the batch orders and the gateway's messages. The admin API runs in
a thread of its own and reaches the planner only through commands the loop executes between
rounds (`planner.control`), so one thread owns all planner state.
"""

from __future__ import annotations

import gc
import logging
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn
import zmq

from planner.admin import create_admin_app
from planner.control import CommandQueue
from planner.core import Planner, quiet_gc
from planner.policies.base import Policy
from shared.bus import Bus, DropCounter, bind_address
from shared.clock import Clock
from shared.messages import Message, encode
from shared.roofline import Profile
from shared.settings import Settings

log = logging.getLogger(__name__)

ADMIN_START_S = 10.0  # the admin API listens within this, or the planner stops
STATUS_INTERVAL_S = 0.2
BURST = 1000  # messages taken from one socket before the loop schedules again


def serve(settings: Settings, policy: Policy, clock: Clock, stop: threading.Event, profile: Profile,
          make_policy: Callable[[str], Policy]) -> None:
    """Run the planner loop, and its admin API, until `stop` is set."""
    bus = Bus(settings.bus_secret())
    intake = bus.socket(zmq.PULL, bind=bind_address(settings.planner_intake_address, settings.bus_bind_host))
    workers = bus.socket(zmq.ROUTER, bind=bind_address(settings.planner_address, settings.bus_bind_host))
    gateway = bus.socket(zmq.PUSH, connect=settings.gateway_address)
    commands = CommandQueue()
    poller = zmq.Poller()
    poller.register(intake, zmq.POLLIN)
    poller.register(workers, zmq.POLLIN)
    poller.register(commands.wake_fd, zmq.POLLIN)
    planner = Planner(policy, clock, settings.classes(), worker_timeout_s=max(1.0, 4 * settings.heartbeat_s),
                      profile=profile, default_class=settings.default_slo_class)
    planner.state.mode = settings.mode
    admin = _start_admin(settings, commands)
    drops = DropCounter()
    last_status, room = 0.0, -1  # the queue room the gateway last heard
    quiet_gc()
    gc.freeze()  # what was loaded at start is never garbage
    log.info("planner up: intake %s, workers %s, policy %s", settings.planner_intake_address,
             settings.planner_address, policy.name)
    try:
        while not stop.is_set():
            to_gateway: list[Message] = []
            for sock, _ in poller.poll(timeout=int(settings.heartbeat_s * 1000)):
                if sock == commands.wake_fd:
                    commands.run_pending(planner, make_policy)
                    continue
                source = "worker" if sock is workers else "gateway"
                for _ in range(BURST):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    msg = drops.accept(frames[-1], source)
                    if msg is not None:
                        to_gateway += planner.handle(msg)
            to_gateway += planner.check_workers()
            orders, verdicts = planner.schedule()
            to_gateway += verdicts
            now = time.monotonic()
            # the gateway refuses by the queue's room; it counts the falls the verdicts show it
            if now - last_status > STATUS_INTERVAL_S or (planner.queue_room != room
                                                         and not 0 < planner.queue_room < room):
                to_gateway.append(planner.status(drops.dropped))
                last_status, room = now, planner.queue_room
            for worker_id, order in orders.items():
                try:
                    workers.send_multipart([worker_id.encode(), encode(order)])
                except zmq.ZMQError as exc:
                    log.error("worker %s: order not delivered (%s)", worker_id, exc)
            for msg in to_gateway:
                gateway.send(encode(msg))
    finally:
        admin.should_exit = True
        bus.close()
        commands.close()


def _start_admin(settings: Settings, commands: CommandQueue) -> uvicorn.Server:
    """The admin API in a thread; its token is the configured one or a fresh random one,
    logged and written (owner-only) to `admin_token_file`."""
    token = settings.admin_token or secrets.token_urlsafe(24)
    if settings.admin_token is None and settings.admin_token_file is not None:
        path = Path(settings.admin_token_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(token + "\n")
    server = uvicorn.Server(uvicorn.Config(create_admin_app(commands, token), host=settings.host,
                                           port=settings.admin_port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="admin-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + ADMIN_START_S
    while not server.started:  # a port already taken must stop the planner, not go unnoticed
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SystemExit(f"the admin API cannot listen on {settings.host}:{settings.admin_port}")
        time.sleep(0.01)
    where = f" (token in {settings.admin_token_file})" if settings.admin_token_file else ""
    log.info("admin API on http://%s:%d/admin%s", settings.host, settings.admin_port, where)
    if settings.admin_token is None and settings.admin_token_file is None:
        log.warning("admin token (set SLOS_ADMIN_TOKEN or admin_token_file to choose where it goes): %s", token)
    return server
