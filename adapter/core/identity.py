"""Who a workload runs as, resolved to numbers by the service before anything is started.

The supervisor must never look a name up itself: glibc's name service, called after pivot_root,
would dlopen() the image's libnss_*.so while the process still holds every capability, so a
hostile image would run code as root with all of them. So names are resolved here, from the
text of /etc/passwd and /etc/group (the host's for a workload on the host's filesystem, the
image's otherwise), and the supervisor gets only numbers (`--uid --gid --groups`).

An image is hostile: its /etc files are read without following any symlink (an /etc/passwd that
points at the host's /etc/shadow reads as absent), only when they are regular files, and at most
MAX_ETC_BYTES each. Lines that do not parse are skipped, as libc skips them.

The rules are Docker's (runc's libcontainer/user):
    ""/None       root: uid 0 and the gid, groups and home of uid 0's entry if any
    NAME          its passwd entry (else InvalidArgument), its primary gid, and every group whose
                  member list names it
    UID           its passwd entry when there is one (as NAME); else gid 0, no groups, home /
    USER:GROUP    as USER, with GROUP (a name from /etc/group, or a gid) as the primary group
                  and no membership groups: the explicit form asks for exactly that group
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from adapter.core.errors import InvalidArgument
from adapter.core.model import Identity, LinuxOptions

FIELD = "command.user"
MAX_ETC_BYTES = 1 << 20
MAX_ID = 2**32 - 2  # uid_t and gid_t are 32 bits; (uid_t)-1 means "unchanged" to the kernel
DEFAULT_HOME = "/"
NUMERIC = re.compile(r"[0-9]+")
# Errors that mean "this image has no such file": absent, a symlink (O_NOFOLLOW), not a directory.
ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})
INNER_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class EtcFiles:
    """The text of a root filesystem's /etc/passwd and /etc/group; `origin` names them in
    errors ("the image's", "the host's")."""

    passwd: str = ""
    group: str = ""
    origin: str = "the"


@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


# --- reading the files ------------------------------------------------------------------------


def host_etc() -> EtcFiles:
    """The host's files: the host is trusted, so its /etc may be made of symlinks."""
    return EtcFiles(
        _read_bounded_path(Path("/etc/passwd")),
        _read_bounded_path(Path("/etc/group")),
        "the host's",
    )


def image_etc(rootfs: Path) -> EtcFiles:
    """rootfs/etc/passwd and rootfs/etc/group, never through a symlink: see the module doc."""
    return EtcFiles(
        _read_inside(rootfs, ("etc", "passwd")),
        _read_inside(rootfs, ("etc", "group")),
        "the image's",
    )


def _read_bounded_path(path: Path) -> str:
    try:
        with path.open("rb") as file:
            return _decode(file.read(MAX_ETC_BYTES + 1))
    except OSError as exc:
        if exc.errno in ABSENT:
            return ""
        raise


def _read_inside(rootfs: Path, components: tuple[str, ...]) -> str:
    """The file at rootfs/components... walked one component at a time with O_NOFOLLOW; ""
    when a component is missing, a symlink, or the file is not a regular file."""
    directory = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in components[:-1]:
            try:
                inner = os.open(name, INNER_DIRECTORY, dir_fd=directory)
            except OSError as exc:
                if exc.errno in ABSENT:
                    return ""
                raise
            os.close(directory)
            directory = inner
        return _read_regular(directory, components[-1])
    finally:
        os.close(directory)


def _read_regular(directory: int, name: str) -> str:
    """Opened as a path only (O_PATH opens nothing: no FIFO blocks, no device driver runs),
    checked to be a regular file, and only then opened for reading through that very inode."""
    try:
        located = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    except OSError as exc:
        if exc.errno in ABSENT:
            return ""
        raise
    try:
        if not _is_regular(located):
            return ""
        reader = os.open(f"/proc/self/fd/{located}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(located)
    with os.fdopen(reader, "rb") as file:
        return _decode(file.read(MAX_ETC_BYTES + 1))


def _is_regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def _decode(data: bytes) -> str:
    """Text of at most MAX_ETC_BYTES; a line cut there is dropped rather than misread (a uid
    cut from 12345 to 12 would be another user)."""
    if len(data) > MAX_ETC_BYTES:
        data = data[:MAX_ETC_BYTES]
        data = data[: data.rfind(b"\n") + 1]
    return data.decode("utf-8", "replace")


# --- parsing ------------------------------------------------------------------------------------


def _number(text: str) -> int | None:
    if NUMERIC.fullmatch(text) is None:
        return None
    value = int(text)
    return value if value <= MAX_ID else None


def _records(text: str, minimum_fields: int) -> Iterator[list[str]]:
    for line in text.splitlines():
        if not line or line.startswith(("#", "+", "-")):  # comments, NIS compat entries
            continue
        fields = line.split(":")
        if len(fields) >= minimum_fields and fields[0]:
            yield fields


def passwd_entries(text: str) -> Iterator[PasswdEntry]:
    """name:password:uid:gid[:gecos:home:shell], skipping what does not parse."""
    for fields in _records(text, 4):
        uid, gid = _number(fields[2]), _number(fields[3])
        if uid is not None and gid is not None:
            home = fields[5] if len(fields) > 5 and fields[5] else DEFAULT_HOME
            yield PasswdEntry(fields[0], uid, gid, home)


def group_entries(text: str) -> Iterator[GroupEntry]:
    """name:password:gid[:member,member...], skipping what does not parse."""
    for fields in _records(text, 3):
        gid = _number(fields[2])
        if gid is not None:
            members = fields[3].split(",") if len(fields) > 3 and fields[3] else []
            yield GroupEntry(fields[0], gid, tuple(m.strip() for m in members if m.strip()))


# --- resolving ----------------------------------------------------------------------------------


def resolve_identity(
    user: str | None,
    etc: EtcFiles,
    *,
    group: int | None = None,
    extra_groups: tuple[int, ...] = (),
) -> Identity:
    """The numbers `user` stands for in `etc` (see the module doc). `group` (CRI's
    run_as_group) replaces the primary gid; `extra_groups` (CRI's supplementary groups) are
    added after the user's own. The primary gid is never repeated among the groups."""
    user_part, has_group, group_part = (user or "").partition(":")
    if has_group and not group_part:
        raise InvalidArgument(FIELD, f"{user!r} has an empty group after ':'")
    entry = _find_user(user_part, etc)
    uid = entry.uid if entry else _checked_id(user_part or "0", "uid")
    gid = entry.gid if entry else 0
    members: list[int] = []
    if group_part:
        gid = _find_group(group_part, etc)
    elif entry is not None:
        members = [g.gid for g in group_entries(etc.group) if entry.name in g.members]
    if group is not None:
        gid = _checked_number(group, "linux.group")
    for extra in extra_groups:
        _checked_number(extra, "linux.supplementary_groups")
    groups = _unique(members + list(extra_groups), without=gid)
    return Identity(uid, gid, groups, entry.home if entry else DEFAULT_HOME)


def _find_user(user: str, etc: EtcFiles) -> PasswdEntry | None:
    """The first passwd entry of `user` (a name, a uid, or "" for uid 0); None for a uid
    without one. A name without one is the request's mistake."""
    wanted = _number(user or "0")
    for entry in passwd_entries(etc.passwd):
        if (entry.uid == wanted) if wanted is not None else (entry.name == user):
            return entry
    if wanted is None and NUMERIC.fullmatch(user) is None:
        raise InvalidArgument(FIELD, f"{user!r}: no such user in {etc.origin} /etc/passwd")
    return None


def _find_group(group: str, etc: EtcFiles) -> int:
    """The gid of `group`: a name from /etc/group, or a number taken as it is."""
    if NUMERIC.fullmatch(group):
        return _checked_id(group, "gid")
    for entry in group_entries(etc.group):
        if entry.name == group:
            return entry.gid
    raise InvalidArgument(FIELD, f"{group!r}: no such group in {etc.origin} /etc/group")


def _checked_id(text: str, what: str) -> int:
    value = _number(text)
    if value is None:
        raise InvalidArgument(FIELD, f"{what} {text!r} is not a number from 0 to {MAX_ID}")
    return value


def _checked_number(value: int, field: str) -> int:
    if not 0 <= value <= MAX_ID:
        raise InvalidArgument(field, f"{value} is not a group id from 0 to {MAX_ID}")
    return value


def _unique(values: Iterable[int], *, without: int) -> tuple[int, ...]:
    return tuple(dict.fromkeys(v for v in values if v != without))


async def workload_identity(
    user: str | None, linux: LinuxOptions, rootfs: str | Path | None
) -> Identity:
    """The identity of a workload whose root filesystem is `rootfs` (None: the host's), with
    the launch's group and supplementary groups. An image's files are read off the event loop
    (they are the image's, up to MAX_ETC_BYTES each); the host's are read on it: they are
    small, local and trusted, and a thread hop cost more than the reads on every launch on the
    host's filesystem."""
    if rootfs is None:
        etc = host_etc()
    else:
        etc = await asyncio.to_thread(image_etc, Path(rootfs))
    return resolve_identity(user, etc, group=linux.group, extra_groups=linux.supplementary_groups)


class HostIdentities:
    """Identities on the host's filesystem, resolved once per content of its /etc/passwd and
    /etc/group: most launches run as root on the host, and reading and parsing both files
    on each of them cost more than two stats. A change to either file (rewritten in place or
    replaced) changes its inode, size, mtime or ctime, and empties the cache."""

    def __init__(
        self, files: tuple[Path, Path] = (Path("/etc/passwd"), Path("/etc/group"))
    ) -> None:
        self.files = files
        self._version: tuple[tuple[int, ...], ...] = ()
        self._resolved: dict[tuple[str | None, int | None, tuple[int, ...]], Identity] = {}

    def resolve(self, user: str | None, linux: LinuxOptions) -> Identity:
        version = self._files_version()
        if version != self._version:
            self._version, self._resolved = version, {}
        key = (user, linux.group, linux.supplementary_groups)
        identity = self._resolved.get(key)
        if identity is None:  # an unknown name raises, and is not kept
            passwd, group = (_read_bounded_path(path) for path in self.files)
            identity = resolve_identity(
                user,
                EtcFiles(passwd, group, "the host's"),
                group=linux.group,
                extra_groups=linux.supplementary_groups,
            )
            self._resolved[key] = identity
        return identity

    def _files_version(self) -> tuple[tuple[int, ...], ...]:
        version: list[tuple[int, ...]] = []
        for path in self.files:
            try:
                found = os.stat(path)
            except OSError:
                version.append(())
                continue
            version.append((found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns))
        return tuple(version)
