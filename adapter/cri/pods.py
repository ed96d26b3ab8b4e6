"""Pod sandboxes: a holder process per pod, launched through the core on the native runtime,
whose namespaces the pod's containers join (adapter/cri/translate.py says which).

No pause image: the holder is our supervisor running the host's `sleep infinity` in the pod's new
namespaces, confined like any workload. The core owns it like any container (network, cgroups,
recovery); this module owns the pod's record and its files under <state_dir>/cri/pods/<id>/
(hostname, hosts, resolv.conf, bound read-only into every container of the pod).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import time
from pathlib import Path
from typing import TypeVar

from adapter.core.containerizer import Containerizer
from adapter.core.errors import FailedPrecondition, NotFound
from adapter.core.model import Command, LaunchSpec, Resources, State
from adapter.cri import translate
from adapter.cri.api import cri
from adapter.cri.store import POD_NOTREADY, POD_READY, Container, CriStore, Pod

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
            self.records.pop(pod.id, None)
            self.store.delete(pod)
            shutil.rmtree(self.root / pod.id, ignore_errors=True)
            raise
        netns = "" if translate.host_network(config) else f"/proc/{record.pid}/ns/net"
        pod = pod.evolve(ip=record.ip_address, netns=netns)
        self._put(pod)
        self._add_own_hosts_line(pod, config)
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
        if pod.ip and not translate.host_network(config):
            with open(self.root / pod.id / "hosts", "a") as hosts:
                hosts.write(f"{pod.ip}\t{translate.pod_hostname(config)}\n")

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
        """A pod whose holder the core no longer runs is NOTREADY (its namespaces are gone)."""
        for pod in list(self.records.values()):
            try:
                running = self.core.status(pod.id).state is State.RUNNING
            except NotFound:
                running = False
            if pod.state == POD_READY and not running:
                log.info("pod %s: its holder is gone: not ready", pod.id)
                self._put(pod.evolve(state=POD_NOTREADY, netns=""))

    def _put(self, pod: Pod) -> None:
        self.records[pod.id] = pod
        self.store.put(pod)
