"""gRPC server wiring, the service's composition root: config, state, the shared services
(built once, adapter/core/services.py), drivers, recovery, socket, health, reflection, signals.

SIGTERM/SIGINT stop the service cleanly and leave running containers running: they are
re-attached at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import resource
import signal
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from adapter.api.containerizer.v1 import images_pb2, images_pb2_grpc
from adapter.core.config import AgentConfig, load_config
from adapter.core.containerizer import Containerizer
from adapter.core.disk import DiskAccounting
from adapter.core.errors import ConfigError, ContainerizerError, Unavailable
from adapter.core.model import State
from adapter.core.pod_cgroups import PodCgroups
from adapter.core.sandbox import default_sandbox_root
from adapter.core.services import build_services
from adapter.core.state import StateStore, database_is_empty
from adapter.core.state_dir import (
    StateDirLock,
    lock_state_dir,
    make_private_directory,
    mount_nosuid,
    refuse_start_without_records,
    unmount_nosuid,
)
from adapter.cri.api import cri_grpc
from adapter.cri.images import CriImageService
from adapter.cri.runtime import CriRuntime, CriRuntimeService
from adapter.images.leases import ImageUse
from adapter.images.store import ImageStore
from adapter.runtimes.registry import build_driver
from adapter.server.containers import ContainerizerService
from adapter.server.images import ImagesService
from adapter.server.mesos import start_ecp_endpoint
from adapter.server.observability import Observability
from adapter.server.service_log import configure_logging
from isolators.cgroups.warm import AttachWarmer, OwnCgroup
from isolators.disk.isolator import DiskIsolator

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


def _bind_tls_listener(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials
) -> None:
    try:
        server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # grpc says only "failed to bind"
        raise Unavailable(
            f"listen: cannot listen on {address} (the port is in use, or tls_cert and tls_key"
            " do not belong together)"
        ) from exc


def _claim_state_dir(config: AgentConfig, sandbox_root: Path) -> tuple[StateDirLock, StateStore]:
    """Private modes, this process's lock, then the store: refused over lost records."""
    make_private_directory(config.state_dir)
    make_private_directory(sandbox_root)
    lock = lock_state_dir(config.state_dir)
    try:
        mount_nosuid(sandbox_root)
    except OSError as exc:
        lock.close()
        raise ConfigError(f"state_dir: cannot mount {sandbox_root} nosuid: {exc}") from exc
    try:
        database = config.state_dir / "state.db"
        refuse_start_without_records(
            database,
            database_is_empty(database),
            state_dir=config.state_dir,
            cgroups_root=config.cgroups_root,
            cgroups_hierarchy=config.cgroups_hierarchy,
        )
        return lock, StateStore(database)
    except BaseException:
        lock.close()
        raise


def _listener_credentials(config: AgentConfig) -> grpc.ServerCredentials:
    """Mutual TLS for the TCP listener: only clients with a certificate of tls_client_ca."""
    pem: dict[str, bytes] = {}
    for key in ("tls_cert", "tls_key", "tls_client_ca"):
        path: Path | None = getattr(config, key)
        where = f"{config.source or '<config>'}: {key}"
        if path is None:
            raise ConfigError(f"{where}: required with listen (mutual TLS)")
        try:
            pem[key] = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
        if b"-----BEGIN " not in pem[key]:
            raise ConfigError(f"{where}: {path} is not a PEM file")
    return grpc.ssl_server_credentials(
        [(pem["tls_key"], pem["tls_cert"])],
        root_certificates=pem["tls_client_ca"],
        require_client_auth=True,
    )


def _container_images(core: Containerizer, cri_runtime: CriRuntime) -> dict[str, ImageUse]:
    """Which image each container that is not TERMINATED named, and each CRI container not
    yet removed: the image store keeps what they run on."""
    uses = {
        record.container_id: ImageUse(record.spec.image, record.state is State.LAUNCHING)
        for record in core.containers()
        if record.spec.image and record.state is not State.TERMINATED
    }
    for container in cri_runtime.containers.records.values():
        uses.setdefault(container.id, ImageUse(container.image_ref, False))
    return uses


async def _start_cri_server(
    cri_runtime: CriRuntime, images: ImageStore, path: Path
) -> grpc.aio.Server:
    """Kubernetes' CRI on its own socket (0600), so that only the CRI's services answer there."""
    server = grpc.aio.server()
    cri_grpc.add_RuntimeServiceServicer_to_server(  # type: ignore[no-untyped-call]
        CriRuntimeService(cri_runtime), server
    )
    cri_grpc.add_ImageServiceServicer_to_server(  # type: ignore[no-untyped-call]
        CriImageService(images), server
    )
    old_umask = os.umask(0o177)
    try:
        _bind_unix_socket(server, path)
        await server.start()
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return server


async def serve(config: AgentConfig, ready: asyncio.Event | None = None) -> None:
    credentials = _listener_credentials(config) if config.listen else None
    sandbox_root = default_sandbox_root(config.state_dir)
    # Held until the process ends: the lock is what keeps a second service off these records.
    lock, store = _claim_state_dir(config, sandbox_root)
    try:
        await _serve_claimed(config, credentials, sandbox_root, store, ready)
    finally:
        unmount_nosuid(sandbox_root)  # kept while a sandbox is there (its container runs on)
        lock.close()


async def _serve_claimed(
    config: AgentConfig,
    credentials: grpc.ServerCredentials | None,
    sandbox_root: Path,
    store: StateStore,
    ready: asyncio.Event | None,
) -> None:
    # Once, after the lock: every runtime and the Images API get the same store, isolator, ...
    services = build_services(config)
    drivers = {name: build_driver(name, opts, services) for name, opts in config.runtimes.items()}
    core = Containerizer(
        drivers,
        store,
        default_runtime=config.default_runtime,
        termination_retention=config.termination_retention,
        sandbox_root=sandbox_root,
        allow_privileged=config.allow_privileged,
        network=services.network,
        disk=DiskAccounting(DiskIsolator(interval=config.disk_watch_interval)),
        user_namespaces=services.user_namespaces,
        user_namespace_default=config.user_namespace.default,
        pod_cgroups=PodCgroups(services),
        attach_warmer=AttachWarmer(OwnCgroup().procs_file),
    )
    observability = Observability(config, core)
    await observability.start()
    await core.recover()
    observability.recovered()
    cri_runtime = CriRuntime(
        core,
        services.images,
        config.state_dir,
        bridge=config.network.enabled,
        streaming_address=config.cri_streaming_address,
    )
    await cri_runtime.recover()
    await cri_runtime.streaming.start()
    services.images.containers = functools.partial(_container_images, core, cri_runtime)
    server = grpc.aio.server(interceptors=observability.interceptors())
    containers_service = ContainerizerService(core, sandbox_root, state_dir=config.state_dir)
    pb_grpc.add_ContainerizerServicer_to_server(  # type: ignore[no-untyped-call, unused-ignore]
        containers_service, server
    )
    images_pb2_grpc.add_ImagesServicer_to_server(  # type: ignore[no-untyped-call, unused-ignore]
        ImagesService(services.images), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, IMAGES_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    old_umask = os.umask(0o177)  # the socket is created 0600: root's API only
    try:
        address = _bind_unix_socket(server, config.socket)
        if config.listen and credentials is not None:
            _bind_tls_listener(server, config.listen, credentials)
        await server.start()
    finally:
        os.umask(old_umask)
    os.chmod(config.socket, 0o600)
    # containerizer-mesos's socket: the same servicer, for a program that cannot afford grpc.
    ecp_endpoint = await start_ecp_endpoint(containers_service, config.socket, config.mesos_socket)
    cri_socket = config.cri_socket or config.socket.parent / "cri.sock"
    cri_server = await _start_cri_server(cri_runtime, services.images, cri_socket)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving on %s%s", address, f" and {config.listen}" if config.listen else "")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    observability.serving()
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("stopping; running containers keep running")
    await observability.stopping()
    await health_servicer.enter_graceful_shutdown()
    await ecp_endpoint.close()
    # The kubelet's event stream ends first: an open one would hold the CRI server's grace.
    cri_runtime.events.close()
    await asyncio.gather(server.stop(grace=2), cri_server.stop(grace=2))
    await cri_runtime.close()
    await core.close()
    for path in (config.socket, cri_socket):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _raise_open_file_limit() -> None:
    """Each running container can hold a few descriptors here (a docker log stream and its two
    files, an attach or exec pipe): a shell's soft limit of 1024 would run out long before the
    hard one that the unit file and the kernel allow."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_server(config_path: str | None) -> int:
    try:
        config = load_config(config_path)
        configure_logging(config.log_format)
        _raise_open_file_limit()
        asyncio.run(serve(config))
    except ConfigError as exc:
        print(f"containerizer: {exc}", file=sys.stderr)
        return 2
    except (ContainerizerError, OSError) as exc:
        print(f"containerizer: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0
