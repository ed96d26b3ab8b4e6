"""One Docker container of ours: what re-attaches to it after a restart, and where its cgroups are.

Naming and ownership. A container is created with two labels: our container id, and the state
directory of the service that owns it (two services may share one dockerd; each recovers and
removes only its own). Its name, `ctz-<owner tag>-<container id>`, is deterministic, so a
container whose launch was interrupted before its id was checkpointed is still found. A
bridge-mode container also has a network sandbox (network.py), labelled the same plus a role and
named `ctz-<owner tag>.sandbox-<container id>`: the `.` after the tag keeps the two name spaces
apart (a workload's name has `-` there), so no container id can make a workload name collide
with a sandbox name.

Cgroups. With Docker's cgroupfs driver a container with `CgroupParent=P` lives in `P/<docker id>`
in every hierarchy. We use `P = /<cgroups_root>/<container id>` (or, for a container the core
placed in a pod, `/<cgroups_root>/_pods/<pod>/<container id>`: Hierarchies.relative): the
per-container directory every runtime of this project uses, so the native runtime's orphan sweep
(which removes unknown ids under `<cgroups_root>`) never mistakes a Docker container for an orphan.
Docker removes its leaf when the container stops but leaves `P` in every hierarchy;
`remove_parent_cgroups` removes it.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from isolators.cgroups.hierarchy import cgroup_mount_points
from isolators.cgroups.locate import UNIFIED, process_cgroups

LABEL_CONTAINER_ID = "org.containerizer.container-id"
LABEL_OWNER = "org.containerizer.state-dir"
LABEL_ROLE = "org.containerizer.role"
ROLE_SANDBOX = "network-sandbox"  # the value of LABEL_ROLE on a sandbox; workloads have none
SANDBOX_MOUNT = "/mnt/mesos/sandbox"  # Mesos' DockerContainerizer convention


@dataclass(frozen=True)
class DockerHandle:
    """Checkpointed at launch; enough to wait on, measure and remove the container again."""

    docker_id: str
    name: str
    # The container's cgroup path relative to each hierarchy's mount, e.g.
    # "/containerizer/web-1/<docker id>": as the kernel reported it for the container's init.
    cgroup: str
    image: str
    # The network sandbox whose namespace the container shares (bridge mode); "" without one.
    sandbox_id: str = ""
    # The sizes of the sandbox's stdout and stderr when the container was created: its output
    # is what the files hold beyond them (output.py).
    stdout_offset: int = 0
    stderr_offset: int = 0
    # A CRI container's log file (its output goes there instead); "" without one.
    log_path: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DockerHandle:
        return cls(
            docker_id=str(data["docker_id"]),
            name=str(data["name"]),
            cgroup=str(data["cgroup"]),
            image=str(data["image"]),
            sandbox_id=str(data.get("sandbox_id", "")),
            stdout_offset=int(data.get("stdout_offset", 0)),
            stderr_offset=int(data.get("stderr_offset", 0)),
            log_path=str(data.get("log_path", "")),
        )


def owner_tag(state_dir: str) -> str:
    """A short stable tag of the owning service, for container names."""
    return hashlib.sha256(state_dir.encode()).hexdigest()[:10]


def container_name(owner: str, container_id: str) -> str:
    """Docker names allow [a-zA-Z0-9][a-zA-Z0-9_.-]+; validated container ids are a subset."""
    return f"ctz-{owner_tag(owner)}-{container_id}"


def sandbox_name(owner: str, container_id: str) -> str:
    return f"ctz-{owner_tag(owner)}.sandbox-{container_id}"


def cgroup_parent(relative: str) -> str:
    """Docker's CgroupParent for the container's cgroup path below each mount."""
    return "/" + relative.lstrip("/")


def cgroup_of_process(pid: int) -> str | None:
    """The memory (v1) or unified (v2) cgroup path of a process; None once it is gone."""
    paths = process_cgroups(pid)
    return paths.get("memory", paths.get(UNIFIED))


def remove_parent_cgroups(relative: str) -> list[Path]:
    """rmdir `<mount>/<relative>` (the container's cgroup parent) in every hierarchy, named ones
    included (Docker creates the parent in all of them); return those that remain (still holding
    a container's leaf, i.e. the container is not gone yet)."""
    remaining: list[Path] = []
    relative = relative.strip("/")
    for mount in cgroup_mount_points():
        directory = mount / relative
        try:
            directory.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            remaining.append(directory)
    return remaining


def remove_pod_directories(relative: str, kept: set[Path]) -> None:
    """Docker makes the whole CgroupParent path in every hierarchy, a pod's directory too. Where
    the core keeps no cgroup of the pod (not in `kept`), an empty pod directory and an empty
    `_pods` go with the pod's last docker container (rmdir fails on one still in use)."""
    pod_directory = Path(relative.strip("/")).parent
    for mount in cgroup_mount_points():
        for directory in (mount / pod_directory, mount / pod_directory.parent):
            if directory in kept:
                break
            try:
                directory.rmdir()
            except OSError:
                break
