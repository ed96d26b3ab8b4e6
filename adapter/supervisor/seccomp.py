"""The default seccomp filter (adapter/core/confinement.py) compiled to a raw BPF program.

libseccomp does the compiling, through ctypes: Debian's libseccomp2 is on every host (apt itself
depends on it), its Python binding exists only for the system Python, and a filter written by
hand would have to get every architecture's syscall numbers right. The program is exported as
bytes (an array of `struct sock_filter`) and handed to the C supervisor, which loads it with
prctl(PR_SET_SECCOMP) just before exec: the supervisor needs no libseccomp (its static build
for LXC stays plain libc), and the filter is compiled once per driver, not once per launch.

The rules: everything not allowed fails with EPERM; each allowed name this libseccomp and
kernel know is allowed (others are skipped, and reported); `clone` is allowed only when its
flags (argument 0) ask for no namespace; `clone3` fails with ENOSYS, because its flags live in
memory a filter cannot read, and libc then falls back to `clone`. The filter covers x86_64 and
i386 (32-bit binaries in images); a syscall of any other ABI, x32 included (off by default on
Debian's kernels), kills the process. Each ABI more costs the kernel time at every launch, as
it checks, compiles and caches the filter: x32 would add about a third.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass

from adapter.core.confinement import CLONE_NAMESPACE_FLAGS, SECCOMP_ALLOWED
from adapter.core.errors import FailedPrecondition

LIBRARY = "libseccomp.so.2"
SOCK_FILTER_BYTES = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
MAX_EXPORT_BYTES = 1 << 20  # far above any filter of a few hundred rules

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7
SCMP_FLTATR_ACT_BADARCH = 2
SCMP_FLTATR_CTL_OPTIMIZE = 8
OPTIMIZE_BINARY_TREE = 2  # syscalls found by a binary search, not a linear scan
# Audit architecture token (linux/audit.h) of i386; x86_64's is the native one.
ARCH_X86 = 0x40000003
COMPAT_ARCHES = (ARCH_X86,)


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


def build_program(allowed: Sequence[str] = SECCOMP_ALLOWED) -> SeccompProgram:
    """Compile the default filter (or one allowing `allowed`) and export it as BPF bytes."""
    library = _library()
    context = library.seccomp_init(scmp_act_errno(errno.EPERM))
    if not context:
        raise FailedPrecondition("seccomp: seccomp_init failed")
    try:
        for arch in COMPAT_ARCHES:
            library.seccomp_arch_add(context, arch)  # -EEXIST or unsupported: fine either way
        _check(
            library.seccomp_attr_set(context, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS),
            "setting the bad-architecture action",
        )
        # Older libseccomp has no binary-tree optimisation: the filter is the same, only slower.
        library.seccomp_attr_set(context, SCMP_FLTATR_CTL_OPTIMIZE, OPTIMIZE_BINARY_TREE)
        skipped = _add_rules(library, context, allowed)
        return SeccompProgram(_export(library, context), skipped)
    finally:
        library.seccomp_release(context)


def _add_rules(library: ctypes.CDLL, context: int, allowed: Sequence[str]) -> tuple[str, ...]:
    skipped = []
    for name in dict.fromkeys(allowed):  # in order, without duplicates
        number = library.seccomp_syscall_resolve_name(name.encode())
        if number < 0:  # unknown to libseccomp, or not a syscall of this architecture
            skipped.append(name)
            continue
        _check(library.seccomp_rule_add_array(context, SCMP_ACT_ALLOW, number, 0, None), name)
    clone = library.seccomp_syscall_resolve_name(b"clone")
    no_namespace = _ArgCompare(0, SCMP_CMP_MASKED_EQ, CLONE_NAMESPACE_FLAGS, 0)
    _check(
        library.seccomp_rule_add_array(
            context, SCMP_ACT_ALLOW, clone, 1, ctypes.byref(no_namespace)
        ),
        "clone without namespace flags",
    )
    clone3 = library.seccomp_syscall_resolve_name(b"clone3")
    if clone3 >= 0:
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
