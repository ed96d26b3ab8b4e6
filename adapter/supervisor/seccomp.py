"""Seccomp filters compiled to raw BPF programs: the default one (adapter/core/confinement.py)
and the OCI runtime-spec profiles a node admin writes (CRI's Localhost profiles).

libseccomp does the compiling, through ctypes: Debian's libseccomp2 is on every host (apt itself
depends on it), its Python binding exists only for the system Python, and a filter written by
hand would have to get every architecture's syscall numbers right. The program is exported as
bytes (an array of `struct sock_filter`) and handed to the C supervisor, which loads it with
prctl(PR_SET_SECCOMP) just before exec: the supervisor needs no libseccomp (its static build
for LXC stays plain libc), and the filter is compiled once per driver, not once per launch.

The default rules: everything not allowed fails with EPERM; each allowed name this libseccomp
and kernel know is allowed (others are skipped, and reported); unless CAP_SYS_ADMIN allows them
outright, `clone` is allowed only when its flags (argument 0) ask for no namespace and `clone3`
fails with ENOSYS, because its flags live in memory a filter cannot read, and libc then falls
back to `clone`. The filter covers x86_64 and i386 (32-bit binaries in images); a syscall of
any other ABI, x32 included (off by default on Debian's kernels), kills the process. Each ABI
more costs the kernel time at every launch, as it checks, compiles and caches the filter: x32
would add about a third. This module assumes an x86_64 host, as the supervisor does.

An OCI profile (a CRI Localhost profile) is read and checked by seccomp_profile.py and
compiled here, for the x86_64, i386 and x32 ABIs it lists; a filter the kernel would refuse
(over BPF_MAXINSNS instructions) is refused as the profile's fault.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import stat
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adapter.core.confinement import CLONE_NAMESPACE_FLAGS, DEFAULT_CAPABILITIES, SECCOMP_ALLOWED
from adapter.core.errors import FailedPrecondition, InvalidArgument
from adapter.supervisor.seccomp_profile import (
    ARCH_X86,
    SCMP_ACT_ALLOW,
    SCMP_ACT_KILL_PROCESS,
    SCMP_CMP_MASKED_EQ,
    OciProfile,
    SyscallRule,
    parse_oci_profile,
)

LIBRARY = "libseccomp.so.2"
SOCK_FILTER_BYTES = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
MAX_EXPORT_BYTES = 1 << 20  # far above any filter of a few hundred rules
BPF_MAXINSNS = 4096  # the kernel refuses a longer filter
MAX_PROFILE_BYTES = 1 << 20
PATH_MAX = 4096

SCMP_FLTATR_ACT_BADARCH = 2
SCMP_FLTATR_CTL_OPTIMIZE = 8
OPTIMIZE_BINARY_TREE = 2  # syscalls found by a binary search, not a linear scan
NR_SCMP_ERROR = -1  # what libseccomp resolves an unknown name to; below it: another ABI's
COMPAT_ARCHES = (ARCH_X86,)  # besides the native x86_64


def scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCompare(ctypes.Structure):
    """struct scmp_arg_cmp."""

    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


@dataclass(frozen=True)
class SeccompProgram:
    """The exported filter and the allowed names that were left out because this libseccomp
    or architecture does not know them."""

    bpf: bytes
    skipped: tuple[str, ...]

    @property
    def instructions(self) -> int:
        return len(self.bpf) // SOCK_FILTER_BYTES


def _library() -> ctypes.CDLL:
    try:
        library = ctypes.CDLL(LIBRARY, use_errno=True)
    except OSError as exc:
        raise FailedPrecondition(
            f"seccomp: {LIBRARY} cannot be loaded ({exc}): install Debian's libseccomp2"
        ) from exc
    library.seccomp_init.restype = ctypes.c_void_p
    library.seccomp_init.argtypes = [ctypes.c_uint32]
    library.seccomp_release.argtypes = [ctypes.c_void_p]
    library.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    library.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    library.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    library.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
        ctypes.POINTER(_ArgCompare),
    ]  # fmt: skip
    library.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return library


def _check(result: int, what: str) -> None:
    """libseccomp returns -errno on failure."""
    if result < 0:
        raise FailedPrecondition(f"seccomp: {what} failed: {os.strerror(-result)}")


@contextlib.contextmanager
def _filter(library: ctypes.CDLL, default_action: int, arches: Iterable[int]) -> Iterator[int]:
    """A libseccomp filter context for `arches` besides the native one, released on exit."""
    context = library.seccomp_init(default_action)
    if not context:
        raise FailedPrecondition("seccomp: seccomp_init failed")
    try:
        for arch in arches:
            result = library.seccomp_arch_add(context, arch)
            if result != -errno.EEXIST:  # the native one is there from the start
                _check(result, f"adding architecture {arch:#x}")
        _check(
            library.seccomp_attr_set(context, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS),
            "setting the bad-architecture action",
        )
        # Older libseccomp has no binary-tree optimisation: the filter is the same, only slower.
        library.seccomp_attr_set(context, SCMP_FLTATR_CTL_OPTIMIZE, OPTIMIZE_BINARY_TREE)
        yield context
    finally:
        library.seccomp_release(context)


def build_program(allowed: Sequence[str] = SECCOMP_ALLOWED) -> SeccompProgram:
    """Compile the default filter (or one allowing `allowed`, confinement.default_allowed's
    list for a container's capabilities) and export it as BPF bytes."""
    library = _library()
    with _filter(library, scmp_act_errno(errno.EPERM), COMPAT_ARCHES) as context:
        skipped = _add_rules(library, context, allowed)
        return SeccompProgram(_export(library, context), skipped)


def _add_rules(library: ctypes.CDLL, context: int, allowed: Sequence[str]) -> tuple[str, ...]:
    skipped = []
    for name in dict.fromkeys(allowed):  # in order, without duplicates
        number = library.seccomp_syscall_resolve_name(name.encode())
        if number < 0:  # unknown to libseccomp, or not a syscall of this architecture
            skipped.append(name)
            continue
        _check(library.seccomp_rule_add_array(context, SCMP_ACT_ALLOW, number, 0, None), name)
    if "clone" not in allowed:
        clone = library.seccomp_syscall_resolve_name(b"clone")
        no_namespace = _ArgCompare(0, SCMP_CMP_MASKED_EQ, CLONE_NAMESPACE_FLAGS, 0)
        _check(
            library.seccomp_rule_add_array(
                context, SCMP_ACT_ALLOW, clone, 1, ctypes.byref(no_namespace)
            ),
            "clone without namespace flags",
        )
    clone3 = library.seccomp_syscall_resolve_name(b"clone3")
    if clone3 >= 0 and "clone3" not in allowed:
        _check(
            library.seccomp_rule_add_array(context, scmp_act_errno(errno.ENOSYS), clone3, 0, None),
            "clone3",
        )
    return tuple(skipped)


def _export(library: ctypes.CDLL, context: int) -> bytes:
    """seccomp_export_bpf writes to a file descriptor: a memfd, read back whole."""
    fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
    try:
        _check(library.seccomp_export_bpf(context, fd), "exporting the filter")
        size = os.lseek(fd, 0, os.SEEK_END)
        if size == 0 or size % SOCK_FILTER_BYTES or size > MAX_EXPORT_BYTES:
            raise FailedPrecondition(f"seccomp: the exported filter has {size} bytes")
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def compile_oci_profile(
    profile: Mapping[str, Any],
    *,
    field: str,
    capabilities: Collection[str] = DEFAULT_CAPABILITIES,
) -> bytes:
    """The OCI `linux.seccomp` object `profile` as a BPF program for a container holding
    `capabilities` (Docker's includes/excludes read them). Any malformed part, or a filter
    longer than the kernel loads, raises InvalidArgument(field, where and what)."""
    return _compile(parse_oci_profile(profile, field=field, capabilities=capabilities), field)


def load_localhost_profile(
    path: str, field: str, *, capabilities: Collection[str] = DEFAULT_CAPABILITIES
) -> bytes:
    """Read, check and compile the profile at `path`: the node admin's file (CRI's Localhost
    profile), absolute, a regular file of at most MAX_PROFILE_BYTES of JSON. Blocking I/O and
    compiling: a caller on the event loop runs it in a thread."""
    return _compile(read_localhost_profile(path, field, capabilities=capabilities), field)


def read_localhost_profile(
    path: str, field: str, *, capabilities: Collection[str] = DEFAULT_CAPABILITIES
) -> OciProfile:
    """Read and check the profile at `path` as load_localhost_profile does, without compiling
    it: for a runtime that hands the profile on to its own compiler (runc). Blocking I/O."""
    if len(path) > PATH_MAX or "\0" in path or not os.path.isabs(path):
        raise InvalidArgument(
            field, f"{path[:80]!r}: a seccomp profile path must be absolute, without NUL and at"
            f" most {PATH_MAX} bytes"
        )  # fmt: skip
    text = _read_profile(path, field)
    try:
        profile = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
        raise InvalidArgument(field, f"{path}: not a JSON seccomp profile: {exc}") from exc
    return parse_oci_profile(profile, field=field, capabilities=capabilities, origin=path)


def _read_profile(path: str, field: str) -> bytes:
    # O_NONBLOCK: a FIFO put at the path must not hang the open.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        message = f"{path}: cannot open the seccomp profile: {exc.strerror}"
        raise InvalidArgument(field, message) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidArgument(field, f"{path}: the seccomp profile is not a regular file")
        text = os.read(fd, MAX_PROFILE_BYTES + 1)
        while len(text) <= MAX_PROFILE_BYTES and (more := os.read(fd, MAX_PROFILE_BYTES)):
            text += more
    finally:
        os.close(fd)
    if len(text) > MAX_PROFILE_BYTES:
        raise InvalidArgument(field, f"{path}: the seccomp profile is over 1 MiB")
    return text


# Compiling a checked profile.


def _compile(profile: OciProfile, field: str) -> bytes:
    library = _library()
    with _filter(library, profile.default_action, profile.arches) as context:
        for rule in profile.rules:
            if rule.action != profile.default_action:  # libseccomp refuses such a rule
                _add_profile_rule(library, context, rule, field)
        bpf = _export(library, context)
    instructions = len(bpf) // SOCK_FILTER_BYTES
    if instructions > BPF_MAXINSNS:
        source = f"{profile.origin}: " if profile.origin else ""
        raise InvalidArgument(
            field, f"{source}the profile compiles to {instructions} BPF instructions; the kernel"
            f" loads at most {BPF_MAXINSNS}"
        )  # fmt: skip
    return bpf


def _add_profile_rule(library: ctypes.CDLL, context: int, rule: SyscallRule, field: str) -> None:
    for name in rule.names:
        number = library.seccomp_syscall_resolve_name(name.encode())
        if number == NR_SCMP_ERROR:  # unknown to this libseccomp: skipped, as runc does
            continue
        for comparisons in rule.comparison_sets:
            array = (_ArgCompare * max(len(comparisons), 1))(
                *(_ArgCompare(c.index, c.op, c.value, c.value_two) for c in comparisons)
            )
            result = library.seccomp_rule_add_array(
                context, rule.action, number, len(comparisons), array
            )
            if result < 0:
                raise InvalidArgument(
                    field, f"{rule.where} ({name}): libseccomp refused the rule:"
                    f" {os.strerror(-result)}"
                )  # fmt: skip
