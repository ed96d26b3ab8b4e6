"""Pod sandboxes: a holder process per pod, launched through the core on the native runtime,
whose namespaces the pod's containers join (adapter/cri/translate.py says which).

No pause image: the holder is our supervisor running the host's `sleep infinity` in the pod's new
namespaces, confined like any workload. The core owns it like any container (network, cgroups,
recovery); this module owns the pod's record and its files under <state_dir>/cri/pods/<id>/
(hostname, hosts, resolv.conf, bound read-only into every container of the pod).
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
from adapter.core.errors import FailedPrecondition, NotFound
from adapter.core.model import Command, LaunchSpec, Resources, State
from adapter.core.state import ContainerRecord
from adapter.cri import translate
from adapter.cri.api import cri
from adapter.cri.store import POD_NOTREADY, POD_READY, Container, CriStore, Pod
from adapter.supervisor.processes import ProcessRef

log = logging.getLogger(__name__)

HOLDER_RUNTIME = "native"
LABEL_POD = "io.containerizer.cri.pod"
LABEL_ROLE = "io.containerizer.cri.role"


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
        self, core: Containerizer, store: CriStore, root: Path, runtimes: set[str], *, bridge: bool
    ) -> None:
        self.core = core
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
        return {
            str(directory / name): f"/etc/{name}" for name in ("hostname", "hosts", "resolv.conf")
        }

    async def run(self, config: cri.PodSandboxConfig, runtime_handler: str) -> Pod:
        translate.check_pod_config(config)
        handler = runtime_handler or self.core.default_runtime
        if handler not in self.runtimes:
            raise FailedPrecondition(
                f"runtime_handler: {handler!r} is not a runtime of this node"
                f" (configured: {', '.join(sorted(self.runtimes))})"
            )
        fingerprint = await self.core.drivers[handler].fingerprint()
        if not fingerprint.capabilities.pods:
            raise FailedPrecondition(
                f"runtime_handler: {handler!r} cannot run a pod's containers (join its"
                " namespaces); `containerizer runtimes` shows which runtimes can (pods)"
            )
        pod = Pod(
            id=new_id(),
            config=config.SerializeToString(),
            runtime_handler=handler,
            created_at=time.time_ns(),
        )
        self._write_files(pod.id, config)
        self.records[pod.id] = pod
        self.store.put(pod)
        try:
            record = await self.core.launch(self._holder_spec(pod, config))
        except BaseException:
            await self._forget_failed_run(pod)
            raise
        return self._ready(pod, record)

    async def _forget_failed_run(self, pod: Pod) -> None:
        """Nothing of a pod whose holder did not start is kept: not even the core's record of
        the failed launch (and its sandbox), which nobody would ever acknowledge."""
        with contextlib.suppress(NotFound):
            if self.core.status(pod.id).state is State.TERMINATED:
                await self.core.destroy(pod.id)
        self.records.pop(pod.id, None)
        self.store.delete(pod)
        shutil.rmtree(self.root / pod.id, ignore_errors=True)

    def _ready(self, pod: Pod, holder: ContainerRecord) -> Pod:
        """The running holder's address and namespace recorded, and its end watched. Also at
        recovery, for a pod whose launch a crash interrupted before this ran."""
        config = pod.pod_config()
        netns = "" if translate.host_network(config) else f"/proc/{holder.pid}/ns/net"
        pod = pod.evolve(ip=holder.ip_address, netns=netns)
        self._add_own_hosts_line(pod, config)
        self._put(pod)
        self._watch(pod.id)
        return pod

    def _holder_spec(self, pod: Pod, config: cri.PodSandboxConfig) -> LaunchSpec:
        metadata = config.metadata
        sandbox_root = self.core.sandbox_root or self.root
        return LaunchSpec(
            container_id=pod.id,
            command=Command(argv=translate.HOLDER_COMMAND),
            resources=Resources(),
            runtime=HOLDER_RUNTIME,
            sandbox=str(sandbox_root / pod.id),
            labels=(
                (LABEL_ROLE, "sandbox"),
                (LABEL_POD, pod.id),
                ("io.kubernetes.pod.name", metadata.name),
                ("io.kubernetes.pod.namespace", metadata.namespace),
                ("io.kubernetes.pod.uid", metadata.uid),
            ),
            network=translate.pod_network(config, bridge=self.bridge),
            linux=translate.holder_options(config, self.files(pod.id)),
        )

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

    def holder_pid(self, pod: Pod) -> int:
        """The running holder's pid, whose /proc/PID/ns/* the pod's containers join."""
        if pod.state != POD_READY:
            raise FailedPrecondition(f"pod sandbox {pod.id!r} is not ready")
        try:
            record = self.core.status(pod.id)
        except NotFound:
            record = None
        if record is None or record.state is not State.RUNNING or not record.pid:
            raise FailedPrecondition(f"pod sandbox {pod.id!r}: its namespaces are gone")
        # The pid with its start time: a pid the holder left and another process took (before
        # the holder's end was seen) must not hand that process's namespaces to the pod.
        started = record.handle.get("child_start_time")
        if not isinstance(started, int) or not ProcessRef(record.pid, started).is_alive():
            raise FailedPrecondition(f"pod sandbox {pod.id!r}: its holder has ended")
        return record.pid

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
        self.records.pop(pod.id, None)
        self.store.delete(pod)
        self.locks.pop(pod.id, None)
        shutil.rmtree(self.root / pod.id, ignore_errors=True)

    def recover(self) -> None:
        """A pod whose holder the core no longer runs is NOTREADY (its namespaces are gone); a
        running one is watched again, and finished if the crash came before `run` did."""
        for pod in list(self.records.values()):
            if pod.state != POD_READY:
                continue
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
        self.records[pod.id] = pod
        self.store.put(pod)
