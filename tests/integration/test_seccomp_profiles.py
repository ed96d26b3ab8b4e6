"""Seccomp programs loaded by the kernel: a forked child of this (root) test enters new UTS and
mount namespaces, sets no_new_privs, loads a program with prctl(PR_SET_SECCOMP) as the
supervisor does, and tries sethostname and mount. It keeps every capability, so an EPERM can
only come from the filter, and the namespaces die with it (nothing to sweep)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import signal
from pathlib import Path
from typing import Any, NoReturn

import pytest

from adapter.core.confinement import DEFAULT_CAPABILITIES, default_allowed
from adapter.supervisor import seccomp
from tests.conftest import require_root
from tests.unit.test_seccomp import require_libseccomp

pytestmark = pytest.mark.integration

FIELD = "linux.security_context.seccomp"
SYS_ADMIN = (*DEFAULT_CAPABILITIES, "CAP_SYS_ADMIN")
PROBE_HOSTNAME = b"ctz-probe"
MISSING_TARGET = b"/nonexistent-ctz-seccomp-probe"  # the kernel answers a mount here ENOENT
PR_SET_SECCOMP, SECCOMP_MODE_FILTER, PR_SET_NO_NEW_PRIVS = 22, 2, 38
CLONE_NEWNS, CLONE_NEWUTS = 0x00020000, 0x04000000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
BLOCK_SETHOSTNAME = {
    "defaultAction": "SCMP_ACT_ALLOW",
    "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO"}],
}

libc = ctypes.CDLL(None, use_errno=True)


class SockFprog(ctypes.Structure):
    """struct sock_fprog."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


@pytest.fixture(autouse=True)
def _needs_root_and_libseccomp() -> None:
    require_root()
    require_libseccomp()


def errno_name(result: int) -> str:
    """The outcome of a libc call: "ok" or the errno's name."""
    return "ok" if result == 0 else errno.errorcode[ctypes.get_errno()]


def check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), what)


def load(bpf: bytes) -> None:
    program = ctypes.create_string_buffer(bpf, len(bpf))
    fprog = SockFprog(len(bpf) // seccomp.SOCK_FILTER_BYTES, ctypes.addressof(program))
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), 0, 0, 0), "no_new_privs")
    args = (ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), 0, 0)
    check(libc.prctl(PR_SET_SECCOMP, *args), "PR_SET_SECCOMP")


def probe(bpf: bytes | None, name: bytes) -> dict[str, str]:
    """In the child: own namespaces (mounts private, so nothing reaches the host's), the
    filter, then the calls whose outcome the tests read."""
    check(libc.unshare(CLONE_NEWUTS | CLONE_NEWNS), "unshare")
    check(libc.mount(None, b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None), "private /")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a SIGSYS leaves no core file behind
    if bpf is not None:
        load(bpf)
    return {
        "sethostname": errno_name(libc.sethostname(name, len(name))),
        "hostname": os.uname().nodename,
        "mount": errno_name(libc.mount(b"none", MISSING_TARGET, b"tmpfs", 0, None)),
    }


def child(bpf: bytes | None, name: bytes, report: int) -> NoReturn:
    code = 1
    try:
        os.write(report, json.dumps(probe(bpf, name)).encode())
        code = 0
    except BaseException as exc:
        os.write(report, json.dumps({"error": repr(exc)}).encode())
    finally:
        os._exit(code)


def confined(bpf: bytes | None, name: bytes = PROBE_HOSTNAME) -> tuple[int, dict[str, Any]]:
    """The child's wait status and its report (empty if it was killed before writing one)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        child(bpf, name, write_end)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    return status, json.loads(data) if data else {}


def outcome(bpf: bytes | None, name: bytes = PROBE_HOSTNAME) -> dict[str, Any]:
    status, report = confined(bpf, name)
    assert os.waitstatus_to_exitcode(status) == 0, report
    return report


def test_without_a_filter_root_may_do_both() -> None:
    """The control: what the kernel itself answers this child."""
    assert outcome(None) == {"sethostname": "ok", "hostname": "ctz-probe", "mount": "ENOENT"}


def test_a_localhost_profile_blocks_sethostname_even_with_cap_sys_admin(tmp_path: Path) -> None:
    path = tmp_path / "block-hostname.json"
    path.write_text(json.dumps(BLOCK_SETHOSTNAME))
    bpf = seccomp.load_localhost_profile(str(path), FIELD, capabilities=SYS_ADMIN)
    report = outcome(bpf)
    assert report["sethostname"] == "EPERM" and report["hostname"] != "ctz-probe"
    assert report["mount"] == "ENOENT"  # everything else allowed


def test_the_default_with_cap_sys_admin_lets_sethostname_and_mount_through() -> None:
    bpf = seccomp.build_program(default_allowed(SYS_ADMIN)).bpf
    assert outcome(bpf) == {"sethostname": "ok", "hostname": "ctz-probe", "mount": "ENOENT"}


def test_the_default_without_cap_sys_admin_refuses_mount_in_the_filter() -> None:
    """sethostname passes the filter: in a container the missing capability refuses it."""
    report = outcome(seccomp.build_program().bpf)
    assert report == {"sethostname": "ok", "hostname": "ctz-probe", "mount": "EPERM"}


def test_argument_comparisons_and_kill_actions_as_the_kernel_applies_them() -> None:
    three_bytes = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO",
                      "errnoRet": errno.EINVAL,
                      "args": [{"index": 1, "value": 3, "op": "SCMP_CMP_EQ"}]}],
    }  # fmt: skip
    bpf = seccomp.compile_oci_profile(three_bytes, field=FIELD)
    assert outcome(bpf, b"abc")["sethostname"] == "EINVAL"
    assert outcome(bpf, b"abcd")["hostname"] == "abcd"
    killing = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_KILL_PROCESS"}],
    }
    status, report = confined(seccomp.compile_oci_profile(killing, field=FIELD))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS, report
