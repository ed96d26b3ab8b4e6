"""gRPC server wiring: config, drivers, state, recovery, socket, health, reflection, signals.

SIGTERM/SIGINT stop the service cleanly and leave running containers running: they are
re-attached at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from adapter.api.containerizer.v1 import images_pb2, images_pb2_grpc
from adapter.config import AgentConfig, load_config
from adapter.containerizer import Containerizer, default_sandbox_root
from adapter.drivers import build_driver
from adapter.errors import ConfigError, ContainerizerError
from adapter.images import open_store
from adapter.images_service import ImagesService
from adapter.service import ContainerizerService
from adapter.state import StateStore

log = logging.getLogger("containerizer")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Containerizer"].full_name
IMAGES_SERVICE_NAME = images_pb2.DESCRIPTOR.services_by_name["Images"].full_name


def _bind_unix_socket(server: grpc.aio.Server, socket_path: Path) -> str:
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()  # a stale socket from a crashed run
    address = f"unix:{socket_path}"
    server.add_insecure_port(address)
    return address


async def serve(config: AgentConfig, ready: asyncio.Event | None = None) -> None:
    config.state_dir.mkdir(parents=True, exist_ok=True)
    drivers = {name: build_driver(name, opts, config) for name, opts in config.runtimes.items()}
    sandbox_root = default_sandbox_root(config.state_dir)
    core = Containerizer(
        drivers,
        StateStore(config.state_dir / "state.db"),
        default_runtime=config.default_runtime,
        termination_retention=config.termination_retention,
        sandbox_root=sandbox_root,
        allow_privileged=config.allow_privileged,
    )
    await core.recover()
    server = grpc.aio.server()
    pb_grpc.add_ContainerizerServicer_to_server(  # type: ignore[no-untyped-call, unused-ignore]
        ContainerizerService(core, sandbox_root), server
    )
    images_pb2_grpc.add_ImagesServicer_to_server(  # type: ignore[no-untyped-call, unused-ignore]
        ImagesService(open_store(config.state_dir / "images")), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, IMAGES_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    old_umask = os.umask(0o177)  # the socket is created 0600: root's API only
    try:
        address = _bind_unix_socket(server, config.socket)
        if config.listen:
            server.add_insecure_port(config.listen)
        await server.start()
    finally:
        os.umask(old_umask)
    os.chmod(config.socket, 0o600)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving on %s%s", address, f" and {config.listen}" if config.listen else "")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("stopping; running containers keep running")
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=2)
    await core.close()
    with contextlib.suppress(FileNotFoundError):
        config.socket.unlink()


def run_server(config_path: str | None) -> int:
    logging.basicConfig(
        level=os.environ.get("CONTAINERIZER_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(config_path)
        asyncio.run(serve(config))
    except ConfigError as exc:
        print(f"containerizer: {exc}", file=sys.stderr)
        return 2
    except (ContainerizerError, OSError) as exc:
        print(f"containerizer: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0
