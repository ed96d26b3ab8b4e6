"""Pod sandboxes: a holder per pod, launched through the core on the native runtime, whose
namespaces the pod's containers join (adapter/cri/translate.py says which). A pod whose
containers share no pid namespace (the kubelet's default) has them pinned by bind mounts, no
process (runtimes/native/pinned.py); one that shares its pid namespace has a holder process.

The pod's runtime handler may change that, as its capabilities declare: a runtime that joins
only its own containers' namespaces (docker, `pod_holder`) runs the holder itself; a runtime
whose pod is one container (libvirt's VM, `single_container_pods`) has no holder at all, and the
pod's address is its container's, known once that container started.

No pause image: a holder process is our supervisor running the host's `sleep infinity` in the
pod's new namespaces, confined like any workload. The core owns a holder, pinned or not, like
any container (network, cgroups, recovery); this module owns the pod's record and its files
under <state_dir>/cri/pods/<id>/ (hostname, hosts, resolv.conf, bound read-only into every
container of the pod).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import time
from pathlib import Path
from typing import TypeVar

from adapter.core.containerizer import Containerizer
from adapter.core.errors import ContainerizerError, FailedPrecondition, InvalidArgument, NotFound
from adapter.core.model import (
    Capabilities,
    Command,
    IdMapping,
    LaunchSpec,
    Resources,
    State,
    Statistics,
)
from adapter.core.pod_cgroups import PodCgroups
from adapter.core.sandbox import remove_directory
from adapter.core.state import ContainerRecord
from adapter.cri import events, translate
from adapter.cri.api import cri
from adapter.cri.store import POD_NOTREADY, POD_READY, Container, CriStore, Pod
from adapter.supervisor.processes import ProcessRef
from isolators.cgroups.errors import CgroupError

log = logging.getLogger(__name__)

HOLDER_RUNTIME = "native"
LABEL_POD = "io.containerizer.cri.pod"
LABEL_ROLE = "io.containerizer.cri.role"


# The files of a pod's directory, bound read-only at /etc/<name> in every container of the pod.
POD_FILES = ("hostname", "hosts", "resolv.conf")

USERNS_FIELD = "config.linux.security_context.namespace_options.userns_options"


def pod_user_namespace(
    config: cri.PodSandboxConfig, capabilities: Capabilities | None = None
) -> bool | None:
    """The pod's userns_options: POD a user namespace (the holder's, which its containers
    join), NODE the host's; absent, the node's default ([user_namespace] default). On a
    runtime whose containers cannot join one (`capabilities`), none: POD is refused."""
    options = config.linux.security_context.namespace_options
    joinable = capabilities is None or not capabilities.no_pod_user_namespace
    if not options.HasField("userns_options"):
        return None if joinable else False
    mode = options.userns_options.mode
    if mode not in (cri.POD, cri.NODE):
        raise InvalidArgument(f"{USERNS_FIELD}.mode", "must be POD or NODE")
    if mode == cri.POD and not joinable:
        raise FailedPrecondition(
            f"{USERNS_FIELD}.mode: POD: this runtime handler's containers cannot join a pod's"
            " user namespace; ask for NODE, or use another handler"
        )
    return mode == cri.POD


def pod_id_mapping(config: cri.PodSandboxConfig) -> IdMapping | None:
    """The mapping the kubelet chose for a POD user namespace (one extent of uids and one of
    gids from container id 0, of one length), or None: then the node allocates one."""
    if not pod_user_namespace(config):
        return None
    userns = config.linux.security_context.namespace_options.userns_options
    if not userns.uids and not userns.gids:
        return None
    uids, gids = list(userns.uids), list(userns.gids)
    single = len(uids) == 1 and len(gids) == 1
    if not single or uids[0].container_id or gids[0].container_id:
        raise InvalidArgument(USERNS_FIELD, "needs one uid and one gid mapping from id 0")
    if uids[0].length != gids[0].length or not uids[0].length or not uids[0].host_id:
        raise InvalidArgument(USERNS_FIELD, "the mappings need one length and host ids above 0")
    return IdMapping(uids[0].host_id, gids[0].host_id, uids[0].length)


def _pinned_files(holder: ContainerRecord) -> dict[str, str] | None:
    """kind -> the file that pins it, for a holder without a process; None for a process."""
    pinned = holder.handle.get("pinned")
    if not isinstance(pinned, dict):
        return None
    return {str(kind): str(path) for kind, path in pinned.items()}


def _network_file(holder: ContainerRecord) -> str:
    """The file of the pod's network namespace: pinned, or the holder process's."""
    pinned = _pinned_files(holder)
    return f"/proc/{holder.pid}/ns/net" if pinned is None else pinned.get("net", "")


def new_id() -> str:
    return secrets.token_hex(32)


Found = TypeVar("Found", Pod, Container)


def find(records: dict[str, Found], wanted: str, what: str) -> Found:
    """By full id or a unique prefix (crictl's short ids)."""
    if wanted in records:
        return records[wanted]
    matches = [found for key, found in records.items() if wanted and key.startswith(wanted)]
    if len(matches) == 1:
        return matches[0]
    raise NotFound(f"{what} {wanted!r} not found" + (" (ambiguous)" if matches else ""))


class Pods:
    def __init__(
        self,
        core: Containerizer,
        store: CriStore,
        root: Path,
        runtimes: set[str],
        pod_events: events.ContainerEvents,
        *,
        bridge: bool,
    ) -> None:
        self.core = core
        self.events = pod_events
        self.bridge = bridge  # the node has a bridge network (config [network])
        self.store = store
        self.root = root  # <state_dir>/cri/pods
        self.runtimes = runtimes
        self.records: dict[str, Pod] = {pod.id: pod for pod in store.load(Pod)}
        self.locks: dict[str, asyncio.Lock] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}  # pod id -> its holder's end

    def lock(self, pod_id: str) -> asyncio.Lock:
        return self.locks.setdefault(pod_id, asyncio.Lock())

    def get(self, pod_id: str) -> Pod:
        return find(self.records, pod_id, "pod sandbox")

    def files(self, pod_id: str) -> dict[str, str]:
        """host file -> its place in every container of the pod."""
        directory = self.root / pod_id
        return {str(directory / name): f"/etc/{name}" for name in POD_FILES}

    async def run(self, config: cri.PodSandboxConfig, runtime_handler: str) -> Pod:
        translate.check_pod_config(config)
        handler = runtime_handler or self.core.default_runtime
        if handler not in self.runtimes:
            raise FailedPrecondition(
                f"runtime_handler: {handler!r} is not a runtime of this node"
                f" (configured: {', '.join(sorted(self.runtimes))})"
            )
        capabilities = await self.core.capabilities(handler)
        user_namespace = pod_user_namespace(config, capabilities)
        pod = Pod(
            id=new_id(),
            config=config.SerializeToString(),
            runtime_handler=handler,
            created_at=time.time_ns(),
            holder_runtime=self._holder_runtime(handler, capabilities),
        )
        self._write_files(pod.id, config)
        self._put(pod)
        try:
            self._cgroups().create(pod.id, translate.pod_resources(config))
            if not pod.holder_runtime:
                self._publish_ready(pod)
                return pod  # ready: its one container brings the namespaces
            record = await self.core.launch(self._holder_spec(pod, config, user_namespace))
        except BaseException:
            await self._forget_failed_run(pod)
            raise
        return self._ready(pod, record)

    def _holder_runtime(self, handler: str, capabilities: Capabilities) -> str:
        """Where the pod's holder runs: native, the handler itself, or nowhere ("")."""
        if capabilities.single_container_pods:
            return ""
        if not capabilities.pods:
            raise FailedPrecondition(
                f"runtime_handler: {handler!r} cannot run a pod's containers (join its"
                " namespaces); `containerizer runtimes` shows which runtimes can (pods)"
            )
        return handler if capabilities.pod_holder else HOLDER_RUNTIME

    def container_started(self, pod: Pod, container: ContainerRecord) -> None:
        """A pod without a holder has its one container's address (a VM's)."""
        if not pod.holder_runtime and pod.state == POD_READY:
            started = pod.evolve(ip=container.ip_address)
            self._add_own_hosts_line(started, started.pod_config())
            self._put(started)

    def container_ended(self, pod_id: str) -> None:
        """... and none once that container is gone (its address is released)."""
        pod = self.records.get(pod_id)
        if pod is not None and not pod.holder_runtime and pod.ip:
            self._put(pod.evolve(ip=""))

    async def _forget_failed_run(self, pod: Pod) -> None:
        """Nothing of a pod whose holder did not start is kept: not even the core's record of
        the failed launch (and its sandbox), which nobody would ever acknowledge."""
        with contextlib.suppress(NotFound):
            if self.core.status(pod.id).state is State.TERMINATED:
                await self.core.destroy(pod.id)
        await self._remove_cgroup(pod.id)
        self.records.pop(pod.id, None)
        self.store.delete(pod)
        shutil.rmtree(self.root / pod.id, ignore_errors=True)

    def _cgroups(self) -> PodCgroups:
        if self.core.pod_cgroups is None:
            raise FailedPrecondition("this service keeps no pod cgroups")
        return self.core.pod_cgroups

    async def _remove_cgroup(self, pod_id: str) -> None:
        """The pod's cgroup goes after everything in it; a failure leaves it to the sweep at
        the next start (it is logged, the pod's removal goes on)."""
        try:
            await self._cgroups().remove(pod_id)
        except (ContainerizerError, CgroupError) as exc:
            log.warning("pod %s: its cgroup stays until the next start: %s", pod_id, exc)

    def _ready(self, pod: Pod, holder: ContainerRecord) -> Pod:
        """The running holder's address and namespace recorded, and its end watched. Also at
        recovery, for a pod whose launch a crash interrupted before this ran."""
        config = pod.pod_config()
        netns = "" if translate.host_network(config) else _network_file(holder)
        pod = pod.evolve(ip=holder.ip_address, netns=netns)
        self._add_own_hosts_line(pod, config)
        self._put(pod)
        self._watch(pod.id)
        self._publish_ready(pod)
        return pod

    def _publish_ready(self, pod: Pod) -> None:
        self.events.publish(pod.id, events.CREATED, pod)
        self.events.publish(pod.id, events.STARTED, pod)

    def _holder_spec(
        self, pod: Pod, config: cri.PodSandboxConfig, user_namespace: bool | None
    ) -> LaunchSpec:
        metadata = config.metadata
        sandbox_root = self.core.sandbox_root or self.root
        return LaunchSpec(
            container_id=pod.id,
            command=Command(argv=translate.HOLDER_COMMAND),
            resources=Resources(),
            runtime=pod.holder_runtime,
            sandbox=str(sandbox_root / pod.id),
            labels=(
                (LABEL_ROLE, "sandbox"),
                (LABEL_POD, pod.id),
                ("io.kubernetes.pod.name", metadata.name),
                ("io.kubernetes.pod.namespace", metadata.namespace),
                ("io.kubernetes.pod.uid", metadata.uid),
            ),
            network=translate.pod_network(config, bridge=self.bridge),
            linux=translate.holder_options(config, self.files(pod.id), pod.id),
            user_namespace=user_namespace,
            id_mapping=pod_id_mapping(config) if user_namespace else None,
        )

    def holder_id_mapping(self, pod: Pod) -> IdMapping | None:
        """The pod's user namespace (its holder process's), which its containers join; None:
        none."""
        if not pod.holder_runtime:
            return None  # no holder: the pod's one container has its own
        return self.core.status(pod.id).spec.id_mapping

    def _write_files(self, pod_id: str, config: cri.PodSandboxConfig) -> None:
        directory = self.root / pod_id
        directory.mkdir(parents=True, mode=0o755)
        hostname = translate.pod_hostname(config)
        if translate.host_network(config):
            shutil.copyfile("/etc/hosts", directory / "hosts")
            (directory / "hostname").write_text(Path("/etc/hostname").read_text())
        else:
            (directory / "hosts").write_text(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            )
            (directory / "hostname").write_text(hostname + "\n")
        resolv = translate.resolv_conf(config)
        if resolv is None:
            shutil.copyfile("/etc/resolv.conf", directory / "resolv.conf")
        else:
            (directory / "resolv.conf").write_text(resolv)

    def _add_own_hosts_line(self, pod: Pod, config: cri.PodSandboxConfig) -> None:
        """Once: at recovery the line may be there already."""
        if pod.ip and not translate.host_network(config):
            line = f"{pod.ip}\t{translate.pod_hostname(config)}\n"
            path = self.root / pod.id / "hosts"
            if line not in path.read_text():
                with open(path, "a") as hosts:
                    hosts.write(line)

    def check_ready(self, pod: Pod) -> None:
        if pod.state != POD_READY:
            raise FailedPrecondition(f"pod sandbox {pod.id!r} is not ready")

    def namespace_files(self, pod: Pod) -> dict[str, str]:
        """kind -> the file of the ready pod's namespace that its containers join."""
        return self._namespace_files(self._running_holder(pod))

    def _namespace_files(self, holder: ContainerRecord) -> dict[str, str]:
        """Its pinned namespaces' files, or its process's /proc/PID/ns/KIND (the pid checked
        first)."""
        pinned = _pinned_files(holder)
        if pinned is not None:
            return pinned
        pid = self._holder_pid(holder)
        return {kind: f"/proc/{pid}/ns/{kind}" for kind in ("net", "uts", "ipc", "pid", "user")}

    def _running_holder(self, pod: Pod) -> ContainerRecord:
        self.check_ready(pod)
        if not pod.holder_runtime:
            raise FailedPrecondition(
                f"pod sandbox {pod.id!r}: runtime_handler {pod.runtime_handler!r} runs one"
                " container per pod (a VM): the pod has no namespaces to join"
            )
        try:
            record = self.core.status(pod.id)
        except NotFound:
            record = None
        if record is None or record.state is not State.RUNNING:
            raise FailedPrecondition(f"pod sandbox {pod.id!r}: its namespaces are gone")
        return record

    def _holder_pid(self, holder: ContainerRecord) -> int:
        """The running holder process's pid, checked with its start time: a pid the holder left
        and another process took (before the holder's end was seen) must not hand that
        process's namespaces to the pod."""
        pod_id = holder.spec.container_id
        if not holder.pid:
            raise FailedPrecondition(f"pod sandbox {pod_id!r}: its namespaces are gone")
        if holder.spec.runtime != HOLDER_RUNTIME:
            return holder.pid  # that runtime maps the pid to its own running container, or fails
        started = holder.handle.get("child_start_time")
        if not isinstance(started, int) or not ProcessRef(holder.pid, started).is_alive():
            raise FailedPrecondition(f"pod sandbox {pod_id!r}: its holder has ended")
        return holder.pid

    def statistics(self, pod_id: str) -> Statistics:
        """The pod cgroup's accounting ({} once it is gone)."""
        try:
            return self._cgroups().statistics(pod_id)
        except (ContainerizerError, CgroupError, ValueError):
            return {}

    async def stop_holder(self, pod: Pod) -> Pod:
        """The holder ends and the pod's network is released; idempotent."""
        try:
            record = self.core.status(pod.id)
        except NotFound:
            record = None
        if record is not None and record.state is not State.TERMINATED:
            await self.core.destroy(pod.id)
        stopped = pod.evolve(state=POD_NOTREADY, netns="")
        self._put(stopped)
        return stopped

    async def remove(self, pod: Pod) -> None:
        watcher = self._watchers.pop(pod.id, None)
        if watcher is not None:
            watcher.cancel()
        try:
            self.core.status(pod.id)
            await self.core.destroy(pod.id)  # forgets a terminated record
        except NotFound:
            pass
        await self._remove_cgroup(pod.id)
        last = self.records.pop(pod.id, pod)  # as it is now: stopped by the removal
        self.store.delete(pod)
        self.locks.pop(pod.id, None)
        remove_directory(str(self.root / pod.id), POD_FILES)
        self.events.publish(pod.id, events.DELETED, last)

    async def recover(self) -> None:
        """A pod whose holder the core no longer runs is NOTREADY (its namespaces are gone); a
        running one is watched again, and finished if the crash came before `run` did. The
        cgroups and files of pods without a record go."""
        for pod in list(self.records.values()):
            if pod.state != POD_READY or not pod.holder_runtime:
                continue  # a pod without a holder is ready until it is stopped
            try:
                holder: ContainerRecord | None = self.core.status(pod.id)
            except NotFound:
                holder = None
            if holder is None or holder.state is not State.RUNNING:
                self._holder_gone(pod.id)
            elif not pod.netns and not translate.host_network(pod.pod_config()):
                self._ready(pod, holder)
            else:
                self._watch(pod.id)
        self._remove_orphan_files()
        if self.core.pod_cgroups is not None:
            for pod_id in sorted(self.core.pod_cgroups.existing() - set(self.records)):
                log.info("removing the cgroup of an unrecorded pod: %s", pod_id)
                await self._remove_cgroup(pod_id)

    def _remove_orphan_files(self) -> None:
        """Pod directories without a record: a crash came between writing them and the record."""
        if not self.root.is_dir():
            return
        for directory in self.root.iterdir():
            if directory.name not in self.records:
                log.info("removing the files of an unrecorded pod: %s", directory)
                shutil.rmtree(directory, ignore_errors=True)

    def _watch(self, pod_id: str) -> None:
        """A holder that ends on its own (killed, out of memory) takes the pod's namespaces."""
        self._watchers[pod_id] = asyncio.create_task(self._await_holder_exit(pod_id))

    async def _await_holder_exit(self, pod_id: str) -> None:
        with contextlib.suppress(NotFound):
            await self.core.wait(pod_id)
        self._watchers.pop(pod_id, None)
        self._holder_gone(pod_id)

    def _holder_gone(self, pod_id: str) -> None:
        pod = self.records.get(pod_id)
        if pod is not None and pod.state == POD_READY:
            log.info("pod %s: its holder is gone: not ready", pod_id)
            self._put(pod.evolve(state=POD_NOTREADY, netns=""))

    async def close(self) -> None:
        for watcher in self._watchers.values():
            watcher.cancel()
        self._watchers.clear()

    def _put(self, pod: Pod) -> None:
        """Stored first: a record that could not be written is not shown either. An unchanged
        one is not written again (a stopped pod is stopped again by its removal)."""
        previous = self.records.get(pod.id)
        if previous == pod:
            return
        self.store.put(pod)
        self.records[pod.id] = pod
        if previous is not None and previous.state == POD_READY and pod.state != POD_READY:
            self.events.publish(pod.id, events.STOPPED, pod)
