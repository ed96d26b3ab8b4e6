"""The containerd runtime's translation of a CRI container (LaunchSpec.linux) into its OCI spec,
the Localhost seccomp profile as runc gets it, and the log relay's URI. No daemon."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from adapter.core.confinement import MASKED_PATHS, oci_seccomp_profile
from adapter.core.errors import InvalidArgument
from adapter.core.limits import Limits
from adapter.core.model import Command, Identity, LaunchSpec, LinuxOptions, Mount, Resources
from adapter.images.image import Descriptor, Image
from adapter.runtimes.containerd import logs
from adapter.runtimes.containerd import spec as oci
from adapter.runtimes.crilog import check_log_file
from adapter.supervisor.oci_seccomp import FIELD, localhost_profile, oci_profile
from adapter.supervisor.seccomp_profile import parse_oci_profile

HOLDER = "/proc/4242/ns"
ROOT = Identity(0, 0, (), "/root")


def _image() -> Image:
    blob = Descriptor("application/octet-stream", "sha256:" + "0" * 64, 1)
    return Image("localhost/x:1", blob, blob, (blob,), (), ("sh",), (), "", "")


def _spec(linux: LinuxOptions, **fields: Any) -> LaunchSpec:
    spec = LaunchSpec(
        container_id="c1",
        command=Command(argv=("sleep", "1")),
        resources=Resources(),
        runtime="containerd",
        sandbox="/sandboxes/c1",
        image="localhost/x:1",
        linux=linux,
    )
    return dataclasses.replace(spec, **fields)


def _document(
    linux: LinuxOptions,
    identity: Identity = ROOT,
    network: oci.Network | None = None,
    localhost: dict[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    return oci.runtime_spec(
        _spec(linux, **fields),
        _image(),
        cgroups_root="ctz",
        limits=Limits(),
        identity=identity,
        network=network,
        localhost_seccomp=localhost,
    )


def test_a_pods_namespaces_are_joined_by_path_and_the_hosts_left_out() -> None:
    linux = LinuxOptions(
        namespaces=(("net", f"{HOLDER}/net"), ("uts", f"{HOLDER}/uts"), ("ipc", "host"))
    )
    document = _document(linux, network=oci.Network(f"{HOLDER}/net"))
    assert document["linux"]["namespaces"] == [
        {"type": "pid"},
        {"type": "uts", "path": f"{HOLDER}/uts"},
        {"type": "mount"},
        {"type": "cgroup"},
        {"type": "network", "path": f"{HOLDER}/net"},
    ]
    assert "hostname" not in document  # the pod's UTS namespace: its hostname is the pod's
    assert _document(LinuxOptions())["hostname"] == "c1"


def test_volumes_propagation_read_only_root_and_the_pods_files() -> None:
    linux = LinuxOptions(
        mounts=(
            Mount("/srv/data", "/data"),
            Mount("/srv/config", "/config", read_only=True, propagation="rslave"),
        ),
        read_only_rootfs=True,
        etc_files=(("/state/pods/p/hosts", "/etc/hosts"),),
    )
    etc = {target: Path(source) for source, target in linux.etc_files}
    document = _document(linux, network=oci.Network(f"{HOLDER}/net", etc_files=etc))
    mounts = {m["destination"]: m for m in document["mounts"]}
    assert mounts["/data"]["options"] == ["rbind", "rprivate", "rw"]
    assert mounts["/config"] == {
        "destination": "/config",
        "type": "bind",
        "source": "/srv/config",
        "options": ["rbind", "rslave", "ro"],
    }
    assert mounts["/etc/hosts"]["source"] == "/state/pods/p/hosts"
    assert "ro" in mounts["/etc/hosts"]["options"]
    assert document["root"] == {"path": "rootfs", "readonly": True}
    assert document["linux"]["rootfsPropagation"] == "rslave"
    shared = LinuxOptions(mounts=(Mount("/srv/a", "/a", propagation="rshared"),))
    assert _document(shared)["linux"]["rootfsPropagation"] == "rshared"
    assert "rootfsPropagation" not in _document(LinuxOptions())["linux"]


def test_identity_groups_home_and_capability_changes() -> None:
    linux = LinuxOptions(capabilities_add=("NET_ADMIN",), capabilities_drop=("CHOWN",))
    process = _document(linux, identity=Identity(0, 5, (7, 8), "/home/app"))["process"]
    assert process["user"] == {"uid": 0, "gid": 5, "additionalGids": [7, 8]}
    assert "HOME=/home/app" in process["env"]
    bounding = process["capabilities"]["bounding"]
    assert "CAP_NET_ADMIN" in bounding and "CAP_CHOWN" not in bounding
    dropped_all = _document(LinuxOptions(capabilities_drop=("ALL",)))["process"]
    assert dropped_all["capabilities"]["bounding"] == []


def test_masked_and_read_only_paths_add_to_ours_unless_privileged() -> None:
    linux = LinuxOptions(masked_paths=("/proc/secret", MASKED_PATHS[0]), readonly_paths=("/x",))
    paths = _document(linux)["linux"]
    assert paths["maskedPaths"] == [*MASKED_PATHS, "/proc/secret"]
    assert paths["readonlyPaths"][-1] == "/x"
    privileged = _document(linux, privileged=True)["linux"]
    assert privileged["maskedPaths"] == privileged["readonlyPaths"] == []


def test_seccomp_default_widened_unconfined_and_localhost() -> None:
    admin = _document(LinuxOptions(capabilities_add=("SYS_ADMIN",)))["linux"]["seccomp"]
    assert "mount" in admin["syscalls"][0]["names"]
    assert admin != oci_seccomp_profile()
    assert "seccomp" not in _document(LinuxOptions(seccomp="unconfined"))["linux"]
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}
    localhost = LinuxOptions(seccomp="localhost/etc/p.json")
    assert _document(localhost, localhost=profile)["linux"]["seccomp"] == profile


def test_a_docker_profile_becomes_plain_oci_rules_for_the_containers_capabilities() -> None:
    docker = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]}],
        "syscalls": [
            {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
            {"name": "mount", "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
            {"names": ["kill"], "action": "SCMP_ACT_ERRNO"},  # the default action: dropped
            {
                "names": ["personality"],
                "action": "SCMP_ACT_ALLOW",
                "args": [
                    {"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                    {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"},
                ],
            },
            {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
        ],
    }
    parsed = parse_oci_profile(docker, field=FIELD, capabilities=("CAP_CHOWN",))
    assert oci_profile(parsed) == {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
        "syscalls": [
            {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
            {
                "names": ["personality"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": 0, "valueTwo": 0, "op": "SCMP_CMP_EQ"}],
            },
            {
                "names": ["personality"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}],
            },
            {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
        ],
    }


async def test_a_bad_localhost_profile_names_the_field(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": 3}')
    with pytest.raises(InvalidArgument) as refused:
        await localhost_profile(str(tmp_path / "p.json"), ())
    assert refused.value.field == FIELD and "syscalls" in str(refused.value)
    with pytest.raises(InvalidArgument):
        await localhost_profile(str(tmp_path / "missing.json"), ())


def test_the_relay_uri_carries_its_arguments_as_containerd_reads_them() -> None:
    uri = logs.relay_uri("/opt/bin/containerizer-supervisor", "/logs/a b&c.log", Path("/run/c1"))
    parts = urlsplit(uri)
    assert (parts.scheme, parts.path) == ("binary", "/opt/bin/containerizer-supervisor")
    assert parse_qs(parts.query) == {
        "--log-relay": ["/logs/a b&c.log"],
        "--pid-file": ["/run/c1/log-relay.pid"],
    }


def test_a_log_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "target").write_text("")
    (tmp_path / "link.log").symlink_to(tmp_path / "target")
    with pytest.raises(InvalidArgument) as refused:
        check_log_file(str(tmp_path / "link.log"))
    assert refused.value.field == "linux.log_path"
    check_log_file(str(tmp_path / "fresh.log"))
    assert (tmp_path / "fresh.log").is_file()
