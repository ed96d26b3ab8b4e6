"""The docker runtime ("docker"; Mesos' DockerContainerizer): containers on Docker Engine.

Translation only: a LaunchSpec becomes an Engine API container (the one Limits value of
adapter/core/limits.py, `CgroupParent` under our cgroups_root so accounting is the one cgroup
reader, the sandbox bind-mounted at /mnt/mesos/sandbox, Docker's init as pid 1); Docker's inspect
state becomes an Exit. client.py owns the API calls, handle.py names and paths, network.py the
network: the node's network isolator, joined through a sandbox container in bridge mode; Docker's
own `none` (the default without a [network] table) and `host` need no sandbox.

Choices, and why:
- Output: Docker's json-file log driver keeps a container's complete stdout/stderr until the
  container is removed; output.py follows it into the sandbox files while the container runs
  (one connection per container, no thread), and cleanup makes them complete before it removes
  the container. Nothing is lost across our crashes (the container, and so its log, stays until
  a cleanup has copied it), and nothing is copied twice (offsets, see output.py).
- Exec: Docker's exec API, as the workload runs (exec.py); the command is in the container's
  pid namespace and cgroups, and killed on timeout, cancel, or when its caller goes away.
- Signals: Docker reports a container whose init died of signal n as exit code 128+n (so does
  the shell, and so does Docker's init, tini, for its child). With `Init` set the workload is not
  pid 1, so it dies of signals the way it would under our native runtime, and 128+n (n a valid
  signal number) is reported as signal n, like every other runtime; a workload that literally
  exits 137 is indistinguishable, exactly as it is in a shell's `$?`.
- OOM: Docker's State.OOMKilled (the cgroup's OOM event) is Mesos' memory limitation.
- Confinement: confinement.py translates adapter/core/confinement.py's policy into HostConfig.
- Command: an empty request command sets neither Entrypoint nor Cmd, so Docker runs the image's;
  the working directory is the request's, else the image's, else the sandbox
  (adapter/core/workload.py).
- Pods (CRI): Docker joins only its own containers' namespaces, so a pod's holder runs here too
  (Capabilities.pod_holder) and a pod's container joins it by `container:<id>` (pod.py); the
  holder, launched without an image, runs a busybox image the driver imports itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from adapter.core.confinement import Confinement
from adapter.core.errors import (
    AlreadyExists,
    ContainerizerError,
    FailedPrecondition,
    InvalidArgument,
    LaunchFailed,
    NotFound,
    Unavailable,
)
from adapter.core.model import (
    Capabilities,
    ExecResult,
    Exit,
    Fingerprint,
    LaunchSpec,
    Resources,
    Statistics,
)
from adapter.core.services import Services
from adapter.runtimes.base import Checkpointed, ExecSession, Launched
from adapter.runtimes.crilog import check_log_file
from adapter.runtimes.docker import exec as execs
from adapter.runtimes.docker import handle as names
from adapter.runtimes.docker import pod
from adapter.runtimes.docker.client import DockerEngine, ExitFollower, Inspect
from adapter.runtimes.docker.confinement import NodeCapabilities
from adapter.runtimes.docker.container_config import container_config, resource_fields
from adapter.runtimes.docker.container_state import (
    Tracked,
    exit_from_inspect,
    has_ended,
    remove_cgroups,
    sandbox_of,
    stop_owned,
)
from adapter.runtimes.docker.handle import DockerHandle
from adapter.runtimes.docker.images import DockerImage, DockerImages
from adapter.runtimes.docker.network import DockerNetwork, PreparedNetwork
from adapter.runtimes.docker.options import DockerOptions
from adapter.runtimes.docker.output import (
    OutputFollowers,
    OutputTarget,
    Rotation,
    output_sizes,
)
from adapter.supervisor.oci_seccomp import launch_profile
from isolators.cgroups.accounting import read_statistics
from isolators.cgroups.hierarchy import check_root
from isolators.registry import ACCOUNTED_CONTROLLERS

log = logging.getLogger(__name__)

WAIT_POLL_SECONDS = 30.0  # re-inspect now and then even without an event: belt and braces
CAPABILITIES = Capabilities(
    pods=True,
    pod_holder=True,
    images=True,
    live_update=True,
    oom_detection=True,
    pid_namespace=True,
    recover=True,
    network_isolation=True,
)
# The storage driver whose containers' layer is a directory we can measure (writable_dirs).
MEASURED_STORAGE_DRIVER = "overlay2"


class DockerDriver:
    name = "docker"

    def __init__(self, options: DockerOptions, services: Services) -> None:
        self._sandbox_image = options.sandbox_image
        self._engine = DockerEngine(options.endpoint)
        self._images = DockerImages(self._engine, options.registry)
        self._owner = str(services.node.state_dir)
        check_root(services.node.cgroups_root)
        self._node = services.node
        self._services = services  # its cgroups are discovered at the first usage
        self._node_capabilities = NodeCapabilities.of_this_node()
        self._network = DockerNetwork(
            services.network, self._engine, self._owner, self._cgroup_parent
        )
        self._tracked: dict[str, Tracked] = {}
        self._follower = ExitFollower(
            self._engine, f"{names.LABEL_OWNER}={self._owner}", self._on_exit_event
        )
        rotation = Rotation(services.node.log_max_size, services.node.log_max_files)
        self._outputs = OutputFollowers(self._engine, rotation)

    # ---- fingerprint ----

    async def fingerprint(self) -> Fingerprint:
        try:
            version = await self._engine.version()
            info = await self._engine.info()
        except ContainerizerError as exc:
            return Fingerprint(self.name, "", False, str(exc), CAPABILITIES)
        driver = info.get("CgroupDriver", "unknown")
        message = (
            f"Docker Engine {version.get('Version')} (API {version.get('ApiVersion')}) at"
            f" {self._engine.where}; cgroup driver {driver}"
        )
        if driver != "cgroupfs":
            message += " (usage needs cgroupfs: containers are placed by CgroupParent)"
        # dockerd maps every container itself with userns-remap (its own range, not ours);
        # without it a user_namespace launch is refused (the core asks this capability).
        remapped = any("name=userns" in option for option in info.get("SecurityOptions") or ())
        measured = info.get("Driver") == MEASURED_STORAGE_DRIVER
        return Fingerprint(
            self.name,
            str(version.get("Version", "")),
            True,
            message,
            replace(CAPABILITIES, user_namespace=remapped, disk_enforced=measured),
            confinement=Confinement().summary(),
        )

    # ---- launch ----

    def _cgroup_parent(self, container_id: str) -> str:
        """Where the core puts the container's cgroups (its pod's, if it is in one)."""
        return names.cgroup_parent(self._services.cgroups.hierarchies.relative(container_id))

    async def start(self, spec: LaunchSpec) -> Launched:
        modes = await pod.namespace_modes(spec.linux, self._own_container_with_pid)
        # Bad network input fails before dockerd sees it; a joined network needs no sandbox.
        mode = self._network.mode(spec) if modes.network_mode is None else ""
        if not spec.image and spec.linux.pod != spec.container_id:
            raise InvalidArgument("container.image", "the docker runtime needs an image to run")
        # A pod's holder (the pod's own id) has no image: it runs one the driver makes.
        image = await (self._images.ensure(spec.image) if spec.image else self._images.holder())
        if not spec.command.resolved_argv() and not image.has_command():
            raise InvalidArgument(
                "command",
                f"is empty and image {spec.image!r} has no Entrypoint or Cmd:"
                " give a shell string or an argv",
            )
        # The node's Localhost profile, read and checked as for containerd (plain OCI JSON).
        localhost = await launch_profile(spec)
        await self._follower.start()
        network = PreparedNetwork(modes.network_mode or mode)
        if mode == "bridge":
            sandbox_image = image
            if self._sandbox_image is not None:
                sandbox_image = await self._images.ensure(self._sandbox_image)
            network = await self._network.prepare_bridge(spec, sandbox_image.reference)
        tracked = await self._create_and_start(spec, image, network, modes, localhost)
        return Launched(
            handle=tracked.handle.to_json(),
            pid=tracked.pid,
            warnings=self._node_capabilities.warnings(spec),
            ip_address=network.address,
        )

    async def writable_dirs(self, container_id: str) -> tuple[str, ...]:
        """The container's layer as dockerd reports it (overlay2's GraphDriver.Data.UpperDir,
        in dockerd's data root); FailedPrecondition under a storage driver without one."""
        tracked = self._tracked.get(container_id)
        if tracked is None:
            return ()
        inspect = await self._engine.inspect(tracked.handle.docker_id)
        graph = inspect.get("GraphDriver") or {}
        upper = (graph.get("Data") or {}).get("UpperDir")
        if not (isinstance(upper, str) and upper.startswith("/")):
            raise FailedPrecondition(
                f"docker's storage driver {graph.get('Name')!r} shows no writable layer"
                f" ({MEASURED_STORAGE_DRIVER} does)"
            )
        return (upper,)

    async def _own_container_with_pid(self, pid: int) -> Inspect:
        """The running container of this driver whose init is `pid` (a pod's holder): only
        containers it launched are candidates, so a pid never leads anywhere else."""
        for tracked in list(self._tracked.values()):
            if tracked.pid not in (0, pid):
                continue
            with contextlib.suppress(NotFound):
                inspect = await self._engine.inspect(tracked.handle.docker_id)
                state = inspect["State"]
                if state.get("Running") and int(state.get("Pid") or 0) == pid:
                    return inspect
        raise FailedPrecondition(
            f"linux.namespaces: process {pid} is no running container of the docker runtime"
            " (a docker pod's holder runs on docker)"
        )

    async def _create_and_start(
        self,
        spec: LaunchSpec,
        image: DockerImage,
        network: PreparedNetwork,
        modes: pod.PodModes,
        localhost: dict[str, Any] | None,
    ) -> Tracked:
        cid = spec.container_id
        name = names.container_name(self._owner, cid)
        if spec.linux.log_path:  # a log that cannot be written fails the launch, saying why
            check_log_file(spec.linux.log_path)
        config = self._container_config(spec, image, network, modes, localhost)
        try:
            docker_id = await self._engine.create(name, config, LaunchFailed)
        except AlreadyExists:  # a leftover of an interrupted launch or cleanup: ours by name
            await self._remove(name, cid, copy_logs=False)
            docker_id = await self._engine.create(name, config, LaunchFailed)
        cgroup = f"{self._cgroup_parent(cid)}/{docker_id}"
        stdout_offset, stderr_offset = output_sizes(Path(spec.sandbox))
        handle = DockerHandle(
            docker_id, name, cgroup, image.reference, network.sandbox_id,
            stdout_offset, stderr_offset, spec.linux.log_path,
        )  # fmt: skip
        tracked = Tracked(handle, Path(spec.sandbox))
        self._tracked[cid] = tracked
        await self._engine.start(docker_id, LaunchFailed)
        self._outputs.follow(cid, tracked.output())
        inspect = await self._engine.inspect(docker_id)
        tracked.pid = int(inspect["State"].get("Pid") or 0)
        reported = names.cgroup_of_process(tracked.pid) if tracked.pid else None
        if reported is not None and reported != handle.cgroup:
            tracked.handle = dataclasses.replace(handle, cgroup=reported)
        return tracked

    def _container_config(
        self,
        spec: LaunchSpec,
        image: DockerImage,
        network: PreparedNetwork,
        modes: pod.PodModes = pod.NO_POD,
        localhost: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """create_container keyword arguments, with this driver's owner, limits and cgroups."""
        return container_config(
            spec,
            image,
            network,
            modes,
            localhost,
            owner=self._owner,
            limits=self._node.limits(spec.resources),
            cgroup_parent=self._cgroup_parent(spec.container_id),
            node_capabilities=self._node_capabilities,
        )

    # ---- exit ----

    def _on_exit_event(self, container_id: str | None) -> None:
        if container_id is None:
            for tracked in self._tracked.values():
                tracked.died.set()
        elif container_id in self._tracked:
            self._tracked[container_id].died.set()

    async def wait(self, container_id: str) -> Exit:
        tracked = self._tracked.get(container_id)
        if tracked is None:
            return Exit(lost=True, message="the docker runtime has no record of this container")
        backoff = 0.5
        while True:
            tracked.died.clear()
            try:
                await self._follower.start()
                inspect = await self._engine.inspect(tracked.handle.docker_id)
            except NotFound:
                return Exit(
                    lost=True,
                    message=f"docker container {tracked.handle.docker_id[:12]} is gone",
                )
            except Unavailable as exc:  # dockerd restarting: keep waiting, slowly
                log.warning("wait on %s: %s", container_id, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if has_ended(inspect):
                return exit_from_inspect(inspect)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tracked.died.wait(), WAIT_POLL_SECONDS)

    async def signal(self, container_id: str, signal: int) -> None:
        tracked = self._tracked.get(container_id)
        if tracked is None:
            raise NotFound(f"docker runtime: no running container {container_id!r}")
        with contextlib.suppress(FailedPrecondition):  # already exited: wait() reports it
            await self._engine.kill(tracked.handle.docker_id, signal)

    # ---- kill_all, cleanup ----

    def _target(self, container_id: str) -> str:
        """The container to act on: by id when tracked, else by its deterministic name."""
        tracked = self._tracked.get(container_id)
        return (
            tracked.handle.docker_id if tracked else names.container_name(self._owner, container_id)
        )

    async def kill_all(self, container_id: str) -> None:
        """SIGKILL (as Mesos destroys) and return once Docker has it stopped, so the wait sees
        the exit at once rather than at its next poll."""
        await stop_owned(self._engine, self._owner, self._target(container_id))
        tracked = self._tracked.get(container_id)
        if tracked is not None:
            tracked.died.set()

    async def cleanup(self, container_id: str) -> None:
        tracked = self._tracked.get(container_id)
        await self._remove(self._target(container_id), container_id, copy_logs=True)
        # The workload is gone: its network may go (the sandbox first, then the isolator's part).
        await self._network.release(container_id, tracked.handle.sandbox_id if tracked else "")
        self._tracked.pop(container_id, None)
        if tracked is not None:
            tracked.died.set()
        await remove_cgroups(self._services.cgroups.hierarchies, container_id)

    async def _remove(self, target: str, container_id: str, *, copy_logs: bool) -> None:
        """Kill (if it still runs), copy the output, remove; no container of ours is no error."""
        inspect = await stop_owned(self._engine, self._owner, target)
        if inspect is None:
            return
        docker_id = str(inspect["Id"])
        if copy_logs:
            await self._finish_output(container_id, inspect)
        with contextlib.suppress(NotFound):
            await self._engine.remove(docker_id)

    async def _finish_output(self, container_id: str, inspect: Inspect) -> None:
        """The container has stopped: its output complete in the sandbox files, which the
        container's own mount names (so this needs no record of ours)."""
        sandbox = sandbox_of(inspect)
        if sandbox is None or not sandbox.is_dir():
            await self._outputs.stop(container_id)
            return
        docker_id = str(inspect["Id"])
        tracked = self._tracked.get(container_id)
        if tracked is not None and tracked.handle.docker_id == docker_id:
            target = dataclasses.replace(tracked.output(), sandbox=sandbox)
        else:
            target = OutputTarget(docker_id, sandbox)
        await self._outputs.finish(container_id, target)

    async def reopen_log(self, container_id: str) -> None:
        """ReopenContainerLog: the CRI log's path opened again (the kubelet renamed the file)."""
        self._outputs.reopen(container_id)

    # ---- exec ----

    async def exec_sync(
        self, container_id: str, argv: tuple[str, ...], timeout: float | None
    ) -> ExecResult:
        target = await self._exec_target(container_id)
        return await execs.exec_sync(self._engine, target, argv, timeout)

    async def exec_stream(
        self, container_id: str, argv: tuple[str, ...], *, tty: bool
    ) -> ExecSession:
        target = await self._exec_target(container_id)
        return await execs.open_exec(self._engine, target, argv, tty=tty, stdin=True)

    async def _exec_target(self, container_id: str) -> execs.ExecTarget:
        tracked = self._tracked.get(container_id)
        if tracked is None:
            raise NotFound(f"docker runtime: no running container {container_id!r}")
        inspect = await self._engine.inspect(tracked.handle.docker_id)
        return execs.ExecTarget.of(inspect, tracked.handle.cgroup)

    # ---- update and usage ----

    async def update(self, container_id: str, resources: Resources) -> None:
        tracked = self._tracked.get(container_id)
        if tracked is None:
            raise NotFound(f"docker runtime: no running container {container_id!r}")
        fields = resource_fields(self._node.limits(resources))
        if fields:
            for warning in await self._engine.update(tracked.handle.docker_id, fields):
                log.warning("docker update of %s: %s", container_id, warning)

    async def usage(self, container_id: str) -> Statistics:
        tracked = self._tracked.get(container_id)
        if tracked is None:
            raise NotFound(f"docker runtime: no running container {container_id!r}")
        hierarchies = self._services.cgroups.hierarchies
        dirs = hierarchies.dirs_at(tracked.handle.cgroup, ACCOUNTED_CONTROLLERS)
        return read_statistics(dirs)

    # ---- recovery ----

    async def recover(self, checkpointed: list[Checkpointed], known_ids: set[str]) -> None:
        for entry in checkpointed:
            if entry.handle:
                handle = DockerHandle.from_json(entry.handle)
                tracked = Tracked(handle, Path(entry.spec.sandbox))
                self._tracked[entry.spec.container_id] = tracked
                # On from where the files are; retried until dockerd answers, if it is down.
                self._outputs.follow(entry.spec.container_id, tracked.output())
        try:
            await self._follower.start()
            containers = await self._engine.owned_containers(f"{names.LABEL_OWNER}={self._owner}")
        except Unavailable as exc:
            log.warning("docker: cannot recover now (%s); waits retry until dockerd is back", exc)
            return
        for container in containers:
            await self._recover_container(container, known_ids)

    async def _recover_container(self, container: dict[str, Any], known_ids: set[str]) -> None:
        """Keep a workload or sandbox that a checkpointed handle names; leave a known id's
        leftovers to the core's kill_all and cleanup; remove the rest: containers of ids no
        checkpoint knows, and a workload or sandbox of a known id that is not the one its handle
        names (a sandbox whose workload was never created is removed by that cleanup)."""
        labels = container.get("Labels") or {}
        cid = labels.get(names.LABEL_CONTAINER_ID, "")
        docker_id = str(container["Id"])
        tracked = self._tracked.get(cid)
        if tracked is not None and docker_id in (
            tracked.handle.docker_id,
            tracked.handle.sandbox_id,
        ):
            return  # re-attached
        if tracked is None and cid in known_ids:
            return  # a terminated or half-launched record: the core cleans it up
        log.info("docker: removing orphan container %s (%s)", docker_id[:12], cid)
        with contextlib.suppress(ContainerizerError):
            if labels.get(names.LABEL_ROLE) == names.ROLE_SANDBOX:
                await self._network.remove_sandbox(docker_id)
            else:
                await self._remove(docker_id, cid, copy_logs=False)
            if cid and cid not in known_ids:
                await remove_cgroups(self._services.cgroups.hierarchies, cid)

    async def close(self) -> None:
        self._follower.stop()
        await self._outputs.close()
        await self._engine.close()
