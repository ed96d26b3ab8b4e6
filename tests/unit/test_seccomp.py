"""The exported seccomp program, run here by a small classic-BPF interpreter on made-up
syscalls: what the kernel would answer, without loading it into any process."""

from __future__ import annotations

import ctypes.util
import errno
import platform
import struct
from functools import cache

import pytest

from adapter.core.confinement import CLONE_NAMESPACE_FLAGS
from adapter.supervisor import seccomp
from tests.conftest import require

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7
ALLOW = 0x7FFF0000
KILL_PROCESS = 0x80000000
EPERM = seccomp.scmp_act_errno(errno.EPERM)
ENOSYS = seccomp.scmp_act_errno(errno.ENOSYS)
SIGCHLD = 17
CLONE_NEWUSER = 0x10000000
# x86_64 and i386 syscall numbers (arch/x86/entry/syscalls/syscall_{64,32}.tbl)
X86_64 = {"read": 0, "write": 1, "clone": 56, "mount": 165, "unshare": 272, "clone3": 435}
I386 = {"read": 3, "mount": 21}

# Classic BPF opcodes libseccomp emits (linux/bpf_common.h).
LD_W_ABS, JMP_JA, JMP_JEQ_K, JMP_JGT_K, JMP_JGE_K, JMP_JSET_K, RET_K, ALU_AND_K = (
    0x20, 0x05, 0x15, 0x25, 0x35, 0x45, 0x06, 0x54
)  # fmt: skip


def require_libseccomp() -> None:
    require(platform.machine() == "x86_64", "the syscall numbers here are x86_64's")
    require(ctypes.util.find_library("seccomp") is not None, "libseccomp2 is not installed")


@cache
def default_program() -> seccomp.SeccompProgram:
    return seccomp.build_program()


def instructions(bpf: bytes) -> list[tuple[int, int, int, int]]:
    return [struct.unpack_from("<HBBI", bpf, at) for at in range(0, len(bpf), 8)]


def seccomp_data(arch: int, nr: int, args: tuple[int, ...] = ()) -> bytes:
    """struct seccomp_data: nr, arch, instruction pointer, six 64-bit arguments."""
    padded = (*args, *[0] * (6 - len(args)))
    return struct.pack("<iIQ6Q", nr, arch, 0, *padded)


def run(bpf: bytes, data: bytes) -> int:
    """The filter's verdict for one syscall, as the kernel computes it."""
    program, accumulator, pc = instructions(bpf), 0, 0
    while True:
        code, jump_true, jump_false, k = program[pc]
        pc += 1
        if code == LD_W_ABS:
            accumulator = struct.unpack_from("<I", data, k)[0]
        elif code == ALU_AND_K:
            accumulator &= k
        elif code == JMP_JA:
            pc += k
        elif code == RET_K:
            return k
        else:
            taken = {
                JMP_JEQ_K: accumulator == k,
                JMP_JGT_K: accumulator > k,
                JMP_JGE_K: accumulator >= k,
                JMP_JSET_K: bool(accumulator & k),
            }[code]
            pc += jump_true if taken else jump_false


def test_the_program_is_a_valid_sock_filter_array() -> None:
    require_libseccomp()
    bpf = default_program().bpf
    assert len(bpf) % seccomp.SOCK_FILTER_BYTES == 0
    program = instructions(bpf)
    assert 0 < len(program) <= 4096  # BPF_MAXINSNS
    known = {LD_W_ABS, JMP_JA, JMP_JEQ_K, JMP_JGT_K, JMP_JGE_K, JMP_JSET_K, RET_K, ALU_AND_K}
    for at, (code, jump_true, jump_false, k) in enumerate(program):
        assert code in known, f"instruction {at}: opcode {code:#x}"
        if code == JMP_JA:
            assert at + 1 + k < len(program)
        elif code not in (RET_K, LD_W_ABS, ALU_AND_K):
            assert at + 1 + max(jump_true, jump_false) < len(program)
    assert program[-1][0] == RET_K


@pytest.mark.parametrize(
    ("arch", "nr", "args", "verdict"),
    [
        (AUDIT_ARCH_X86_64, X86_64["read"], (), ALLOW),
        (AUDIT_ARCH_X86_64, X86_64["write"], (), ALLOW),
        (AUDIT_ARCH_X86_64, X86_64["mount"], (), EPERM),
        (AUDIT_ARCH_X86_64, X86_64["unshare"], (CLONE_NEWUSER,), EPERM),
        (AUDIT_ARCH_X86_64, X86_64["clone"], (SIGCHLD,), ALLOW),  # fork
        (AUDIT_ARCH_X86_64, X86_64["clone"], (0x3D0F00,), ALLOW),  # a thread
        (AUDIT_ARCH_X86_64, X86_64["clone"], (CLONE_NEWUSER | SIGCHLD,), EPERM),
        (AUDIT_ARCH_X86_64, X86_64["clone"], (CLONE_NAMESPACE_FLAGS,), EPERM),
        (AUDIT_ARCH_X86_64, X86_64["clone3"], (), ENOSYS),  # libc falls back to clone
        (AUDIT_ARCH_I386, I386["read"], (), ALLOW),
        (AUDIT_ARCH_I386, I386["mount"], (), EPERM),
        (AUDIT_ARCH_AARCH64, 63, (), KILL_PROCESS),  # an architecture the filter does not know
    ],
)
def test_verdicts(arch: int, nr: int, args: tuple[int, ...], verdict: int) -> None:
    require_libseccomp()
    assert run(default_program().bpf, seccomp_data(arch, nr, args)) == verdict


def test_every_namespace_flag_alone_is_refused_to_clone() -> None:
    require_libseccomp()
    flags = [1 << bit for bit in range(32) if CLONE_NAMESPACE_FLAGS & (1 << bit)]
    assert len(flags) == 8
    for flag in flags:
        data = seccomp_data(AUDIT_ARCH_X86_64, X86_64["clone"], (flag | SIGCHLD,))
        assert run(default_program().bpf, data) == EPERM, hex(flag)


def test_names_this_libseccomp_does_not_know_are_skipped() -> None:
    require_libseccomp()
    program = seccomp.build_program(("read", "no_such_syscall_ctz", "socketcall"))
    # socketcall exists on i386 only: not a syscall of the native architecture either.
    assert program.skipped == ("no_such_syscall_ctz", "socketcall")
    assert run(program.bpf, seccomp_data(AUDIT_ARCH_X86_64, X86_64["read"])) == ALLOW
    assert run(program.bpf, seccomp_data(AUDIT_ARCH_X86_64, X86_64["write"])) == EPERM
    assert run(program.bpf, seccomp_data(AUDIT_ARCH_X86_64, X86_64["clone"], (SIGCHLD,))) == ALLOW


def test_each_build_is_a_fresh_program() -> None:
    """Compiled per driver, not cached per process: two builds are equal, not the same."""
    require_libseccomp()
    first, second = seccomp.build_program(), seccomp.build_program()
    assert first.bpf == second.bpf and first is not second
