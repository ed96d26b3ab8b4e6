"""OCI runtime-spec seccomp profiles (`linux.seccomp`, also Docker's format) read and checked:
the node admin's Localhost profiles of the CRI; adapter/supervisor/seccomp.py compiles the
result. A profile is input: it is checked whole before anything is compiled, and any malformed
part raises InvalidArgument naming the field and the place (`syscalls[2].args[0].op`). Its
rules follow runc's reading of it:
- defaultAction, defaultErrnoRet; syscalls[] with names (or Docker's name), action, errnoRet and
  args; an action without errnoRet returns EPERM (ERRNO, TRACE); SCMP_ACT_NOTIFY is refused
  (no agent listens), and so is a listenerPath;
- args: comparisons on distinct arguments must all hold (one rule); when two compare the same
  argument, each makes a rule of its own and any one suffices (libseccomp takes one comparison
  per argument and rule);
- architectures (or Docker's archMap, the x86_64 entry): SCMP_ARCH_X86_64, SCMP_ARCH_X86 and
  SCMP_ARCH_X32 join the filter, another known architecture is skipped (no binary of it runs on
  this host), an unknown name is refused; the native ABI is always there, and a syscall of an
  ABI not listed kills the process, as with runc;
- Docker's includes/excludes are honoured as Docker and containerd do: caps against the
  container's capabilities (all listed must be held / none may be), arches against "amd64",
  minKernel against the running kernel;
- flags are accepted and ignored: the supervisor's prctl takes none (TSYNC is moot in its single
  thread, LOG only adds audit records, SPEC_ALLOW would weaken a mitigation);
- a name this libseccomp does not know is skipped; one of another ABI (socketcall, chown32) is
  kept for it; a rule whose action is the default one is dropped, as libseccomp refuses it."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from adapter.core.confinement import DEFAULT_CAPABILITIES, capability_name
from adapter.core.errors import InvalidArgument

MAX_PROFILE_RULES = 4096
MAX_ERRNO = 4095  # the kernel's largest errno value
U64_MAX = (1 << 64) - 1
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7
# Audit architecture token (linux/audit.h) of i386; x86_64's is the native one.
ARCH_X86 = 0x40000003

# OCI action names -> libseccomp actions; ERRNO and TRACE carry a return code in the low bits.
OCI_ACTIONS: dict[str, int] = {
    "SCMP_ACT_KILL": 0x00000000,
    "SCMP_ACT_KILL_THREAD": 0x00000000,
    "SCMP_ACT_KILL_PROCESS": SCMP_ACT_KILL_PROCESS,
    "SCMP_ACT_TRAP": 0x00030000,
    "SCMP_ACT_ERRNO": 0x00050000,
    "SCMP_ACT_TRACE": 0x7FF00000,
    "SCMP_ACT_LOG": 0x7FFC0000,
    "SCMP_ACT_ALLOW": SCMP_ACT_ALLOW,
}
ACTIONS_WITH_RETURN_CODE = ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE")
OCI_OPERATORS: dict[str, int] = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": SCMP_CMP_MASKED_EQ,
}
# The ABIs an x86_64 kernel runs, by audit architecture token (x32: x86_64's machine, 32-bit).
HOST_ARCHES: dict[str, int] = {
    "SCMP_ARCH_X86_64": 0xC000003E,
    "SCMP_ARCH_X86": ARCH_X86,
    "SCMP_ARCH_X32": 0x4000003E,
}
NATIVE_ARCH = "SCMP_ARCH_X86_64"
NATIVE_DOCKER_ARCH = "amd64"  # the name Docker's includes/excludes give this host
FOREIGN_ARCHES = frozenset(
    f"SCMP_ARCH_{name}"
    for name in (
        "ARM", "AARCH64", "MIPS", "MIPS64", "MIPS64N32", "MIPSEL", "MIPSEL64", "MIPSEL64N32",
        "PPC", "PPC64", "PPC64LE", "S390", "S390X", "PARISC", "PARISC64", "RISCV64",
        "LOONGARCH64", "M68K", "SH", "SHEB",
    )
)  # fmt: skip
OCI_FLAGS = frozenset(
    ("SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
     "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV")
)  # fmt: skip
PROFILE_KEYS = frozenset(
    ("defaultAction", "defaultErrnoRet", "architectures", "archMap", "flags", "listenerPath",
     "listenerMetadata", "syscalls")
)  # fmt: skip
SYSCALL_KEYS = frozenset(
    ("names", "name", "action", "errnoRet", "args", "comment", "includes", "excludes")
)
ARG_KEYS = frozenset(("index", "value", "valueTwo", "op"))
FILTER_KEYS = frozenset(("caps", "arches", "minKernel"))
SYSCALL_NAME = re.compile(r"[a-z0-9_]{1,64}")
KERNEL_VERSION = re.compile(r"(\d+)\.(\d+)")


@dataclass(frozen=True)
class _Where:
    """Where in a profile a value sits (`origin`: its file, if any), for an InvalidArgument
    naming the field and the place: `field: /etc/p.json: syscalls[2].args[0].op: ...`."""

    field: str
    origin: str = ""
    path: str = ""

    def at(self, key: str | int) -> _Where:
        step = f"[{key}]" if isinstance(key, int) else (f".{key}" if self.path else key)
        return _Where(self.field, self.origin, self.path + step)

    def describe(self) -> str:
        return ": ".join(part for part in (self.origin, self.path) if part)

    def error(self, message: str) -> InvalidArgument:
        place = self.describe()
        return InvalidArgument(self.field, f"{place}: {message}" if place else message)


@dataclass(frozen=True)
class Comparison:
    index: int
    op: int
    value: int
    value_two: int


@dataclass(frozen=True)
class SyscallRule:
    """One syscalls[] entry: each of its names gets one libseccomp rule per comparison set
    (a set ANDs its comparisons; no comparison at all is one empty set)."""

    where: str
    names: tuple[str, ...]
    action: int
    comparison_sets: tuple[tuple[Comparison, ...], ...]


@dataclass(frozen=True)
class OciProfile:
    origin: str  # the file it was read from, if any
    default_action: int
    arches: tuple[int, ...]  # audit tokens besides the native one
    rules: tuple[SyscallRule, ...]


def parse_oci_profile(
    profile: object,
    *,
    field: str,
    capabilities: Collection[str] = DEFAULT_CAPABILITIES,
    origin: str = "",
) -> OciProfile:
    """Check `profile` whole (see the module docstring) and keep the rules that apply to a
    container holding `capabilities`; `origin` (a file) prefixes each place named in an error."""
    root = _Where(field, origin)
    data = _object(profile, root)
    _known_keys(data, PROFILE_KEYS, root)
    default_action = _action(data, "defaultAction", "defaultErrnoRet", root)
    if _string(data, "listenerPath", root):
        raise root.at("listenerPath").error("seccomp notification agents are not supported")
    for at, flag in enumerate(_list(data, "flags", root)):
        _choice(flag, OCI_FLAGS, root.at("flags").at(at))
    entries = _list(data, "syscalls", root)
    if len(entries) > MAX_PROFILE_RULES:
        raise root.at("syscalls").error(f"{len(entries)} entries, at most {MAX_PROFILE_RULES}")
    held = frozenset(capability_name(name) for name in capabilities)
    rules = []
    for at, entry in enumerate(entries):
        rule = _syscall_rule(entry, root.at("syscalls").at(at), held)
        if rule is not None:
            rules.append(rule)
    count = sum(len(rule.names) * len(rule.comparison_sets) for rule in rules)
    if count > MAX_PROFILE_RULES:
        raise root.at("syscalls").error(f"{count} rules, at most {MAX_PROFILE_RULES}")
    return OciProfile(origin, default_action, _arches(data, root), tuple(rules))


def _arches(data: Mapping[str, Any], where: _Where) -> tuple[int, ...]:
    """The ABIs the profile names that this host runs: `architectures`, or Docker's `archMap`
    entry for x86_64 with its sub-architectures."""
    listed = _list(data, "architectures", where)
    arch_map = _list(data, "archMap", where)
    if listed and arch_map:
        raise where.error("architectures and archMap: give one of them, not both")
    names = [(name, where.at("architectures").at(at)) for at, name in enumerate(listed)]
    for at, entry in enumerate(arch_map):
        place = where.at("archMap").at(at)
        item = _object(entry, place)
        _known_keys(item, frozenset(("architecture", "subArchitectures")), place)
        arch = _required_string(item, "architecture", place)
        subs = _list(item, "subArchitectures", place)
        found = [(sub, place.at("subArchitectures").at(n)) for n, sub in enumerate(subs)]
        if _arch(arch, place.at("architecture")) == HOST_ARCHES[NATIVE_ARCH]:
            names += [(arch, place.at("architecture")), *found]
        else:
            for sub, sub_place in found:
                _arch(sub, sub_place)  # checked, not used
    tokens = (_arch(name, place) for name, place in names)
    return tuple(dict.fromkeys(token for token in tokens if token is not None))


def _arch(name: object, where: _Where) -> int | None:
    """An architecture's audit token, None for one that never runs here."""
    return HOST_ARCHES.get(_choice(name, HOST_ARCHES.keys() | FOREIGN_ARCHES, where))


def _syscall_rule(entry: object, where: _Where, held: frozenset[str]) -> SyscallRule | None:
    data = _object(entry, where)
    _known_keys(data, SYSCALL_KEYS, where)
    names = _syscall_names(data, where)
    action = _action(data, "action", "errnoRet", where)
    comparisons = [_comparison(arg, where.at("args").at(at))
                   for at, arg in enumerate(_list(data, "args", where))]  # fmt: skip
    if not _included(data, where, held):  # checked above all the same: a mistake is a mistake
        return None
    indexes = [comparison.index for comparison in comparisons]
    if len(set(indexes)) == len(indexes):
        sets: tuple[tuple[Comparison, ...], ...] = (tuple(comparisons),)
    else:
        sets = tuple((comparison,) for comparison in comparisons)
    return SyscallRule(where.describe(), names, action, sets)


def _syscall_names(data: Mapping[str, Any], where: _Where) -> tuple[str, ...]:
    if "name" in data and "names" in data:
        raise where.error("name and names: give one of them, not both")
    if "name" in data:
        listed = [(data["name"], where.at("name"))]
    else:
        listed = [(name, where.at("names").at(at))
                  for at, name in enumerate(_list(data, "names", where))]  # fmt: skip
        if not listed:
            raise where.at("names").error("list at least one syscall")
    for name, place in listed:
        if not isinstance(name, str) or not SYSCALL_NAME.fullmatch(name):
            raise place.error(f"expected a syscall name ([a-z0-9_], 1 to 64), got {_shown(name)}")
    return tuple(dict.fromkeys(name for name, _ in listed))


def _comparison(arg: object, where: _Where) -> Comparison:
    data = _object(arg, where)
    _known_keys(data, ARG_KEYS, where)
    index = _required_uint(data, "index", where, 5)
    value = _required_uint(data, "value", where, U64_MAX)
    value_two = _uint(data, "valueTwo", where, U64_MAX)
    op = OCI_OPERATORS[_choice(data.get("op"), OCI_OPERATORS.keys(), where.at("op"))]
    return Comparison(index, op, value, value_two or 0)


def _included(data: Mapping[str, Any], where: _Where, held: frozenset[str]) -> bool:
    """Docker's includes (every condition met) and excludes (none met), see the docstring."""
    includes = _condition(data, "includes", where, held)
    excludes = _condition(data, "excludes", where, held)
    return all(includes) and not any(excludes)


def _condition(
    data: Mapping[str, Any], key: str, where: _Where, held: frozenset[str]
) -> tuple[bool, ...]:
    """For includes: whether all caps are held, the native arch is listed, the kernel is at
    least minKernel; for excludes the same, with any cap held. A missing part says nothing."""
    place = where.at(key)
    spec = _object(data.get(key) or {}, place)
    _known_keys(spec, FILTER_KEYS, place)
    caps = [capability_name(_string_item(cap, place.at("caps").at(at)))
            for at, cap in enumerate(_list(spec, "caps", place))]  # fmt: skip
    arches = [_string_item(arch, place.at("arches").at(at))
              for at, arch in enumerate(_list(spec, "arches", place))]  # fmt: skip
    minimum = _string(spec, "minKernel", place)
    results = []
    if caps:
        has = [cap in held for cap in caps]
        results.append(all(has) if key == "includes" else any(has))
    if arches:
        results.append(NATIVE_DOCKER_ARCH in arches)
    if minimum is not None:
        results.append(_kernel_at_least(minimum, place.at("minKernel")))
    return tuple(results)


def _kernel_at_least(minimum: str, where: _Where) -> bool:
    wanted = KERNEL_VERSION.match(minimum)
    if wanted is None:
        raise where.error(f"expected a kernel version like '5.8', got {_shown(minimum)}")
    running = KERNEL_VERSION.match(os.uname().release)
    if running is None:  # a release string without a version: assume a current kernel
        return True
    return tuple(map(int, running.groups())) >= tuple(map(int, wanted.groups()))


def _action(data: Mapping[str, Any], key: str, errno_key: str, where: _Where) -> int:
    name = _required_string(data, key, where)
    if name == "SCMP_ACT_NOTIFY":
        raise where.at(key).error("SCMP_ACT_NOTIFY is not supported: no agent listens")
    action = OCI_ACTIONS[_choice(name, OCI_ACTIONS.keys(), where.at(key))]
    code = _uint(data, errno_key, where, MAX_ERRNO)
    if name in ACTIONS_WITH_RETURN_CODE:
        return action | (errno.EPERM if code is None else code)
    if code is not None:
        raise where.at(errno_key).error(f"{name} takes no return code (only SCMP_ACT_ERRNO and"
                                        " SCMP_ACT_TRACE do)")  # fmt: skip
    return action


# Typed getters: JSON's shapes checked one value at a time.


def _object(value: object, where: _Where) -> Mapping[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise where.error(f"expected an object, got {_kind(value)}")
    return value


def _known_keys(data: Mapping[str, Any], known: frozenset[str], where: _Where) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise where.at(unknown[0]).error(f"unknown key; expected one of {', '.join(sorted(known))}")


def _list(data: Mapping[str, Any], key: str, where: _Where) -> list[Any]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise where.at(key).error(f"expected a list, got {_kind(value)}")
    return value


def _string(data: Mapping[str, Any], key: str, where: _Where) -> str | None:
    value = data.get(key)
    return None if value is None else _string_item(value, where.at(key))


def _required_string(data: Mapping[str, Any], key: str, where: _Where) -> str:
    value = _string(data, key, where)
    if value is None:
        raise where.at(key).error("required")
    return value


def _string_item(value: object, where: _Where) -> str:
    if not isinstance(value, str):
        raise where.error(f"expected a string, got {_kind(value)}")
    return value


def _choice(value: object, allowed: Collection[str], where: _Where) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise where.error(f"expected one of {', '.join(sorted(allowed))}; got {_shown(value)}")
    return value


def _required_uint(data: Mapping[str, Any], key: str, where: _Where, maximum: int) -> int:
    value = _uint(data, key, where, maximum)
    if value is None:
        raise where.at(key).error("required")
    return value


def _uint(data: Mapping[str, Any], key: str, where: _Where, maximum: int) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise where.at(key).error(f"expected an integer from 0 to {maximum}, got {_shown(value)}")
    return value


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _shown(value: object) -> str:
    """A value from the profile as a message quotes it: a runaway one cut short."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
