"""Seccomp profiles beyond the plain default: the default allow-list widened by added
capabilities (Docker's groups), and OCI `linux.seccomp` profiles (CRI Localhost) checked and
compiled. Verdicts come from test_seccomp.py's classic-BPF interpreter, as the kernel would give
them, without loading any filter."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

from adapter.core import services as services_module
from adapter.core.confinement import (
    CAPABILITY_SYSCALLS,
    DEFAULT_CAPABILITIES,
    SECCOMP_ALLOWED,
    default_allowed,
    oci_seccomp_profile,
)
from adapter.core.errors import InvalidArgument
from adapter.core.services import SeccompFilter
from adapter.supervisor import seccomp
from adapter.supervisor.seccomp_profile import parse_oci_profile
from tests.unit.test_seccomp import (
    ALLOW,
    AUDIT_ARCH_I386,
    AUDIT_ARCH_X86_64,
    ENOSYS,
    EPERM,
    KILL_PROCESS,
    SIGCHLD,
    require_libseccomp,
    run,
    seccomp_data,
)

FIELD = "linux.security_context.seccomp"
SYS_ADMIN = (*DEFAULT_CAPABILITIES, "CAP_SYS_ADMIN")
CLONE_NEWUTS = 0x04000000
# x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl)
NR = {
    "read": 0, "write": 1, "getppid": 110, "clone": 56, "ptrace": 101, "sethostname": 170,
    "setdomainname": 171, "mount": 165, "umount2": 166, "pivot_root": 155, "unshare": 272,
    "setns": 308, "clone3": 435, "reboot": 169, "uname": 63,
}  # fmt: skip
I386_SETHOSTNAME = 74
I386_CHOWN32 = 212
BLOCK_SETHOSTNAME = {
    "defaultAction": "SCMP_ACT_ALLOW",
    "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO"}],
}


def verdict(bpf: bytes, name: str, *args: int, arch: int = AUDIT_ARCH_X86_64) -> int:
    return run(bpf, seccomp_data(arch, NR[name], args))


def compiled(
    profile: dict[str, Any], capabilities: tuple[str, ...] = DEFAULT_CAPABILITIES
) -> bytes:
    require_libseccomp()
    return seccomp.compile_oci_profile(profile, field=FIELD, capabilities=capabilities)


# --- the default allow-list and capabilities ----------------------------------------------


def test_the_default_allows_setting_the_hostname_and_nothing_a_capability_brings() -> None:
    allowed = default_allowed(DEFAULT_CAPABILITIES)
    assert allowed == SECCOMP_ALLOWED
    assert {"sethostname", "setdomainname"} <= set(allowed)
    for names in CAPABILITY_SYSCALLS.values():
        assert not set(names) & set(allowed), names


def test_an_added_capability_adds_its_syscalls_whatever_the_spelling_or_order() -> None:
    widened = default_allowed(SYS_ADMIN)
    added = set(widened) - set(SECCOMP_ALLOWED)
    assert {"mount", "umount2", "pivot_root", "unshare", "setns", "clone", "clone3"} <= added
    assert "ptrace" not in added and "reboot" not in added
    assert default_allowed(("sys_admin", *reversed(DEFAULT_CAPABILITIES))) == widened
    ptrace = set(default_allowed(("CAP_SYS_PTRACE",))) - set(SECCOMP_ALLOWED)
    assert {"ptrace", "process_vm_readv", "process_vm_writev", "kcmp"} <= ptrace
    assert {"init_module", "finit_module", "delete_module"} <= set(default_allowed(("SYS_MODULE",)))
    assert {"settimeofday", "clock_settime", "adjtimex", "clock_adjtime"} <= set(
        default_allowed(("CAP_SYS_TIME",))
    )
    assert {"mbind", "set_mempolicy", "migrate_pages", "move_pages"} <= set(
        default_allowed(("CAP_SYS_NICE",))
    )
    assert "reboot" in default_allowed(("CAP_SYS_BOOT",))
    assert "syslog" in default_allowed(("CAP_SYSLOG",))


def test_the_default_program_lets_sethostname_through_to_the_kernels_capability_check() -> None:
    require_libseccomp()
    bpf = seccomp.build_program().bpf
    assert verdict(bpf, "sethostname") == verdict(bpf, "setdomainname") == ALLOW
    assert verdict(bpf, "mount") == EPERM and verdict(bpf, "setns") == EPERM


def test_cap_sys_admin_lifts_mount_unshare_and_the_clone_restrictions() -> None:
    require_libseccomp()
    bpf = seccomp.build_program(default_allowed(SYS_ADMIN)).bpf
    for name in ("mount", "umount2", "pivot_root", "unshare", "setns", "clone3"):
        assert verdict(bpf, name) == ALLOW, name
    assert verdict(bpf, "clone", CLONE_NEWUTS | SIGCHLD) == ALLOW
    assert verdict(bpf, "ptrace") == EPERM and verdict(bpf, "reboot") == EPERM
    plain = seccomp.build_program().bpf
    assert verdict(plain, "clone", CLONE_NEWUTS | SIGCHLD) == EPERM
    assert verdict(plain, "clone3") == ENOSYS


def test_the_oci_default_drops_the_clone_rules_only_for_cap_sys_admin() -> None:
    plain = oci_seccomp_profile()
    assert [rule["names"] for rule in plain["syscalls"][1:]] == [["clone"], ["clone3"]]
    widened = oci_seccomp_profile(SYS_ADMIN)
    assert len(widened["syscalls"]) == 1
    assert {"mount", "clone", "clone3"} <= set(widened["syscalls"][0]["names"])


def test_the_service_compiles_once_per_distinct_allow_list_and_keeps_a_bounded_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compiled_lists: list[tuple[str, ...]] = []

    class Program:
        def __init__(self, allowed: tuple[str, ...]) -> None:
            compiled_lists.append(allowed)
            self.bpf = f"{len(allowed)}".encode()

    monkeypatch.setattr(services_module, "build_program", Program)
    programs = SeccompFilter()
    assert programs.bpf() == programs.bpf(DEFAULT_CAPABILITIES)
    assert programs.bpf(SYS_ADMIN) == programs.bpf(("SYS_ADMIN", *DEFAULT_CAPABILITIES))
    assert programs.bpf() != programs.bpf(SYS_ADMIN)
    assert compiled_lists == [SECCOMP_ALLOWED, default_allowed(SYS_ADMIN)]
    groups = list(CAPABILITY_SYSCALLS)
    sets = [(groups[i], groups[j]) for i in range(len(groups)) for j in range(i + 1, len(groups))]
    assert len(sets) > SeccompFilter.MAX_PROGRAMS
    for capabilities in sets:
        programs.bpf(capabilities)
    assert len(programs._programs) == SeccompFilter.MAX_PROGRAMS


# --- OCI profiles: checking ---------------------------------------------------------------


def with_rule(**rule: Any) -> dict[str, Any]:
    return {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], **rule}]}


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ([], r"expected an object, got list"),
        ({}, r"defaultAction: required"),
        ({"defaultAction": "ALLOW"}, r"defaultAction: expected one of SCMP_ACT_ALLOW, .*'ALLOW'"),
        ({"defaultAction": "SCMP_ACT_NOTIFY"}, r"defaultAction: SCMP_ACT_NOTIFY is not supported"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "defaultErrnoRet": 1},
         r"defaultErrnoRet: SCMP_ACT_ALLOW takes no return code"),
        ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 5000},
         r"defaultErrnoRet: expected an integer from 0 to 4095, got 5000"),
        ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": True},
         r"defaultErrnoRet: expected an integer"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "defaultaction": "x"}, r"defaultaction: unknown key"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_Z80"]},
         r"architectures\[0\]: expected one of .*'SCMP_ARCH_Z80'"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": "SCMP_ARCH_X86"},
         r"architectures: expected a list, got str"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86"],
          "archMap": [{"architecture": "SCMP_ARCH_X86_64"}]}, r"architectures and archMap"),
        ({"defaultAction": "SCMP_ACT_ALLOW",
          "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": [7]}]},
         r"archMap\[0\]\.subArchitectures\[0\]: expected one of"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_BOGUS"]},
         r"flags\[0\]: expected one of"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/agent.sock"},
         r"listenerPath: seccomp notification agents are not supported"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": {"names": ["read"]}},
         r"syscalls: expected a list, got dict"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": ["read"]},
         r"syscalls\[0\]: expected an object, got str"),
        (with_rule(), r"syscalls\[0\]\.action: required"),
        (with_rule(action="SCMP_ACT_ERRNO", errnoRet=-1),
         r"syscalls\[0\]\.errnoRet: expected an integer from 0 to 4095, got -1"),
        (with_rule(action="SCMP_ACT_KILL", errnoRet=1), r"syscalls\[0\]\.errnoRet: SCMP_ACT_KILL"),
        (with_rule(action="SCMP_ACT_ERRNO", name="write"), r"syscalls\[0\]: name and names"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": [], "action": "SCMP_ACT_LOG"}]},
         r"syscalls\[0\]\.names: list at least one syscall"),
        ({"defaultAction": "SCMP_ACT_ALLOW",
          "syscalls": [{"names": ["read", "Write!"], "action": "SCMP_ACT_LOG"}]},
         r"syscalls\[0\]\.names\[1\]: expected a syscall name .*'Write!'"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"name": 3, "action": "SCMP_ACT_LOG"}]},
         r"syscalls\[0\]\.name: expected a syscall name .*3"),
        (with_rule(action="SCMP_ACT_ERRNO", args={"index": 0}),
         r"syscalls\[0\]\.args: expected a list, got dict"),
        (with_rule(action="SCMP_ACT_ERRNO", args=[{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]),
         r"syscalls\[0\]\.args\[0\]\.index: expected an integer from 0 to 5, got 6"),
        (with_rule(action="SCMP_ACT_ERRNO", args=[{"index": 0, "op": "SCMP_CMP_EQ"}]),
         r"syscalls\[0\]\.args\[0\]\.value: required"),
        (with_rule(action="SCMP_ACT_ERRNO", args=[{"index": 0, "value": 1 << 64,
                                                   "op": "SCMP_CMP_EQ"}]),
         r"syscalls\[0\]\.args\[0\]\.value: expected an integer from 0 to 18446744073709551615"),
        (with_rule(action="SCMP_ACT_ERRNO", args=[{"index": 0, "value": 1, "op": "EQ"}]),
         r"syscalls\[0\]\.args\[0\]\.op: expected one of SCMP_CMP_EQ, .*'EQ'"),
        (with_rule(action="SCMP_ACT_ERRNO", args=[{"index": 0, "value": 1}]),
         r"syscalls\[0\]\.args\[0\]\.op: expected one of .*None"),
        (with_rule(action="SCMP_ACT_ERRNO", includes={"caps": "CAP_SYS_ADMIN"}),
         r"syscalls\[0\]\.includes\.caps: expected a list, got str"),
        (with_rule(action="SCMP_ACT_ERRNO", excludes={"minKernel": "latest"}),
         r"syscalls\[0\]\.excludes\.minKernel: expected a kernel version like '5.8'"),
        (with_rule(action="SCMP_ACT_ERRNO", includes={"kernel": "5.8"}),
         r"syscalls\[0\]\.includes\.kernel: unknown key"),
    ],
)  # fmt: skip
def test_each_malformed_part_is_named(profile: Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as raised:
        parse_oci_profile(profile, field=FIELD)
    assert raised.value.field == FIELD
    assert str(raised.value).startswith(f"{FIELD}: ")


def test_a_dropped_rule_is_still_checked() -> None:
    """A mistake hides in a rule that happens not to apply to this container."""
    profile = with_rule(action="SCMP_ACT_LOG", errnoRet=1, includes={"caps": ["CAP_SYS_BOOT"]})
    with pytest.raises(InvalidArgument, match=r"syscalls\[0\]\.errnoRet"):
        parse_oci_profile(profile, field=FIELD)


def test_more_than_4096_rules_are_refused() -> None:
    entry = {"names": ["read"], "action": "SCMP_ACT_LOG"}
    with pytest.raises(InvalidArgument, match=r"syscalls: 4097 entries, at most 4096"):
        parse_oci_profile(
            {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [entry] * 4097}, field=FIELD
        )
    # Each name times each comparison set is one rule: 65 names x 64 same-argument comparisons.
    args = [{"index": 0, "value": value, "op": "SCMP_CMP_EQ"} for value in range(64)]
    names = [f"name_{n}" for n in range(65)]
    wide = {"names": names, "action": "SCMP_ACT_LOG", "args": args}
    with pytest.raises(InvalidArgument, match=r"syscalls: 4160 rules, at most 4096"):
        parse_oci_profile({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [wide]}, field=FIELD)


# --- OCI profiles: compiled verdicts ------------------------------------------------------


def test_a_profile_blocking_sethostname_blocks_only_it() -> None:
    bpf = compiled(BLOCK_SETHOSTNAME, SYS_ADMIN)
    assert 0 < len(bpf) // seccomp.SOCK_FILTER_BYTES <= seccomp.BPF_MAXINSNS
    assert verdict(bpf, "sethostname") == EPERM
    assert verdict(bpf, "mount") == verdict(bpf, "read") == ALLOW
    # No architectures listed: the native ABI only, as runc compiles it.
    assert run(bpf, seccomp_data(AUDIT_ARCH_I386, I386_SETHOSTNAME)) == KILL_PROCESS


def test_different_profiles_compile_to_different_programs() -> None:
    killing = {**BLOCK_SETHOSTNAME, "syscalls": [{"names": ["sethostname"],
                                                  "action": "SCMP_ACT_KILL_PROCESS"}]}  # fmt: skip
    programs = {compiled(BLOCK_SETHOSTNAME), compiled(killing), compiled(oci_seccomp_profile())}
    assert len(programs) == 3
    assert verdict(compiled(killing), "sethostname") == KILL_PROCESS


def test_the_oci_form_of_the_default_compiles_to_the_same_verdicts_as_the_default() -> None:
    for capabilities in (DEFAULT_CAPABILITIES, SYS_ADMIN):
        ours = seccomp.build_program(default_allowed(capabilities)).bpf
        oci = compiled(oci_seccomp_profile(capabilities), capabilities)
        for name in NR:
            for flags in (SIGCHLD, CLONE_NEWUTS | SIGCHLD):
                assert verdict(ours, name, flags) == verdict(oci, name, flags), (name, flags)


def test_actions_return_codes_and_argument_comparisons() -> None:
    profile = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": errno.ENOSYS,
        "syscalls": [
            {"names": ["read", "write", "uname"], "action": "SCMP_ACT_ALLOW"},
            # Distinct arguments: both must hold.
            {"names": ["sethostname"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EINVAL,
             "args": [{"index": 1, "value": 3, "op": "SCMP_CMP_EQ"},
                      {"index": 0, "value": 0xFF, "valueTwo": 0x10, "op": "SCMP_CMP_MASKED_EQ"}]},
            # The same argument twice: either suffices.
            {"names": ["setdomainname"], "action": "SCMP_ACT_TRAP",
             "args": [{"index": 1, "value": 1, "op": "SCMP_CMP_EQ"},
                      {"index": 1, "value": 9, "op": "SCMP_CMP_GT"}]},
            {"name": "getppid", "action": "SCMP_ACT_LOG"},
            {"names": ["ptrace"], "action": "SCMP_ACT_TRACE"},
            {"names": ["reboot"], "action": "SCMP_ACT_KILL"},
            {"names": ["no_such_syscall_ctz"], "action": "SCMP_ACT_ALLOW"},  # skipped
        ],
    }  # fmt: skip
    bpf = compiled(profile)
    assert verdict(bpf, "read") == ALLOW and verdict(bpf, "mount") == seccomp.scmp_act_errno(38)
    assert verdict(bpf, "sethostname", 0x110, 3) == seccomp.scmp_act_errno(errno.EINVAL)
    assert verdict(bpf, "sethostname", 0x111, 3) == seccomp.scmp_act_errno(errno.ENOSYS)
    assert verdict(bpf, "sethostname", 0x110, 4) == seccomp.scmp_act_errno(errno.ENOSYS)
    for length, trapped in ((1, True), (10, True), (5, False)):
        expected = 0x00030000 if trapped else seccomp.scmp_act_errno(errno.ENOSYS)
        assert verdict(bpf, "setdomainname", 0, length) == expected, length
    assert verdict(bpf, "getppid") == 0x7FFC0000
    assert verdict(bpf, "ptrace") == 0x7FF00000 | errno.EPERM
    assert verdict(bpf, "reboot") == 0  # SCMP_ACT_KILL: the thread


def test_architectures_listed_foreign_ones_skipped_and_other_abi_names_kept() -> None:
    profile = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_AARCH64"],
        "flags": ["SECCOMP_FILTER_FLAG_LOG"],
        "syscalls": [{"names": ["read", "chown32"], "action": "SCMP_ACT_ALLOW"}],
    }
    bpf = compiled(profile)
    assert run(bpf, seccomp_data(AUDIT_ARCH_I386, 3)) == ALLOW  # i386 read
    assert run(bpf, seccomp_data(AUDIT_ARCH_I386, I386_CHOWN32)) == ALLOW
    assert run(bpf, seccomp_data(AUDIT_ARCH_I386, I386_SETHOSTNAME)) == EPERM
    assert run(bpf, seccomp_data(0xC00000B7, 63)) == KILL_PROCESS  # aarch64 never joined


def docker_shaped_profile() -> dict[str, Any]:
    """The shape of Docker's default profile (archMap, includes, excludes), in a few rules."""
    admin = {"caps": ["CAP_SYS_ADMIN"]}
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "archMap": [
            {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]},
            {"architecture": "SCMP_ARCH_RISCV64", "subArchitectures": None},
        ],
        "syscalls": [
            {"names": ["read", "write", "uname"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["ptrace"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "4.8"}},
            {"names": ["getppid"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "99.0"}},
            {"names": ["reboot"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["s390x"]}},
            {"names": ["mount", "clone", "clone3", "sethostname"], "action": "SCMP_ACT_ALLOW",
             "includes": admin},
            {"names": ["clone"], "action": "SCMP_ACT_ALLOW", "excludes": admin,
             "args": [{"index": 0, "value": 0x7E020000, "op": "SCMP_CMP_MASKED_EQ"}]},
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38, "excludes": admin},
            {"names": ["umount2"], "action": "SCMP_ACT_ALLOW",
             "includes": {"arches": ["amd64", "x32"]}, "comment": "a note"},
        ],
    }  # fmt: skip


def test_docker_includes_and_excludes_follow_the_containers_capabilities() -> None:
    plain, admin = compiled(docker_shaped_profile()), compiled(docker_shaped_profile(), SYS_ADMIN)
    assert verdict(plain, "sethostname") == EPERM and verdict(admin, "sethostname") == ALLOW
    assert verdict(plain, "mount") == EPERM and verdict(admin, "mount") == ALLOW
    assert verdict(plain, "clone", SIGCHLD) == ALLOW
    assert verdict(plain, "clone", CLONE_NEWUTS | SIGCHLD) == EPERM
    assert verdict(admin, "clone", CLONE_NEWUTS | SIGCHLD) == ALLOW
    assert verdict(plain, "clone3") == ENOSYS and verdict(admin, "clone3") == ALLOW
    assert verdict(plain, "ptrace") == ALLOW  # this kernel is newer than 4.8
    assert verdict(plain, "getppid") == EPERM and verdict(plain, "reboot") == EPERM
    assert verdict(plain, "umount2") == ALLOW
    assert run(plain, seccomp_data(AUDIT_ARCH_I386, 3)) == ALLOW  # the x86_64 entry's i386


def test_a_profile_the_kernel_could_not_load_is_refused() -> None:
    """Every rule a comparison with an action of its own: far over BPF_MAXINSNS."""
    calls = ["read", "write", "close", "fstat", "lseek", "mmap", "mprotect", "munmap"]
    entries = [
        {"names": [calls[k % len(calls)]], "action": "SCMP_ACT_ERRNO", "errnoRet": k + 1,
         "args": [{"index": 1, "value": k << 32 | 7, "op": "SCMP_CMP_EQ"}]}
        for k in range(900)
    ]  # fmt: skip
    with pytest.raises(InvalidArgument, match=r"compiles to \d+ BPF instructions; .* 4096"):
        compiled({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": entries})


# --- Localhost profiles: the file ---------------------------------------------------------


def test_a_localhost_profile_compiles_like_the_same_object(tmp_path: Path) -> None:
    require_libseccomp()
    path = tmp_path / "block-hostname.json"
    path.write_text(json.dumps(BLOCK_SETHOSTNAME))
    loaded = seccomp.load_localhost_profile(str(path), FIELD, capabilities=SYS_ADMIN)
    assert loaded == compiled(BLOCK_SETHOSTNAME, SYS_ADMIN)


def test_a_mistake_in_a_localhost_profile_names_the_file_and_the_place(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(with_rule(action="SCMP_ACT_JUMP")))
    with pytest.raises(
        InvalidArgument, match=rf"^{FIELD}: {path}: syscalls\[0\]\.action: expected"
    ):
        seccomp.load_localhost_profile(str(path), FIELD)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: "profiles/p.json", r"'profiles/p.json': a seccomp profile path must be"),
        (lambda tmp: "/etc/p\0.json", r"path must be absolute, without NUL"),
        (lambda tmp: "/" * 5000, r"at most 4096 bytes"),
        (lambda tmp: str(tmp / "missing.json"), r"missing.json: cannot open the seccomp profile"),
        (lambda tmp: str(tmp), r"is not a regular file"),
        (lambda tmp: fifo(tmp), r"fifo: the seccomp profile is not a regular file"),
        (lambda tmp: written(tmp, b" " * (1 << 20) + b"{}"), r"over 1 MiB"),
        (lambda tmp: written(tmp, b"{'defaultAction': 1}"), r"not a JSON seccomp profile"),
        (lambda tmp: written(tmp, b"[" * 100_000 + b"]" * 100_000), r"not a JSON seccomp profile"),
        (lambda tmp: written(tmp, b"\xff\xfe{}"), r"not a JSON seccomp profile"),
        (lambda tmp: written(tmp, b"null"), r"expected an object, got null"),
    ],
)  # fmt: skip
def test_a_localhost_profile_that_is_no_profile_is_refused(
    tmp_path: Path, make: Any, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message) as raised:
        seccomp.load_localhost_profile(make(tmp_path), FIELD)
    assert raised.value.field == FIELD


def fifo(directory: Path) -> str:
    path = directory / "fifo"
    os.mkfifo(path)
    return str(path)


def written(directory: Path, content: bytes) -> str:
    path = directory / "profile.json"
    path.write_bytes(content)
    return str(path)
