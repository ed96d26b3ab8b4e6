"""The supervisor's options for what a CRI container asks (adapter/supervisor/launch_config.py):
its identity as numbers, namespaces joined or shared, sysctls, propagation, read-only root."""

from __future__ import annotations

import pytest

from adapter.core.errors import InvalidArgument
from adapter.core.model import Identity, Mount
from adapter.supervisor.launch_config import Enforcement, Filesystem, LaunchConfig

PRIVILEGED = Enforcement(privileged=True)


def words(config: LaunchConfig) -> list[str]:
    """The options before `--`, as strings."""
    encoded = config.encode().split(b"\0")
    return [word.decode() for word in encoded[: encoded.index(b"--")]]


def config(**options: object) -> LaunchConfig:
    return LaunchConfig("s", "box", ["true"], PRIVILEGED, **options)  # type: ignore[arg-type]


def after(option: str, encoded: list[str]) -> list[str]:
    return [encoded[i + 1] for i, word in enumerate(encoded) if word == option]


def test_identity_is_numbers_and_sets_home_unless_given() -> None:
    identity = Identity(1000, 50, (1, 29), "/home/web")
    encoded = words(config(identity=identity))
    start = encoded.index("--uid")
    assert encoded[start : start + 6] == ["--uid", "1000", "--gid", "50", "--groups", "1,29"]
    assert after("--env", encoded) == ["HOME=/home/web"]
    given = words(config(identity=identity, env=[("HOME", "/srv")]))
    assert after("--env", given) == ["HOME=/srv"]


def test_no_groups_is_an_empty_list_and_no_identity_no_option() -> None:
    assert after("--groups", words(config(identity=Identity(5, 5)))) == [""]
    assert "--uid" not in words(config())


def test_namespaces_joined_or_the_hosts() -> None:
    joined = (("ipc", "/proc/7/ns/ipc"), ("uts", "host"), ("pid", "/proc/7/ns/pid"))
    assert after("--ns", words(config(namespaces_joined=joined))) == [
        "ipc=/proc/7/ns/ipc",
        "uts=host",
        "pid=/proc/7/ns/pid",
    ]


@pytest.mark.parametrize(
    ("joined", "namespaces", "words_"),
    [
        ((("net", "/proc/7/ns/net"),), True, "'net' is not one of"),
        ((("ipc", "proc/7/ns/ipc"),), True, "neither an absolute path nor host"),
        ((("ipc", "host"), ("ipc", "/x")), True, "named twice"),
        ((("pid", "host"),), False, "needs namespaces"),
    ],
)
def test_namespaces_that_cannot_be_joined(
    joined: tuple[tuple[str, str], ...], namespaces: bool, words_: str
) -> None:
    with pytest.raises(InvalidArgument, match=words_) as refused:
        config(namespaces_joined=joined, namespaces=namespaces).encode()
    assert refused.value.field == "linux.namespaces"


def test_namespaced_sysctls_are_passed() -> None:
    sysctls = (("kernel.shm_rmid_forced", "1"), ("fs.mqueue.msg_max", "20"), ("kernel.sem", "1 2"))
    sysctls += (("net.ipv4.ip_forward", "1"),)
    encoded = words(config(sysctls=sysctls, netns="/run/netns/c1"))
    assert after("--sysctl", encoded) == [
        "kernel.shm_rmid_forced=1",
        "fs.mqueue.msg_max=20",
        "kernel.sem=1 2",
        "net.ipv4.ip_forward=1",
    ]


@pytest.mark.parametrize(
    ("key", "options", "reason"),
    [
        ("kernel.domainname", {}, "not namespaced"),
        ("vm.overcommit_memory", {}, "not namespaced"),
        ("kernel.semmni", {}, "not namespaced"),
        ("net.ipv4.ip_forward", {}, "host's network"),  # no netns: the host's
        ("kernel.shmmax", {"namespaces_joined": (("ipc", "host"),)}, "host's ipc"),
        ("kernel.shmmax", {"namespaces": False}, "host's ipc"),
        ("net.ipv4.ip_forward", {"netns": "/run/netns/c", "namespaces": False}, "host's network"),
        ("kernel..shmmax", {}, "not a sysctl name"),
        ("kernel/shmmax", {}, "not a sysctl name"),
        ("net", {}, "not a sysctl name"),
        ("Net.ipv4.ip_forward", {}, "not a sysctl name"),
    ],
)
def test_sysctls_that_would_reach_the_host_are_refused(
    key: str, options: dict[str, object], reason: str
) -> None:
    with pytest.raises(InvalidArgument, match=reason) as refused:
        config(sysctls=((key, "1"),), **options).encode()
    assert refused.value.field == "linux.sysctls"


def test_seccomp_off_is_length_zero() -> None:
    unconfined = Enforcement(capabilities=0x5, seccomp_bpf=b"")
    encoded = words(LaunchConfig("s", "box", ["true"], unconfined))
    assert after("--seccomp", encoded) == ["0"]


def test_mounts_carry_read_only_and_propagation() -> None:
    mounts = (
        Mount("/a", "/in/a"),
        Mount("/b", "/in/b", read_only=True, propagation="rslave"),
        Mount("/c", "/in/c", propagation="rshared"),
    )
    filesystem = Filesystem("/lower", "/dir", mounts=mounts, read_only_root=True)
    assert filesystem.options() == [
        "--rootfs-lower", "/lower", "--rootfs-dir", "/dir", "--read-only-root",
        "--bind", "/a", "--to", "/in/a",
        "--bind", "/b", "--to", "/in/b", "--read-only", "--propagation", "rslave",
        "--bind", "/c", "--to", "/in/c", "--propagation", "rshared",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("filesystem", "field"),
    [
        (Filesystem(mounts=(Mount("/a", "/b", propagation="shared"),)), "linux.mounts"),
        (Filesystem(mounts=(Mount("/a", "relative"),)), "linux.mounts"),
        (Filesystem(read_only_root=True), "linux.read_only_rootfs"),
    ],
)
def test_filesystems_the_supervisor_would_refuse(filesystem: Filesystem, field: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        filesystem.options()
    assert refused.value.field == field
