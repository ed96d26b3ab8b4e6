"""User namespaces: the [user_namespace] config table and the allocator of host id ranges.

Each user-namespaced container maps its ids 0..size-1 onto a range of host ids no other
container holds, so container root is an unprivileged host uid and two containers cannot touch
each other's files. The host ids come from the subordinate ids /etc/subuid and /etc/subgid give
a configured user, or from a configured range used for uids and gids alike.

The allocation is part of the container's LaunchSpec (`id_mapping`), checkpointed with the
record before the runtime starts anything (as IP addresses are), so a restart re-derives the
ranges in use from the records: a range is held from the launch until the container is
TERMINATED (its runtime cleaned up), and never handed to a second container while the first
one's processes may live.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from adapter.core.errors import ConfigError, FailedPrecondition
from adapter.core.model import Capabilities, Identity, IdMapping, LaunchSpec

# The kernel's id space is 32 bits, (uid_t)-1 being no id.
MAX_HOST_ID = (1 << 32) - 2
DEFAULT_SIZE = 65536
SUBUID_FILE = Path("/etc/subuid")
SUBGID_FILE = Path("/etc/subgid")
USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}\$?")


@dataclass(frozen=True)
class UserNamespaceOptions:
    """The [user_namespace] table.

    default     launches that do not say get a user namespace
    user        take the host ids /etc/subuid and /etc/subgid give this user
    host_range  (start, count): take these host ids, for uids and gids alike
    size        ids per container (its namespace maps 0..size-1)
    """

    default: bool = False
    user: str | None = None
    host_range: tuple[int, int] | None = None
    size: int = DEFAULT_SIZE

    @property
    def configured(self) -> bool:
        return self.user is not None or self.host_range is not None


def parse_id_range(text: str) -> tuple[int, int] | None:
    """ "START:COUNT" -> (start, count), None when it is not one. Host id 0 is never given:
    container root must not be host root."""
    start, sep, count = text.partition(":")
    if not (sep and start.isdigit() and count.isdigit()):
        return None
    first, number = int(start), int(count)
    if first < 1 or number < 1 or first + number - 1 > MAX_HOST_ID:
        return None
    return first, number


_Check = Callable[[Any], bool]
USER_NAMESPACE_KEYS: dict[str, tuple[type, _Check, str]] = {
    "default": (bool, lambda v: True, "true or false"),
    "user": (
        str,
        lambda v: USER_NAME.fullmatch(v) is not None,
        "a user name with entries in /etc/subuid and /etc/subgid",
    ),
    "range": (
        str,
        lambda v: parse_id_range(v) is not None,
        'host ids "START:COUNT" with START >= 1, e.g. "100000:65536000"',
    ),
    "size": (int, lambda v: 1 <= v <= 1 << 31, "ids per container, from 1 to 2147483648"),
}


def parse_user_namespace(where: str, table: dict[str, Any]) -> UserNamespaceOptions:
    """The [user_namespace] table checked: each key's type and value, and that a default of
    true has host ids to map."""
    for key, value in table.items():
        _check_key(where, key, value)
    if "user" in table and "range" in table:
        raise ConfigError(f"{where}: user_namespace: set user or range, not both")
    options = UserNamespaceOptions(
        default=table.get("default", False),
        user=table.get("user"),
        host_range=parse_id_range(table["range"]) if "range" in table else None,
        size=table.get("size", DEFAULT_SIZE),
    )
    if options.default and not options.configured:
        raise ConfigError(
            f"{where}: user_namespace.default: true needs host ids to map:"
            " set user_namespace.user or user_namespace.range"
        )
    if options.host_range is not None and options.host_range[1] < options.size:
        raise ConfigError(
            f"{where}: user_namespace.range: {table['range']!r} holds fewer ids than"
            f" user_namespace.size ({options.size})"
        )
    return options


def _check_key(where: str, key: str, value: Any) -> None:
    if key not in USER_NAMESPACE_KEYS:
        raise ConfigError(
            f"{where}: user_namespace.{key}: unknown key; known: {list(USER_NAMESPACE_KEYS)}"
        )
    expected_type, check, expected = USER_NAMESPACE_KEYS[key]
    wrong_bool = isinstance(value, bool) and expected_type is not bool
    if wrong_bool or not isinstance(value, expected_type) or not check(value):
        raise ConfigError(f"{where}: user_namespace.{key}: expected {expected}, got {value!r}")


def subordinate_ranges(text: str, user: str) -> list[tuple[int, int]]:
    """The (start, count) ranges a /etc/subuid or /etc/subgid text gives `user`, in file
    order. Lines that are not NAME:START:COUNT are skipped, as shadow-utils does."""
    ranges = []
    for line in text.splitlines():
        name, sep, rest = line.strip().partition(":")
        if not sep or name != user:
            continue
        parsed = parse_id_range(rest)
        if parsed is not None:
            ranges.append(parsed)
    return ranges


def _slots(ranges: Iterable[tuple[int, int]], size: int) -> list[int]:
    """The start of every whole `size` block inside `ranges`."""
    return [start + k * size for start, count in ranges for k in range(count // size)]


class IdRangeAllocator:
    """Non-overlapping id ranges of `size`, one per container, from the configured host ids.

    Slot i maps uids from the i-th block of the uid ranges and gids from the i-th block of the
    gid ranges. A container's range is held from `allocate` (or `reserve`) until `release`;
    several containers may hold one range (a pod's holder and the containers that joined its
    namespace, each under its own id), which is free again only when none of them does. A
    reserved range that is no slot of today's config (the config changed) is still kept out
    of every new allocation."""

    def __init__(
        self,
        uid_ranges: list[tuple[int, int]],
        gid_ranges: list[tuple[int, int]],
        size: int,
        *,
        source: str = "user_namespace",
    ) -> None:
        self.size = size
        uid_slots = _slots(uid_ranges, size)
        gid_slots = _slots(gid_ranges, size)
        self._slots = list(zip(uid_slots, gid_slots, strict=False))
        self._source = source
        self._held: dict[str, IdMapping] = {}

    @classmethod
    def of(
        cls,
        options: UserNamespaceOptions,
        where: str = "<config>",
        subuid: Path = SUBUID_FILE,
        subgid: Path = SUBGID_FILE,
    ) -> IdRangeAllocator | None:
        """The node's allocator; None when no host ids are configured. A configured user
        without a whole `size` block of subordinate uids and gids is a ConfigError."""
        if options.host_range is not None:
            ranges = [options.host_range]
            return cls(ranges, ranges, options.size, source=f"{where}: user_namespace.range")
        if options.user is None:
            return None
        key = f"{where}: user_namespace.user"
        uids = subordinate_ranges(_read(subuid, key), options.user)
        gids = subordinate_ranges(_read(subgid, key), options.user)
        allocator = cls(uids, gids, options.size, source=key)
        if allocator.capacity == 0:
            raise ConfigError(
                f"{key}: {subuid} and {subgid} give {options.user!r} no block of"
                f" user_namespace.size = {options.size} ids"
            )
        return allocator

    @property
    def capacity(self) -> int:
        return len(self._slots)

    def allocate(self, container_id: str) -> IdMapping:
        """A free range for `container_id` (the one it holds, if any)."""
        held = self._held.get(container_id)
        if held is not None:
            return held
        for uid_start, gid_start in self._slots:
            mapping = IdMapping(uid_start, gid_start, self.size)
            if not any(_overlap(mapping, other) for other in self._held.values()):
                self._held[container_id] = mapping
                return mapping
        raise FailedPrecondition(
            f"user_namespace: all {self.capacity} ranges of {self.size} host ids are in use"
            f" ({self._source}); destroy containers or widen it"
        )

    def reserve(self, container_id: str, mapping: IdMapping) -> None:
        """Hold `mapping` for `container_id`: a checkpointed container's again (recovery), or
        the range of the namespace a container joins (its pod holder's)."""
        self._held[container_id] = mapping

    def release(self, container_id: str) -> None:
        self._held.pop(container_id, None)

    def held(self) -> dict[str, IdMapping]:
        return dict(self._held)


def _overlap(a: IdMapping, b: IdMapping) -> bool:
    def ranges_meet(start_a: int, start_b: int) -> bool:
        return start_a < start_b + b.size and start_b < start_a + a.size

    return ranges_meet(a.uid_start, b.uid_start) or ranges_meet(a.gid_start, b.gid_start)


def _read(path: Path, key: str) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from exc


def own_id_mapping(spec: LaunchSpec) -> IdMapping | None:
    """The mapping of a user namespace the container makes for itself: none when it has none,
    or joins a pod's (whose holder made it, with the same mapping)."""
    if spec.id_mapping is None or spec.linux.namespace("user") is not None:
        return None
    return spec.id_mapping


ROOTFS_PARTS = ("upper", "work", "merged")


def give_to_namespace_root(spec: LaunchSpec, rootfs_dir: Path | None = None) -> None:
    """With a user namespace, the directories the container's root must write become its
    (host uid = the range's start): the sandbox, and the overlay's upper, work and mount point
    under `rootfs_dir`, which the service just made. Each is opened without following a
    symlink and changed through its descriptor: a sandbox is the workload's to fill."""
    mapping = spec.id_mapping
    if mapping is None:
        return
    give_directories(mapping, Path(spec.sandbox))
    if rootfs_dir is not None:
        give_directories(mapping, rootfs_dir, *(rootfs_dir / part for part in ROOTFS_PARTS))


def give_directories(mapping: IdMapping, *paths: Path) -> None:
    """Each directory to the namespace's root, opened without following a symlink."""
    owner = (mapping.host_uid(0), mapping.host_gid(0))
    for path in paths:
        _give_directory(path, owner)


def _give_directory(path: Path, owner: tuple[int, int]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(fd, *owner)
    finally:
        os.close(fd)


def host_identity(identity: Identity, mapping: IdMapping | None) -> Identity:
    """The host's ids of a workload's identity: what a process outside its user namespace (a
    log relay) gives the files it writes for it."""
    if mapping is None:
        return identity
    return Identity(
        uid=mapping.host_uid(identity.uid),
        gid=mapping.host_gid(identity.gid),
        groups=tuple(mapping.host_gid(group) for group in identity.groups),
        home=identity.home,
    )


def user_namespace_for(
    spec: LaunchSpec,
    runtime: str,
    capabilities: Capabilities,
    allocator: IdRangeAllocator | None,
) -> tuple[LaunchSpec, tuple[str, ...]]:
    """A launch that asks for a user namespace (`spec.user_namespace` True) or gets the node's
    default (None), with its range allocated; or, for the default only, the launch as it is
    with a warning where the runtime cannot give one (a VM keeps its own kernel's users). An
    explicit request that cannot be met is refused, naming why."""
    asked = spec.user_namespace is True
    if spec.privileged:  # all of the host's capabilities: as host root, as Docker has it
        if not asked:
            return spec, ()
        raise FailedPrecondition(
            "user_namespace: a privileged container runs as host root; ask for one or the other"
        )
    # Beside a pod's (or the host's) namespaces, such a runtime has none to give.
    in_pod = bool(spec.linux.namespaces) and capabilities.no_pod_user_namespace
    if not capabilities.user_namespace or in_pod:
        if not asked:
            return spec, (f"user_namespace: the node's default does not apply on {runtime!r}",)
        beside = " beside the namespaces the launch joins" if in_pod else ""
        raise FailedPrecondition(
            f"user_namespace: runtime {runtime!r} cannot run a container in a user"
            f" namespace of ours{beside} (`containerizer runtimes` shows which can)"
        )
    if allocator is None:
        raise FailedPrecondition(
            "user_namespace: this node maps no host ids; set [user_namespace] user or"
            " range in its config"
        )
    return replace(spec, id_mapping=allocator.allocate(spec.container_id)), ()
