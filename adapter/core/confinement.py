"""The default confinement of a workload, the same for every runtime. Imports only our errors.

A workload is not trusted (DESIGN.md, "Security model"). Unless a launch is `privileged` (and the
node allows that), every runtime gives it what a production container runtime gives by default:

- a bounding set cut to DEFAULT_CAPABILITIES, with those as its only effective, permitted and
  inheritable capabilities when it runs as root, and none at all as any other user;
- a seccomp filter that allows only SECCOMP_ALLOWED (everything else fails with EPERM), lets
  `clone` create no namespace, and makes `clone3` fail with ENOSYS so libc falls back to clone;
  a capability added to the default set adds its syscalls (CAPABILITY_SYSCALLS, Docker's groups);
- no_new_privs whenever the workload is not root (and on request), so a setuid binary in an
  image gives nothing back;
- for image root filesystems: MASKED_PATHS hidden, READONLY_PATHS read-only, /sys read-only, a
  cgroup namespace whose cgroupfs is read-only, a minimal /dev with no host device.

This module is the policy as data; each runtime translates it (the supervisor for native and LXC,
the OCI spec for containerd, the Engine API for docker).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapter.core.errors import InvalidArgument

if TYPE_CHECKING:  # only read, at run time: no import of the model here
    from adapter.core.model import LaunchSpec

# Linux capability numbers (include/uapi/linux/capability.h), by the names OCI and Docker use.
CAPABILITY_NUMBERS: dict[str, int] = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_LINUX_IMMUTABLE": 9,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_BROADCAST": 11,
    "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13,
    "CAP_IPC_LOCK": 14,
    "CAP_IPC_OWNER": 15,
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_RAWIO": 17,
    "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_PACCT": 20,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_BOOT": 22,
    "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24,
    "CAP_SYS_TIME": 25,
    "CAP_SYS_TTY_CONFIG": 26,
    "CAP_MKNOD": 27,
    "CAP_LEASE": 28,
    "CAP_AUDIT_WRITE": 29,
    "CAP_AUDIT_CONTROL": 30,
    "CAP_SETFCAP": 31,
    "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33,
    "CAP_SYSLOG": 34,
    "CAP_WAKE_ALARM": 35,
    "CAP_BLOCK_SUSPEND": 36,
    "CAP_AUDIT_READ": 37,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
    "CAP_CHECKPOINT_RESTORE": 40,
}
ALL_CAPABILITIES = tuple(CAPABILITY_NUMBERS)

# The set Docker and containerd give a container by default: enough to run as root inside its
# own files (chown, setuid to a service user, bind a low port, ping), nothing that reaches the
# host (no SYS_ADMIN: no mount; no SYS_PTRACE, SYS_MODULE, NET_ADMIN, DAC_READ_SEARCH).
DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

# Hidden from an image container (files: /dev/null bound over; directories: an empty read-only
# tmpfs): kernel memory, keyrings, timers and firmware that leak host state or address layout.
MASKED_PATHS: tuple[str, ...] = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)

# Read-only in an image container: kernel tunables and triggers that act on the whole host.
READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

# clone() flags that create namespaces: a confined workload may fork and make threads, not new
# namespaces (CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME).
CLONE_NAMESPACE_FLAGS = (
    0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80
)

# The seccomp allow-list (x86_64 names; names this kernel or libseccomp does not know are
# skipped). Left out on purpose, so they fail with EPERM: mount and the new mount API, umount,
# pivot_root, unshare, setns, keyctl/add_key/request_key, bpf, perf_event_open, ptrace,
# process_vm_*, kcmp, init/finit/delete_module, kexec_*, reboot, swapon/swapoff, acct, quotactl,
# settimeofday/clock_settime/clock_adjtime/adjtimex, iopl/ioperm, open_by_handle_at,
# name_to_handle_at, lookup_dcookie, userfaultfd, syslog, personality, vhangup, uselib,
# _sysctl, nfsservctl, mbind/set_mempolicy/migrate_pages/move_pages, fanotify_init,
# pidfd_getfd, io_uring_* (a large, often-exploited surface); CAPABILITY_SYSCALLS gives some of
# them back to a container holding the capability they exist for. sethostname/setdomainname
# are allowed to all (Docker ties them to CAP_SYS_ADMIN): they change only the container's own
# UTS namespace, and the kernel asks for CAP_SYS_ADMIN itself, which the default set lacks.
# `clone` is allowed only without namespace flags; `clone3` answers ENOSYS (its flags live in
# memory a filter cannot read), so libc falls back to clone.
_SECCOMP_ALLOWED_TEXT = """
    accept accept4 access alarm arch_prctl bind brk capget capset chdir chmod chown chroot
    clock_getres clock_gettime clock_nanosleep close close_range connect copy_file_range creat
    dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_pwait epoll_pwait2 epoll_wait
    eventfd eventfd2 execve execveat exit exit_group faccessat faccessat2 fadvise64 fallocate
    fchdir fchmod fchmodat fchown fchownat fcntl fdatasync fgetxattr flistxattr flock fork
    fremovexattr fsetxattr fstat fstatfs fsync ftruncate futex futex_waitv futimesat
    get_robust_list get_thread_area getcpu getcwd getdents getdents64 getegid geteuid getgid
    getgroups getitimer getpeername getpgid getpgrp getpid getppid getpriority getrandom
    getresgid getresuid getrlimit getrusage getsid getsockname getsockopt gettid gettimeofday
    getuid getxattr inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel
    io_destroy io_getevents io_pgetevents io_setup io_submit ioctl ioprio_get ioprio_set kill
    landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown lgetxattr link linkat
    listen listxattr llistxattr lremovexattr lseek lsetxattr lstat madvise membarrier
    memfd_create mincore mkdir mkdirat mknod mknodat mlock mlock2 mlockall mmap mprotect
    mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedsend mq_unlink mremap msgctl msgget
    msgrcv msgsnd msync munlock munlockall munmap nanosleep newfstatat open openat openat2 pause
    pidfd_open pidfd_send_signal pipe pipe2 poll ppoll prctl pread64 preadv preadv2 prlimit64
    pselect6 pwrite64 pwritev pwritev2 read readahead readlink readlinkat readv recvfrom recvmmsg
    recvmsg remap_file_pages removexattr rename renameat renameat2 restart_syscall rmdir rseq
    rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend
    rt_sigtimedwait rt_tgsigqueueinfo sched_get_priority_max sched_get_priority_min
    sched_getaffinity sched_getattr sched_getparam sched_getscheduler sched_rr_get_interval
    sched_setaffinity sched_setattr sched_setparam sched_setscheduler sched_yield seccomp select
    semctl semget semop semtimedop sendfile sendmmsg sendmsg sendto set_robust_list
    set_thread_area set_tid_address setdomainname setfsgid setfsuid setgid setgroups sethostname
    setitimer setpgid setpriority setregid setresgid setresuid setreuid setrlimit setsid
    setsockopt setuid setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4
    socket socketpair splice stat statfs statx symlink symlinkat sync sync_file_range syncfs
    sysinfo tee tgkill time timer_create timer_delete timer_getoverrun timer_gettime
    timer_settime timerfd_create timerfd_gettime timerfd_settime times tkill truncate umask uname
    unlink unlinkat utime utimensat utimes vfork wait4 waitid write writev
    """
SECCOMP_ALLOWED: tuple[str, ...] = tuple(_SECCOMP_ALLOWED_TEXT.split())

# What the allow-list adds for a container that holds a capability (Docker's default profile,
# whose groups these are): a syscall that exists for that capability is no attack surface worth
# closing once the capability is granted, and refusing it would break what the capability was
# asked for (`mount` with CAP_SYS_ADMIN, `strace` with CAP_SYS_PTRACE). CAP_SYS_ADMIN also
# lifts the clone and clone3 restrictions; pivot_root (not in Docker's profile) joins it for
# nested container runtimes. Docker leaves adjtimex and clock_adjtime to all (reading the clock
# state); here they join CAP_SYS_TIME.
CAPABILITY_SYSCALLS: dict[str, tuple[str, ...]] = {
    "CAP_SYS_ADMIN": (
        "bpf", "clone", "clone3", "fanotify_init", "fsconfig", "fsmount", "fsopen", "fspick",
        "lookup_dcookie", "mount", "mount_setattr", "move_mount", "open_tree", "perf_event_open",
        "pivot_root", "quotactl", "quotactl_fd", "setns", "syslog", "umount", "umount2",
        "unshare",
    ),
    "CAP_SYS_PTRACE": (
        "kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv", "process_vm_writev",
        "ptrace",
    ),
    "CAP_SYS_MODULE": ("init_module", "finit_module", "delete_module"),
    "CAP_SYS_TIME": ("settimeofday", "clock_settime", "adjtimex", "clock_adjtime"),
    "CAP_SYS_BOOT": ("reboot",),
    "CAP_SYSLOG": ("syslog",),
    "CAP_SYS_NICE": (
        "get_mempolicy", "mbind", "set_mempolicy", "set_mempolicy_home_node", "migrate_pages",
        "move_pages",
    ),
    "CAP_SYS_PACCT": ("acct",),
    "CAP_SYS_RAWIO": ("iopl", "ioperm"),
    "CAP_SYS_TTY_CONFIG": ("vhangup",),
    "CAP_DAC_READ_SEARCH": ("open_by_handle_at",),
    "CAP_BPF": ("bpf",),
    "CAP_PERFMON": ("perf_event_open",),
}  # fmt: skip


def capability_name(name: str) -> str:
    """The kernel's name of a capability as OCI writes it: CRI and Docker users also write
    `sys_admin` or `SYS_ADMIN`."""
    upper = name.upper()
    return upper if upper.startswith("CAP_") else f"CAP_{upper}"


def default_allowed(capabilities: Iterable[str]) -> tuple[str, ...]:
    """SECCOMP_ALLOWED and what CAPABILITY_SYSCALLS adds for `capabilities`, without duplicates,
    in one order whatever the order of `capabilities` (so equal sets compile once)."""
    held = {capability_name(name) for name in capabilities}
    added = (name for cap, names in CAPABILITY_SYSCALLS.items() if cap in held for name in names)
    return tuple(dict.fromkeys((*SECCOMP_ALLOWED, *added)))


@dataclass(frozen=True)
class Confinement:
    """What one workload gets. `privileged` turns everything else off: all capabilities, no
    seccomp filter, no masked or read-only paths (an explicit, node-allowed opt-out)."""

    privileged: bool = False
    # Asked for no_new_privs even as root (it is always set for any other user).
    no_new_privileges: bool = False
    # Changes to the default set (CRI add/drop): names with or without CAP_, or "ALL".
    added: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()

    @property
    def capabilities(self) -> tuple[str, ...]:
        """The default set with `dropped` removed, then `added` added (Docker's order: drop ALL
        and add one gives just that one)."""
        if self.privileged:
            return ALL_CAPABILITIES
        dropped = capability_names(self.dropped)
        kept = tuple(name for name in DEFAULT_CAPABILITIES if name not in dropped)
        # Only what this node holds can be added ("ALL" on a node that itself runs confined).
        added = capability_names(self.added) & frozenset(_node_capabilities())
        return kept + tuple(name for name in ALL_CAPABILITIES if name in added and name not in kept)

    @property
    def seccomp(self) -> bool:
        return not self.privileged

    @property
    def masked_paths(self) -> tuple[str, ...]:
        return () if self.privileged else MASKED_PATHS

    @property
    def readonly_paths(self) -> tuple[str, ...]:
        return () if self.privileged else READONLY_PATHS

    def no_new_privs_for(self, user_is_root: bool) -> bool:
        """Whether to set no_new_privs: on request, and for every non-root user unless
        privileged (a setuid binary must not give root back)."""
        if self.privileged:
            return self.no_new_privileges
        return self.no_new_privileges or not user_is_root

    def summary(self) -> str:
        """One line for `runtimes` and status: what a workload gets."""
        if self.privileged:
            return "privileged: all capabilities, no seccomp, host devices and paths unmasked"
        return (
            f"capabilities: {len(DEFAULT_CAPABILITIES)} (docker default); seccomp: allow-list of"
            f" {len(SECCOMP_ALLOWED)} syscalls; no_new_privs: for non-root users"
            f"{' and root' if self.no_new_privileges else ''}; masked paths: {len(MASKED_PATHS)};"
            " read-only /sys and /proc/sys; cgroup namespace"
        )


def confinement_of(spec: LaunchSpec) -> Confinement:
    """What a launch asks for: privileged or not, no_new_privs, and its capability changes."""
    return Confinement(
        spec.privileged,
        spec.no_new_privileges,
        added=spec.linux.capabilities_add,
        dropped=spec.linux.capabilities_drop,
    )


def capability_names(names: tuple[str, ...], field: str = "capabilities") -> frozenset[str]:
    """Kernel capability names for `names` as a CRI or Docker caller writes them ("NET_ADMIN",
    "CAP_NET_ADMIN", "ALL"); an unknown one is InvalidArgument naming `field`."""
    resolved: set[str] = set()
    for name in names:
        upper = name.upper()
        if upper == "ALL":
            resolved.update(ALL_CAPABILITIES)
            continue
        full = upper if upper.startswith("CAP_") else f"CAP_{upper}"
        if full not in CAPABILITY_NUMBERS:
            raise InvalidArgument(field, f"unknown capability {name!r}")
        resolved.add(full)
    return frozenset(resolved)


def capability_mask(names: tuple[str, ...]) -> int:
    """The kernel's bit mask for capability names."""
    mask = 0
    for name in names:
        mask |= 1 << CAPABILITY_NUMBERS[name]
    return mask


def oci_seccomp_profile(capabilities: Iterable[str] = DEFAULT_CAPABILITIES) -> dict[str, Any]:
    """default_allowed(capabilities) as an OCI runtime-spec `linux.seccomp` object (runc
    compiles it), with the clone and clone3 rules unless the capabilities lift them."""
    plain = list(default_allowed(capabilities))
    syscalls: list[dict[str, Any]] = [{"names": plain, "action": "SCMP_ACT_ALLOW"}]
    if "clone" not in plain:
        no_namespace = {
            "index": 0, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"
        }  # fmt: skip
        syscalls.append({"names": ["clone"], "action": "SCMP_ACT_ALLOW", "args": [no_namespace]})
    if "clone3" not in plain:
        syscalls.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38})  # ENOSYS
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,  # EPERM
        # x86_64 and i386, as adapter/supervisor/seccomp.py: an x32 syscall is refused as a foreign
        # ABI, and leaving x32 out saves runc about 8 ms of compiling at every launch.
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
        "syscalls": syscalls,
    }


def held_capabilities(status: str | None = None) -> tuple[str, ...]:
    """ALL_CAPABILITIES that are in this process's bounding set (`status`: /proc/self/status
    text, read when None): what a runtime it starts can grant. A node that itself runs in a
    container may lack some (CAP_SYS_RESOURCE, say), and a runtime asked for one of those fails
    the launch; so a privileged container gets these."""
    text = _read("/proc/self/status") if status is None else status
    for line in text.splitlines():
        if line.startswith("CapBnd:"):
            mask = int(line.split()[1], 16)
            return tuple(name for name in ALL_CAPABILITIES if mask >> CAPABILITY_NUMBERS[name] & 1)
    return ALL_CAPABILITIES


@functools.cache
def _node_capabilities() -> tuple[str, ...]:
    return held_capabilities()


def kernel_capabilities(last_cap: str | None = None) -> tuple[str, ...]:
    """ALL_CAPABILITIES this kernel knows (`last_cap`: /proc/sys/kernel/cap_last_cap text)."""
    last = int(_read("/proc/sys/kernel/cap_last_cap") if last_cap is None else last_cap)
    return tuple(name for name in ALL_CAPABILITIES if CAPABILITY_NUMBERS[name] <= last)


def _read(path: str) -> str:
    with open(path) as file:
        return file.read()
