"""The containerd driver's pure parts: id mapping, exit statuses, the OCI spec, chain ids, error
mapping, and the stub build's import rewriting. No daemon."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from adapter.core.confinement import (
    ALL_CAPABILITIES,
    DEFAULT_CAPABILITIES,
    MASKED_PATHS,
    READONLY_PATHS,
    held_capabilities,
    oci_seccomp_profile,
)
from adapter.core.errors import (
    AlreadyExists,
    ContainerizerError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from adapter.core.limits import Limits
from adapter.core.model import Command, Identity, LaunchSpec, Resources
from adapter.images.image import Descriptor, Image
from adapter.runtimes.containerd import spec as oci
from adapter.runtimes.containerd.client import ContainerdClient
from adapter.runtimes.containerd.content import chain_ids
from adapter.runtimes.containerd.handle import (
    CONTAINERD_ID,
    CONTAINERD_ID_MAX,
    ContainerdHandle,
    containerd_id,
)
from adapter.runtimes.containerd.task import exit_from_status
from isolators.cgroups.cpu import cpu_shares

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "protos"))
import build_containerd


@pytest.mark.parametrize("ours", ["web-1", "a.b_c-9", "A1"])
def test_ids_containerd_accepts_are_kept(ours: str) -> None:
    assert containerd_id(ours) == ours


@pytest.mark.parametrize("ours", ["a--b", "x.", "a_-b", "x" * 77, "trailing-"])
def test_other_ids_map_to_a_stable_valid_containerd_id(ours: str) -> None:
    mapped = containerd_id(ours)
    assert CONTAINERD_ID.fullmatch(mapped) and len(mapped) <= CONTAINERD_ID_MAX
    assert mapped == containerd_id(ours) != containerd_id(ours + "0")


def test_handle_round_trips_through_json() -> None:
    handle = ContainerdHandle.for_container("a--b", "ns", "overlayfs")
    data = json.loads(json.dumps(handle.to_json()))
    assert ContainerdHandle.from_json("a--b", data) == handle
    assert handle.snapshot_key == handle.lease_id == handle.containerd_id


@pytest.mark.parametrize(
    ("status", "exit_code", "signal"),
    [
        (0, 0, None),
        (3, 3, None),
        (128, 128, None),
        (137, 9, None),
        (143, 15, None),
        (255, 255, None),
    ],
)
def test_exit_status_follows_the_shims_128_plus_signal(
    status: int, exit_code: int, signal: int | None
) -> None:
    exit_ = exit_from_status(status)
    if status in (137, 143):
        assert exit_.signal == exit_code and exit_.exit_code is None
    else:
        assert exit_.exit_code == exit_code and exit_.signal is signal


def test_chain_ids_follow_the_image_spec() -> None:
    a, b, c = ("sha256:" + hashlib.sha256(x).hexdigest() for x in (b"a", b"b", b"c"))
    chain = chain_ids((a, b, c))
    assert chain[0] == a
    assert chain[1] == "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    assert chain[2] == "sha256:" + hashlib.sha256(f"{chain[1]} {c}".encode()).hexdigest()


def _image(env: tuple[tuple[str, str], ...] = (), working_dir: str = "") -> Image:
    blob = Descriptor("application/octet-stream", "sha256:" + "0" * 64, 1)
    return Image("localhost/x:1", blob, blob, (blob,), (), ("sh",), env, working_dir, "")


def _launch_spec(**resources: float) -> LaunchSpec:
    return LaunchSpec(
        container_id="web-1",
        command=Command(shell="echo hi", environment=(("GREETING", "a=b c"), ("HOME", "/x"))),
        resources=Resources(**resources),  # type: ignore[arg-type]
        runtime="containerd",
        sandbox="/var/lib/containerizer/sandboxes/web-1",
    )


def test_runtime_spec_carries_the_request() -> None:
    image = _image(env=(("PATH", "/bin"), ("HOME", "/root")), working_dir="/srv")
    spec = _launch_spec(cpus=0.5, mem_mib=16, pids=7)
    document = oci.runtime_spec(
        spec,
        image,
        cgroups_root="containerizer",
        limits=Limits.of(spec.resources, enable_cfs=True),
        identity=Identity(65534, 65534),
    )
    process = document["process"]
    assert process["args"] == ["/bin/sh", "-c", "echo hi"]
    assert process["env"] == [
        "PATH=/bin",
        "HOME=/x",
        "GREETING=a=b c",
        "MESOS_SANDBOX=/mnt/mesos/sandbox",
    ]
    assert process["cwd"] == "/srv" and process["user"] == {"uid": 65534, "gid": 65534}
    linux = document["linux"]
    assert linux["cgroupsPath"] == "/containerizer/web-1"
    namespaces = {n["type"] for n in linux["namespaces"]}
    assert namespaces == {"pid", "ipc", "uts", "mount", "network", "cgroup"}
    resources = linux["resources"]
    assert resources["cpu"] == {"shares": cpu_shares(0.5), "quota": 50_000, "period": 100_000}
    assert resources["memory"] == {"limit": 32 * 1024 * 1024, "reservation": 32 * 1024 * 1024}
    assert resources["pids"] == {"limit": 7}
    sandbox = [m for m in document["mounts"] if m["destination"] == oci.SANDBOX_PATH]
    assert sandbox == [
        {
            "destination": "/mnt/mesos/sandbox",
            "type": "bind",
            "source": "/var/lib/containerizer/sandboxes/web-1",
            "options": ["rbind", "rw"],
        }
    ]
    assert json.loads(oci.encode(document)) == document


def test_unrequested_resources_stay_unlimited_and_cfs_is_optional() -> None:
    assert oci.linux_resources(Limits.of(Resources(), enable_cfs=True)) == {}
    no_cfs = Limits.of(Resources(cpus=0.001), enable_cfs=False)
    assert oci.linux_resources(no_cfs) == {"cpu": {"shares": 2}}


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.ALREADY_EXISTS, AlreadyExists),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.UNKNOWN, ContainerizerError),
    ],
)
async def test_containerd_status_codes_map_to_our_classes(
    code: grpc.StatusCode, error: type[ContainerizerError]
) -> None:
    client = ContainerdClient("/run/nowhere.sock", "ns")
    try:
        rpc_error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "boom")
        mapped = client.error(rpc_error, "create task x")
    finally:
        await client.close()
    assert type(mapped) is error
    assert "create task x" in str(mapped)
    if error is Unavailable:
        assert "/run/nowhere.sock" in str(mapped)


def test_stub_build_maps_go_import_paths_under_our_package() -> None:
    text = (
        'import "github.com/containerd/containerd/api/types/mount.proto";\n'
        ' import weak "gogoproto/gogo.proto";\n'
        'import "google/protobuf/any.proto";\n'
    )
    rewritten, found = build_containerd.rewrite_imports(text)
    assert 'import "adapter/api/containerd/types/mount.proto";' in rewritten
    assert 'import weak "adapter/api/containerd/gogoproto/gogo.proto";' in rewritten
    assert 'import "google/protobuf/any.proto";' in rewritten
    assert found == [
        "github.com/containerd/containerd/api/types/mount.proto",
        "gogoproto/gogo.proto",
    ]
    with pytest.raises(SystemExit):
        build_containerd.staged_path("github.com/unknown/thing.proto")


# ---- confinement in the OCI spec ----


ROOT = Identity()


def _confined(
    user: Identity = ROOT, held: tuple[str, ...] | None = None, **flags: bool
) -> dict[str, Any]:
    spec = dataclasses.replace(_launch_spec(), **flags)
    return oci.runtime_spec(
        spec, _image(), cgroups_root="ctz", limits=Limits(), identity=user, held=held
    )


def _mount_at(document: dict[str, Any], destination: str) -> dict[str, Any]:
    (mount,) = [m for m in document["mounts"] if m["destination"] == destination]
    return mount  # type: ignore[no-any-return]


def test_root_holds_the_default_set_and_everything_else_is_confined() -> None:
    document = _confined()
    process, linux = document["process"], document["linux"]
    default = list(DEFAULT_CAPABILITIES)
    assert process["capabilities"] == {
        "bounding": default,
        "effective": default,
        "permitted": default,
        "inheritable": default,
    }  # and no ambient set
    assert process["noNewPrivileges"] is False  # root: only on request, as Docker
    assert linux["seccomp"] == oci_seccomp_profile()
    assert linux["maskedPaths"] == list(MASKED_PATHS)
    assert linux["readonlyPaths"] == list(READONLY_PATHS)
    assert {"type": "cgroup"} in linux["namespaces"]
    assert linux["resources"]["devices"] == [{"allow": False, "access": "rwm"}]
    assert "devices" not in linux  # /dev holds the runtime's default devices only
    assert _mount_at(document, "/sys")["options"] == ["nosuid", "noexec", "nodev", "ro"]
    assert _mount_at(document, "/sys/fs/cgroup") == {
        "destination": "/sys/fs/cgroup",
        "type": "cgroup",
        "source": "cgroup",
        "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
    }
    assert _mount_at(document, "/dev")["type"] == "tmpfs"


def test_any_other_user_holds_nothing_and_gets_no_new_privs() -> None:
    process = _confined(user=Identity(65534, 65534))["process"]
    assert process["capabilities"] == {
        "bounding": list(DEFAULT_CAPABILITIES),
        "effective": [],
        "permitted": [],
        "inheritable": [],
    }
    assert process["noNewPrivileges"] is True
    assert _confined(no_new_privileges=True)["process"]["noNewPrivileges"] is True


def test_privileged_turns_the_confinement_off_within_what_the_node_holds() -> None:
    held = tuple(name for name in ALL_CAPABILITIES if name != "CAP_SYS_RESOURCE")
    document = _confined(privileged=True, held=held)
    linux = document["linux"]
    assert document["process"]["capabilities"]["effective"] == list(held)
    assert document["process"]["capabilities"]["bounding"] == list(held)
    assert "seccomp" not in linux and linux["maskedPaths"] == linux["readonlyPaths"] == []
    assert linux["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    assert "rw" in _mount_at(document, "/sys")["options"]
    assert "rw" in _mount_at(document, "/sys/fs/cgroup")["options"]
    assert document["process"]["noNewPrivileges"] is False


def test_held_capabilities_come_from_the_bounding_set() -> None:
    status = "Name:\tx\nCapBnd:\t000001fffeffffff\n"
    held = held_capabilities(status)
    assert "CAP_SYS_RESOURCE" not in held and "CAP_SYS_ADMIN" in held and len(held) == 40
    assert held_capabilities("Name:\tx\n") == ALL_CAPABILITIES


def test_an_empty_command_runs_the_images_entrypoint_and_cmd() -> None:
    spec = dataclasses.replace(_launch_spec(), command=Command())
    image = dataclasses.replace(_image(), entrypoint=("/bin/app",), cmd=("serve", "-v"))
    document = oci.runtime_spec(
        spec, image, cgroups_root="ctz", limits=Limits(), identity=Identity()
    )
    assert document["process"]["args"] == ["/bin/app", "serve", "-v"]
    bare = dataclasses.replace(image, entrypoint=(), cmd=())
    with pytest.raises(InvalidArgument) as refused:
        oci.runtime_spec(spec, bare, cgroups_root="ctz", limits=Limits(), identity=Identity())
    assert refused.value.field == "command"
