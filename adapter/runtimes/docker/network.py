"""The network of a Docker container: the node's network isolator, joined through a sandbox.

Docker cannot start a container in a namespace given by path (what containerd, LXC and the
native runtime do with `Attachment.netns_path`): it makes a fresh one (`none`), uses the host's
(`host`), or shares another container's (`container:<id>`). So bridge mode uses the
pause-container pattern:

  1. a sandbox container of ours, `NetworkMode: none`, running `sleep infinity` (from the
     workload's image, or runtimes.docker.sandbox_image), unprivileged and read-only, in the
     container's cgroup parent; its hostname is the container's (a pod's, for a pod holder);
  2. the isolator adopts its namespace (/proc/<pid>/ns/net) at the path it would have created
     (isolators/network: `prepare(..., netns_source=...)`) and attaches it as for every runtime:
     veth on our bridge, address, default route, tc rate, nftables port forwards (never Docker's
     `-p`: its proxy and iptables play no part);
  3. the workload is created with `NetworkMode: container:<sandbox id>`, the isolator's
     /etc/hosts and /etc/resolv.conf bound read-only over Docker's own (Docker leaves a path
     alone when a mount targets it), so it sees its own address and hostname, as on containerd.

Modes none and host are Docker's own and need no sandbox; a launch that names no mode on a node
without a [network] table keeps `none`, as before the isolator existed.

Ownership: the sandbox carries our labels (owner, container id, role) and a name derived from
the container's (handle.py), so destroy and recovery find it without any checkpoint; the
adopted namespace is the isolator's (its bind mount keeps it alive when the sandbox is gone,
its cleanup and recovery sweep remove it). Cleanup removes workload, sandbox, then network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter.core.errors import AlreadyExists, FailedPrecondition, LaunchFailed, NotFound
from adapter.core.model import LaunchSpec
from adapter.core.network import RuntimeNetwork
from adapter.runtimes.docker import handle as names
from adapter.runtimes.docker.client import DockerEngine

SANDBOX_COMMAND = ("sleep", "infinity")  # busybox and coreutils both understand "infinity"
SANDBOX_USER = "65534:65534"  # nobody: the sandbox needs no privilege, nor a passwd entry
# Not the one task `sleep` needs: runc applies the limit while its own init (a Go program whose
# threads are tasks to the pids controller: 5 to 9 seen) still waits in the container for the
# start. An init refused a thread there dies, and Docker's start fails at random ("cannot start
# a stopped process"). 32 still stops a fork bomb.
SANDBOX_PIDS_LIMIT = 32
HOSTNAME_MAX = 63


@dataclass(frozen=True)
class PreparedNetwork:
    """What the workload's container config needs from its network."""

    network_mode: str  # Docker's NetworkMode: "none", "host" or "container:<sandbox id>"
    etc_mounts: tuple[dict[str, Any], ...] = ()  # Engine API Mounts entries
    address: str = ""
    sandbox_id: str = ""


def hostname_of(container_id: str) -> str:
    """The container's hostname, as every runtime of this project sets it."""
    return container_id[:HOSTNAME_MAX]


class DockerNetwork:
    """The docker driver's network: one sandbox per bridge-mode container, and the shared
    isolator (through RuntimeNetwork). Raises adapter.core.errors only."""

    def __init__(
        self,
        network: RuntimeNetwork,
        engine: DockerEngine,
        owner: str,
        cgroup_parent: Callable[[str], str],
    ) -> None:
        self._network = network
        self._engine = engine
        self._owner = owner
        self._cgroup_parent = cgroup_parent  # container id -> its CgroupParent

    def mode(self, spec: LaunchSpec) -> str:
        """The effective mode ("none", "host" or "bridge"), checked against the node: bad
        input and modes the node does not offer fail here, before anything exists."""
        if not self._network.chooses(spec):
            return "none"
        return self._network.mode(spec)

    async def prepare_bridge(self, spec: LaunchSpec, sandbox_image: str) -> PreparedNetwork:
        """Start the sandbox, have the isolator adopt and attach its namespace, write the /etc
        files. Whatever exists on failure, `release` removes."""
        sandbox_id, pid = await self._start_sandbox(spec, sandbox_image)
        attachment = await self._network.adopt(spec, Path(f"/proc/{pid}/ns/net"))
        hostname = spec.linux.hostname or hostname_of(spec.container_id)
        etc_files = self._network.etc_files(spec.container_id, hostname)
        mounts = tuple(
            {"Type": "bind", "Source": str(source), "Target": target, "ReadOnly": True}
            for target, source in sorted(etc_files.items())
        )
        return PreparedNetwork(
            f"container:{sandbox_id}", mounts, attachment.address or "", sandbox_id
        )

    def sandbox_config(self, spec: LaunchSpec, image: str) -> dict[str, Any]:
        """create_container keyword arguments of the sandbox (data, never text)."""
        cid = spec.container_id
        return {
            "image": image,
            "entrypoint": [SANDBOX_COMMAND[0]],
            "command": list(SANDBOX_COMMAND[1:]),
            "user": SANDBOX_USER,
            # A pod's holder shares its network and so this hostname with the pod's containers.
            "hostname": spec.linux.hostname or hostname_of(cid),
            "labels": {
                names.LABEL_CONTAINER_ID: cid,
                names.LABEL_OWNER: self._owner,
                names.LABEL_ROLE: names.ROLE_SANDBOX,
            },
            "detach": True,
            "host_config": {
                "NetworkMode": "none",
                "CgroupParent": self._cgroup_parent(cid),
                "PidsLimit": SANDBOX_PIDS_LIMIT,
                "ReadonlyRootfs": True,
                "CapDrop": ["ALL"],
                "SecurityOpt": ["no-new-privileges"],
                "LogConfig": {"Type": "none", "Config": {}},
            },
        }

    async def _start_sandbox(self, spec: LaunchSpec, image: str) -> tuple[str, int]:
        """Create and start the sandbox; its docker id and host pid."""
        name = names.sandbox_name(self._owner, spec.container_id)
        config = self.sandbox_config(spec, image)
        try:
            sandbox_id = await self._engine.create(name, config, LaunchFailed)
        except AlreadyExists:  # a leftover of an interrupted launch or cleanup: ours by name
            await self.remove_sandbox(name)
            sandbox_id = await self._engine.create(name, config, LaunchFailed)
        await self._engine.start(sandbox_id, LaunchFailed)
        state = (await self._engine.inspect(sandbox_id))["State"]
        pid = int(state.get("Pid") or 0)
        if not state.get("Running") or pid <= 0:
            raise LaunchFailed(
                f"the network sandbox {name} (image {image!r}, `{' '.join(SANDBOX_COMMAND)}`)"
                f" did not stay up: {state.get('Status')}, exit code {state.get('ExitCode')};"
                " runtimes.docker.sandbox_image names an image that has `sleep`"
            )
        return sandbox_id, pid

    async def remove_sandbox(self, target: str) -> bool:
        """Remove the sandbox `target` (id or name) if it exists and is ours (killed by the
        forced removal: it holds nothing worth a graceful stop). False if there was none."""
        try:
            inspect = await self._engine.inspect(target)
        except NotFound:
            return False
        labels = inspect.get("Config", {}).get("Labels") or {}
        if labels.get(names.LABEL_OWNER) != self._owner:
            raise FailedPrecondition(f"docker container {target!r} is not ours; not removing it")
        try:
            await self._engine.remove(str(inspect["Id"]))
        except NotFound:
            return False
        return True

    async def release(self, container_id: str, sandbox_id: str) -> None:
        """After the workload is gone: its sandbox (by id, else by name), then the isolator's
        veth, namespace, forwards and /etc files. Idempotent."""
        await self.remove_sandbox(sandbox_id or names.sandbox_name(self._owner, container_id))
        await self._network.cleanup(container_id)
