"""The LXC container config file, written so that no input can add a key of its own.

LXC reads its config line by line as `key = value`; a value is everything after the `=` up to
the end of the line. So the one way to smuggle a key (`lxc.mount.entry = / host ...`) in through
a value is a line break, and the one way to smuggle a key through a key is a key we did not
choose. This writer refuses both: keys must be `lxc.` names from our own code, values are
refused (InvalidArgument naming the request field they came from) if they hold a newline, a
carriage return or a NUL. Paths inside `lxc.mount.entry` (fstab syntax, split on whitespace)
are octal-escaped the way LXC's getmntent-style parser decodes them.

What never enters this file at all: the command, its arguments, environment variables and
labels. They go to the container's init (our supervisor) through lxc-start's stdin (see
monitor.py), where there is no syntax to break and no command line to read them from.

Also here: the cgroup keys for a container's limits and the keys that put it on the network
isolator's namespace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from adapter.core.errors import InvalidArgument
from adapter.core.limits import Limits
from isolators.cgroups.cpu import cpu_weight
from isolators.network.model import Attachment

# Keys are ours, never derived from input; the pattern catches a programming mistake.
_KEY = re.compile(r"lxc(\.[a-z0-9_]+)+")
_FORBIDDEN_IN_VALUE = ("\n", "\r", "\x00")
# fstab escapes understood by LXC's mount-entry parser (and getmntent): space, tab, newline,
# backslash, as three-digit octal.
_FSTAB_ESCAPES = {" ": "\\040", "\t": "\\011", "\n": "\\012", "\\": "\\134"}


def fstab_escape(path: str) -> str:
    """`path` as one whitespace-free field of an fstab line."""
    return "".join(_FSTAB_ESCAPES.get(char, char) for char in path)


def check_value(value: str, field: str) -> str:
    """The value as it may stand after `key = `; InvalidArgument naming `field` otherwise."""
    for forbidden in _FORBIDDEN_IN_VALUE:
        if forbidden in value:
            raise InvalidArgument(
                field, f"{value[:64]!r} contains {forbidden!r}, which would end the LXC config line"
            )
    if value != value.strip():
        raise InvalidArgument(field, f"{value[:64]!r} has leading or trailing whitespace")
    return value


@dataclass
class LxcConfig:
    """An ordered list of `key = value` lines; `render` gives the file's text."""

    entries: list[tuple[str, str]] = field(default_factory=list)

    def set(self, key: str, value: str | int, *, field: str = "config") -> None:
        """Append `key = value`. `field` names where the value came from, for the error."""
        if _KEY.fullmatch(key) is None:
            raise ValueError(f"{key!r} is not an LXC config key")
        self.entries.append((key, check_value(str(value), field)))

    def mount(self, source: str, target: str, options: str, *, field: str) -> None:
        """A bind mount of host `source` at `target` (relative to the container's root)."""
        if target.startswith("/"):
            raise ValueError(f"mount target {target!r} must be relative to the rootfs")
        entry = f"{fstab_escape(source)} {fstab_escape(target)} none {options} 0 0"
        self.set("lxc.mount.entry", entry, field=field)

    def get(self, key: str) -> list[str]:
        return [value for name, value in self.entries if name == key]

    def render(self) -> str:
        return "".join(f"{key} = {value}\n" for key, value in self.entries)


def cgroup_keys(limits: Limits, *, version: int) -> list[tuple[str, str]]:
    """LXC cgroup keys for `limits` (the cgroup files the isolators would write)."""
    keys: list[tuple[str, str]] = []
    period = str(limits.cfs_period_us)
    if version == 1:
        if limits.cpu_shares is not None:
            keys.append(("lxc.cgroup.cpu.shares", str(limits.cpu_shares)))
        if limits.cfs_quota_us is not None:
            keys.append(("lxc.cgroup.cpu.cfs_period_us", period))
            keys.append(("lxc.cgroup.cpu.cfs_quota_us", str(limits.cfs_quota_us)))
        if limits.mem_bytes is not None:
            limit = str(limits.mem_bytes)
            keys.append(("lxc.cgroup.memory.limit_in_bytes", limit))
            keys.append(("lxc.cgroup.memory.soft_limit_in_bytes", limit))
        if limits.pids is not None:
            keys.append(("lxc.cgroup.pids.max", str(limits.pids)))
        return keys
    if limits.cpu_shares is not None:
        keys.append(("lxc.cgroup2.cpu.weight", str(cpu_weight(limits.cpu_shares))))
        quota = "max" if limits.cfs_quota_us is None else str(limits.cfs_quota_us)
        keys.append(("lxc.cgroup2.cpu.max", f"{quota} {period}"))
    if limits.mem_bytes is not None:
        limit = str(limits.mem_bytes)
        keys += [("lxc.cgroup2.memory.max", limit), ("lxc.cgroup2.memory.low", limit)]
    if limits.pids is not None:
        keys.append(("lxc.cgroup2.pids.max", str(limits.pids)))
    return keys


def set_isolator_network(
    config: LxcConfig, network: Attachment, etc_files: dict[str, Path]
) -> None:
    """Join the isolator's namespace (type none: LXC makes no network of its own), or the
    host's for mode host; bind its /etc files read-only (they live in the service's state)."""
    config.set("lxc.net.0.type", "none")
    if network.netns_path is None:
        return
    config.set("lxc.namespace.share.net", network.netns_path, field="container.network")
    for target, source in etc_files.items():
        config.mount(str(source), target.lstrip("/"), "bind,ro,create=file", field="network")
