"""Where each cgroup controller is mounted, discovered from /proc/self/mountinfo.

Supports cgroup v1 with one mount per controller, v1 with co-mounted controllers
("cpu,cpuacct") and pure v2 (unified). When v1 controllers are mounted the v1 layout wins, since
on a hybrid host (v1 controllers plus an empty cgroup2 mount) the v2 mount controls nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from isolators.cgroups import files
from isolators.cgroups.errors import HierarchyError

MOUNTINFO = Path("/proc/self/mountinfo")

# `<cgroups_root>/_pods/<pod>` is a pod's cgroup (pod-level limits and accounting), and the
# cgroups of the containers placed in the pod nest below it. No container id starts with "_",
# so the directory is never mistaken for a container's.
PODS_DIR = "_pods"

# Controller names the kernel can mount; other v1 super options (rw, name=systemd, ...) are not.
KNOWN_CONTROLLERS = frozenset(
    {
        "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "net_cls", "net_prio",
        "blkio", "perf_event", "hugetlb", "pids", "rdma", "misc", "io",
    }
)  # fmt: skip

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape_mountinfo(field_text: str) -> str:
    """A path as /proc/self/mountinfo writes it, which escapes space, tab, newline and backslash
    as \\ooo (octal), as it is."""
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field_text)


def check_component(value: str, what: str) -> str:
    """Refuse anything that would make a joined path leave its parent directory."""
    if not value or "/" in value or value in (".", "..") or "\0" in value:
        raise ValueError(f"{what} {value!r} cannot be used as one cgroup path component")
    return value


def check_root(cgroups_root: str) -> str:
    """cgroups_root may be nested ("a/b") but must stay below the mount."""
    parts = [part for part in cgroups_root.split("/") if part]
    if not parts:
        raise ValueError(f"cgroups_root {cgroups_root!r} is empty")
    for part in parts:
        check_component(part, "cgroups_root component")
    return "/".join(parts)


@dataclass(frozen=True)
class Mounts:
    """Parsed cgroup mounts: v1 controller -> mount point, and the first cgroup2 mount."""

    v1: dict[str, Path] = field(default_factory=dict)
    v2: Path | None = None
    every: tuple[Path, ...] = ()  # every cgroup and cgroup2 mount, named hierarchies included


def parse_mountinfo(text: str) -> Mounts:
    """Collect cgroup mounts. Fields: id parent maj:min root mountpoint opts [optional...] -
    fstype source superopts. The first mount of a controller wins (later ones are binds)."""
    v1: dict[str, Path] = {}
    v2: Path | None = None
    every: dict[Path, None] = {}
    for line in text.splitlines():
        before, sep, after = line.partition(" - ")
        if not sep:
            continue
        left, right = before.split(), after.split()
        if len(left) < 5 or len(right) < 3:
            continue
        mount_point = Path(unescape_mountinfo(left[4]))
        fstype, super_options = right[0], right[2].split(",")
        if fstype in ("cgroup", "cgroup2"):
            every[mount_point] = None
        if fstype == "cgroup2" and v2 is None:
            v2 = mount_point
        elif fstype == "cgroup":
            for option in super_options:
                if option in KNOWN_CONTROLLERS:
                    v1.setdefault(option, mount_point)
    return Mounts(v1=v1, v2=v2, every=tuple(every))


def cgroup_mount_points(mountinfo: Path = MOUNTINFO) -> tuple[Path, ...]:
    """Every cgroup and cgroup2 mount, named hierarchies (name=systemd) included, for what
    a runtime's tool creates in all of them; none when the mount table cannot be read."""
    try:
        return parse_mountinfo(mountinfo.read_text()).every
    except OSError:
        return ()


def mounts_from_directory(base: Path) -> Mounts:
    """The `cgroups_hierarchy` override: a directory laid out like /sys/fs/cgroup. Either it is
    a v2 root itself (has cgroup.controllers) or its subdirectories are v1 mounts named after
    their controllers ("memory", "cpu,cpuacct")."""
    if (base / "cgroup.controllers").is_file():
        return Mounts(v2=base)
    if not base.is_dir():
        raise HierarchyError(f"cgroups hierarchy {base} is not a directory")
    v1: dict[str, Path] = {}
    for name in files.children(base):
        for controller in name.split(","):
            if controller in KNOWN_CONTROLLERS:
                v1.setdefault(controller, base / name)
    if not v1:
        raise HierarchyError(
            f"cgroups hierarchy {base} holds neither cgroup.controllers nor "
            "controller directories (cpu, memory, ...)"
        )
    return Mounts(v1=v1)


@dataclass(frozen=True)
class Hierarchies:
    """Resolved layout: version 1 (one path per controller) or 2 (one path for all)."""

    version: int
    cgroups_root: str
    mounts: dict[str, Path]  # controller -> mount point; on v2 every controller -> v2 mount
    # container id -> the pod whose cgroup holds the container's (the service places a
    # container before its launch and again at recovery, from the checkpointed launch).
    pods: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def discover(
        cls,
        cgroups_root: str = "containerizer",
        *,
        mountinfo: Path = MOUNTINFO,
        override: Path | None = None,
    ) -> Hierarchies:
        """Read the mount table (or the override directory) and pick the layout."""
        root = check_root(cgroups_root)
        if override is not None:
            mounts = mounts_from_directory(override)
        else:
            try:
                mounts = parse_mountinfo(mountinfo.read_text())
            except OSError as exc:
                raise HierarchyError(f"cannot read {mountinfo}: {exc.strerror}") from exc
        if mounts.v1:
            return cls(version=1, cgroups_root=root, mounts=dict(mounts.v1))
        if mounts.v2 is not None:
            controllers = _v2_controllers(mounts.v2)
            return cls(version=2, cgroups_root=root, mounts=dict.fromkeys(controllers, mounts.v2))
        raise HierarchyError(f"no cgroup mount found in {override or mountinfo}")

    def has(self, controller: str) -> bool:
        return controller in self.mounts

    def root(self, controller: str) -> Path:
        """`<mount>/<cgroups_root>` of the controller."""
        try:
            return self.mounts[controller] / self.cgroups_root
        except KeyError:
            raise HierarchyError(
                f"cgroup controller {controller!r} is not available "
                f"(mounted: {', '.join(sorted(self.mounts)) or 'none'})"
            ) from None

    def place(self, container_id: str, pod: str) -> None:
        """The container's cgroups nest in the pod's from now on."""
        check_component(container_id, "container id")
        self.pods[container_id] = check_component(pod, "pod id")

    def unplace(self, container_id: str) -> None:
        self.pods.pop(container_id, None)

    def relative(self, container_id: str) -> str:
        """The container's cgroup below each mount: `<cgroups_root>/<container_id>`, or
        `<cgroups_root>/_pods/<pod>/<container_id>` for a container placed in a pod."""
        check_component(container_id, "container id")
        pod = self.pods.get(container_id)
        if pod is None:
            return f"{self.cgroups_root}/{container_id}"
        return f"{self.pod_relative(pod)}/{container_id}"

    def pod_relative(self, pod: str) -> str:
        return f"{self.cgroups_root}/{PODS_DIR}/{check_component(pod, 'pod id')}"

    def path(self, controller: str, container_id: str) -> Path:
        """`<mount>/<relative(container_id)>`; the same directory for all on v2."""
        self.root(controller)  # the error for a controller that is not mounted
        return self.mounts[controller] / self.relative(container_id)

    def container_dirs(self, container_id: str, controllers: tuple[str, ...] = ()) -> list[Path]:
        """Distinct cgroup directories of the container (co-mounted controllers and v2 share
        one), in a stable order, for the given controllers or all mounted ones."""
        return self.dirs_at(self.relative(container_id), controllers)

    def children(self, root: Path) -> dict[str, str]:
        """The container cgroups under one of our roots (`<mount>/<cgroups_root>`): id -> the
        pod that holds it ("" for none). Ids found in a pod are placed there, so that an
        orphan's cgroups can be found to be removed."""
        found = {name: "" for name in files.children(root) if name != PODS_DIR}
        for pod in files.children(root / PODS_DIR):
            for name in files.children(root / PODS_DIR / pod):
                found[name] = pod
                self.pods.setdefault(name, pod)
        return found

    def dirs_at(self, relative: str, controllers: tuple[str, ...] = ()) -> list[Path]:
        """Distinct directories `relative` (to each mount) names, in a stable order, for the
        given controllers or all mounted ones."""
        wanted = controllers or tuple(sorted(self.mounts))
        dirs = (self.mounts[c] / relative.lstrip("/") for c in wanted if self.has(c))
        return list(dict.fromkeys(dirs))

    def enable_v2_controllers(self, controllers: tuple[str, ...]) -> None:
        """v2 delegation: a child gets a controller's files only once its parent lists the
        controller in cgroup.subtree_control — at the mount root and at our root."""
        if self.version != 2:
            return
        wanted = [c for c in controllers if self.has(c)]
        if not wanted:
            return
        mount = self.mounts[wanted[0]]
        files.create(mount / self.cgroups_root)
        parent = mount
        for part in ("", *self.cgroups_root.split("/")):
            parent = parent / part if part else parent
            control = parent / "cgroup.subtree_control"
            enabled = set(files.read_text(control).split())
            missing = [c for c in wanted if c not in enabled]
            if missing:
                files.write(control, " ".join(f"+{c}" for c in missing))


def _v2_controllers(mount: Path) -> list[str]:
    try:
        return files.read_text(mount / "cgroup.controllers").split()
    except OSError as exc:
        raise HierarchyError(f"cannot read {mount / 'cgroup.controllers'}: {exc}") from exc
