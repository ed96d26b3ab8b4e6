"""The user namespace allocator and its [user_namespace] config table, without a kernel."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from adapter.clients.cli.main import build_parser
from adapter.clients.cli.run import launch_request
from adapter.core.config import parse_config
from adapter.core.containerizer import Containerizer
from adapter.core.errors import ConfigError, FailedPrecondition
from adapter.core.model import (
    HOST_NAMESPACE,
    Capabilities,
    Fingerprint,
    IdMapping,
    LaunchSpec,
    LinuxOptions,
)
from adapter.core.state import StateStore
from adapter.core.userns import (
    IdRangeAllocator,
    own_id_mapping,
    parse_id_range,
    subordinate_ranges,
)
from adapter.cri.api import cri
from adapter.cri.pods import pod_user_namespace
from adapter.runtimes.base import Launched
from adapter.runtimes.containerd.remap import shift_owners
from adapter.runtimes.lxc import userns as lxc_userns
from adapter.runtimes.lxc.config import LxcConfig
from adapter.runtimes.lxc.linux import set_namespaces
from adapter.supervisor.launch_config import Enforcement, LaunchConfig
from tests.conftest import searchable_by_all
from tests.unit.test_core import FakeDriver, make_spec

SUBUID = """\
alice:100000:65536
containerizer:200000:131072
# a comment, then a line that is no range
containerizer:nope:5
containerizer:1000000:70000
"""


def test_subordinate_ranges_are_the_users_own_in_file_order() -> None:
    assert subordinate_ranges(SUBUID, "containerizer") == [(200000, 131072), (1000000, 70000)]
    assert subordinate_ranges(SUBUID, "bob") == []


def test_a_range_never_starts_at_host_root() -> None:
    assert parse_id_range("0:65536") is None
    assert parse_id_range("100000:0") is None
    assert parse_id_range("4294967295:2") is None
    assert parse_id_range("100000:65536") == (100000, 65536)


def test_user_ranges_give_whole_blocks_paired_uid_with_gid(tmp_path: Path) -> None:
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text(SUBUID)
    subgid.write_text("containerizer:300000:65536\ncontainerizer:500000:65536\n")
    config = parse_config({"user_namespace": {"user": "containerizer"}})
    allocator = IdRangeAllocator.of(config.user_namespace, subuid=subuid, subgid=subgid)
    assert allocator is not None
    # uids: two blocks in 200000:131072, one in 1000000:70000; gids: two blocks.
    assert allocator.capacity == 2
    assert allocator.allocate("a") == IdMapping(200000, 300000, 65536)
    assert allocator.allocate("b") == IdMapping(265536, 500000, 65536)


def test_a_user_without_a_whole_block_is_refused_at_start(tmp_path: Path) -> None:
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("containerizer:200000:1000\n")
    subgid.write_text("containerizer:200000:1000\n")
    config = parse_config({"user_namespace": {"user": "containerizer"}}, Path("/etc/n.toml"))
    with pytest.raises(ConfigError, match=r"user_namespace\.user: .* no block"):
        IdRangeAllocator.of(config.user_namespace, "/etc/n.toml", subuid, subgid)


def test_allocations_are_disjoint_and_exhaustion_names_the_key() -> None:
    allocator = IdRangeAllocator([(100000, 3 * 65536)], [(100000, 3 * 65536)], 65536)
    mappings = [allocator.allocate(f"c{i}") for i in range(3)]
    starts = sorted(mapping.uid_start for mapping in mappings)
    assert starts == [100000, 165536, 231072]
    assert allocator.allocate("c1") == mappings[1]  # the one it holds
    with pytest.raises(FailedPrecondition, match="user_namespace: all 3 ranges"):
        allocator.allocate("c3")


def test_a_released_range_is_handed_out_again() -> None:
    allocator = IdRangeAllocator([(100000, 2 * 65536)], [(100000, 2 * 65536)], 65536)
    first = allocator.allocate("a")
    allocator.allocate("b")
    allocator.release("a")
    assert allocator.allocate("c") == first


def test_recovered_ranges_stay_held_even_off_todays_slots() -> None:
    """After a restart the checkpointed ranges are reserved before anything is launched; one
    a changed config no longer has still keeps its ids from new containers."""
    allocator = IdRangeAllocator([(100000, 4 * 65536)], [(100000, 4 * 65536)], 65536)
    allocator.reserve("live", IdMapping(100000, 100000, 65536))
    allocator.reserve("old-config", IdMapping(200000, 200000, 65536))  # overlaps slots 1 and 2
    assert allocator.allocate("new") == IdMapping(296608, 296608, 65536)
    assert set(allocator.held()) == {"live", "old-config", "new"}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"default": True}, "needs host ids to map"),
        ({"user": "a", "range": "100000:65536"}, "user or range, not both"),
        ({"range": "0:65536"}, "user_namespace.range: expected"),
        ({"range": "100000:1000"}, "fewer ids than user_namespace.size"),
        ({"size": 0}, "user_namespace.size: expected"),
        ({"size": True}, "user_namespace.size: expected"),
        ({"users": "a"}, "user_namespace.users: unknown key"),
    ],
)
def test_bad_tables_are_refused_naming_the_key(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"user_namespace": table})


def test_the_mapping_round_trips_through_a_checkpoint() -> None:
    spec = LaunchSpec.from_json(
        {
            "container_id": "c",
            "command": {
                "shell": "true",
                "argv": [],
                "environment": [],
                "user": None,
                "working_dir": None,
            },
            "resources": {},
            "runtime": "native",
            "sandbox": "/s",
            "image": None,
            "labels": [],
            "user_namespace": True,
            "id_mapping": {"uid_start": 100000, "gid_start": 200000, "size": 65536},
        }
    )
    assert spec.id_mapping == IdMapping(100000, 200000, 65536)
    assert LaunchSpec.from_json(spec.to_json()) == spec
    old = spec.to_json()
    del old["user_namespace"], old["id_mapping"]  # a checkpoint from before the fields
    assert LaunchSpec.from_json(old).id_mapping is None


def test_owners_move_into_the_range_links_not_followed(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "tool").write_text("x")
    (tmp_path / "bin" / "tool").chmod(0o4755)
    (tmp_path / "link").symlink_to("/etc/passwd")
    outside = Path("/etc/passwd").stat()
    shift_owners(tmp_path, IdMapping(100000, 200000, 65536))
    tool = (tmp_path / "bin" / "tool").stat()
    assert (tool.st_uid, tool.st_gid, tool.st_mode & 0o7777) == (100000, 200000, 0o4755)
    assert (tmp_path / "link").lstat().st_uid == 100000
    assert Path("/etc/passwd").stat().st_uid == outside.st_uid


class UsernsDriver(FakeDriver):
    """The fake runtime, declaring user namespaces and keeping the specs it got."""

    def __init__(self) -> None:
        super().__init__()
        self.specs: dict[str, LaunchSpec] = {}

    async def fingerprint(self) -> Fingerprint:
        return Fingerprint(self.name, "1", True, capabilities=Capabilities(user_namespace=True))

    async def start(self, spec: LaunchSpec) -> Launched:
        self.specs[spec.container_id] = spec
        return await super().start(spec)


def node(tmp_path: Path, *, default: bool = False) -> tuple[Containerizer, UsernsDriver]:
    driver = UsernsDriver()
    allocator = IdRangeAllocator([(100000, 2 * 65536)], [(100000, 2 * 65536)], 65536)
    core = Containerizer(
        {"native": driver, "libvirt": VmDriver()},
        StateStore(tmp_path / "state.db"),
        default_runtime="native",
        user_namespaces=allocator,
        user_namespace_default=default,
    )
    return core, driver


class VmDriver(FakeDriver):
    name = "libvirt"


def spec(cid: str, tmp_path: Path, **fields: object) -> LaunchSpec:
    return replace(make_spec(cid, tmp_path), **fields)  # type: ignore[arg-type]


async def test_the_core_allocates_checkpoints_and_releases(tmp_path: Path) -> None:
    core, driver = node(tmp_path)
    await core.recover()
    launched = await core.launch(spec("a", tmp_path, user_namespace=True))
    assert launched.spec.id_mapping == IdMapping(100000, 100000, 65536)
    assert driver.specs["a"].id_mapping == launched.spec.id_mapping
    plain = await core.launch(spec("plain", tmp_path))
    assert plain.spec.id_mapping is None  # the node's default: none
    await core.destroy("a")
    assert core.user_namespaces is not None and "a" not in core.user_namespaces.held()
    await core.close()


async def test_a_restart_keeps_the_live_ranges(tmp_path: Path) -> None:
    core, _ = node(tmp_path, default=True)
    await core.recover()
    first = await core.launch(spec("a", tmp_path))
    await core.close()  # as after kill -9: the record is all that is left
    core, _ = node(tmp_path, default=True)
    await core.recover()
    second = await core.launch(spec("b", tmp_path))
    assert first.spec.id_mapping is not None and second.spec.id_mapping is not None
    assert first.spec.id_mapping.uid_start != second.spec.id_mapping.uid_start
    with pytest.raises(FailedPrecondition, match="user_namespace: all 2 ranges"):
        await core.launch(spec("c", tmp_path))
    await core.close()


async def test_a_joined_range_stays_held_after_its_holder_ends(tmp_path: Path) -> None:
    """A pod's container in its holder's namespace keeps the range when the holder ends
    first, and across a restart: no new launch gets a range still in use."""
    core, _ = node(tmp_path)
    await core.recover()
    holder = await core.launch(spec("holder", tmp_path, user_namespace=True))
    shared = holder.spec.id_mapping
    await core.launch(spec("member", tmp_path, id_mapping=shared))
    await core.destroy("holder")
    other = await core.launch(spec("other", tmp_path, user_namespace=True))
    assert shared is not None and other.spec.id_mapping is not None
    assert other.spec.id_mapping.uid_start != shared.uid_start
    await core.close()  # as after kill -9: the records are all that is left
    core, _ = node(tmp_path)
    await core.recover()
    with pytest.raises(FailedPrecondition, match="user_namespace: all 2 ranges"):
        await core.launch(spec("third", tmp_path, user_namespace=True))
    await core.destroy("member")
    await core.destroy("other")
    again = await core.launch(spec("again", tmp_path, user_namespace=True))
    assert again.spec.id_mapping == shared  # the last one of its users ended: free again
    await core.close()


async def test_runtimes_without_them_refuse_or_pass_the_default_by(tmp_path: Path) -> None:
    core, _ = node(tmp_path, default=True)
    await core.recover()
    with pytest.raises(FailedPrecondition, match="user_namespace: runtime 'libvirt'"):
        await core.launch(spec("vm", tmp_path, runtime="libvirt", user_namespace=True))
    record = await core.launch(spec("vm2", tmp_path, runtime="libvirt"))
    assert record.spec.id_mapping is None
    assert any("user_namespace" in warning for warning in record.warnings)
    await core.close()


async def test_a_privileged_container_is_host_root(tmp_path: Path) -> None:
    core, _ = node(tmp_path, default=True)
    core.allow_privileged = True
    await core.recover()
    record = await core.launch(spec("p", tmp_path, privileged=True))
    assert record.spec.id_mapping is None
    with pytest.raises(FailedPrecondition, match="user_namespace: a privileged container"):
        await core.launch(spec("q", tmp_path, privileged=True, user_namespace=True))
    await core.close()


def test_the_supervisor_is_told_the_mapping_or_the_pods_namespace() -> None:
    def words(config: LaunchConfig) -> list[str]:
        return [part.decode() for part in config.encode().split(b"\0") if part]

    own = LaunchConfig(
        "s", "box", ["true"], Enforcement(privileged=True), id_mapping=IdMapping(7, 9, 65536)
    )
    assert "--userns" in words(own)
    assert words(own)[words(own).index("--userns") + 1] == "7:9:65536"
    pods = LaunchConfig(
        "s", "box", ["true"], Enforcement(privileged=True), namespaces_joined=(("user", "/p"),)
    )
    assert "user=/p" in words(pods) and "--userns" not in words(pods)


def test_a_pods_container_joins_instead_of_making_one(tmp_path: Path) -> None:
    mapping = IdMapping(100000, 100000, 65536)
    alone = spec("a", tmp_path, id_mapping=mapping)
    in_pod = replace(alone, linux=LinuxOptions(namespaces=(("user", "/proc/9/ns/user"),)))
    assert own_id_mapping(alone) == mapping
    assert own_id_mapping(in_pod) is None


@pytest.mark.parametrize(
    ("flags", "asked"), [([], None), (["--userns"], True), (["--no-userns"], False)]
)
def test_run_asks_for_a_user_namespace_or_leaves_it_to_the_node(
    flags: list[str], asked: bool | None
) -> None:
    args = build_parser().parse_args(["run", *flags, "--", "true"])
    request = launch_request(args)
    assert (request.user_namespace if request.HasField("user_namespace") else None) == asked


def pod_asking(mode: int | None) -> cri.PodSandboxConfig:
    config = cri.PodSandboxConfig()
    if mode is not None:
        options = config.linux.security_context.namespace_options
        options.userns_options.mode = mode  # type: ignore[assignment]
    return config


def test_a_pod_on_a_runtime_that_cannot_join_gets_no_user_namespace() -> None:
    """The node's default passes such a pod by; a pod asking for one is refused."""
    cannot_join = Capabilities(pods=True, user_namespace=True, no_pod_user_namespace=True)
    assert pod_user_namespace(pod_asking(None), cannot_join) is False
    assert pod_user_namespace(pod_asking(cri.NODE), cannot_join) is False
    with pytest.raises(FailedPrecondition, match=r"userns_options\.mode: POD: this runtime"):
        pod_user_namespace(pod_asking(cri.POD), cannot_join)
    joins = Capabilities(pods=True, user_namespace=True)
    assert pod_user_namespace(pod_asking(None), joins) is None  # the node's default
    assert pod_user_namespace(pod_asking(cri.POD), joins) is True


def test_lxc_keeps_no_host_user_namespace_beside_its_own(tmp_path: Path) -> None:
    """`lxc.namespace.keep` is a deny list that names the user namespace unless the launch
    has one of its own (lxc.idmap); joining a pod's is refused, saying why."""
    kept = LinuxOptions(namespaces=(("net", HOST_NAMESPACE),))
    plain, mapped = LxcConfig(), LxcConfig()
    set_namespaces(plain, spec("a", tmp_path, linux=kept))
    set_namespaces(mapped, spec("a", tmp_path, linux=kept, id_mapping=IdMapping(7, 7, 65536)))
    assert plain.get("lxc.namespace.keep") == ["user net"]
    assert mapped.get("lxc.namespace.keep") == ["net"]
    joined = LinuxOptions(namespaces=(("user", "/proc/9/ns/user"),))
    with pytest.raises(FailedPrecondition, match="cannot join its pod's user namespace"):
        set_namespaces(LxcConfig(), spec("b", tmp_path, linux=joined))


def test_lxc_needs_every_directory_above_searchable(tmp_path: Path) -> None:
    searchable_by_all(tmp_path)  # pytest's are 0700, up to /tmp
    closed = tmp_path / "closed"
    (closed / "inner").mkdir(parents=True)
    closed.chmod(0o700)
    assert not lxc_userns.searchable_by_all(closed / "inner")
    closed.chmod(0o711)
    assert lxc_userns.searchable_by_all(closed / "inner" / "not-yet-made")


def test_lxc_unmounts_nothing_where_nothing_is_mounted(tmp_path: Path) -> None:
    lxc_userns.unmount_all(tmp_path)  # no mounts directory: nothing to do
    (tmp_path / lxc_userns.MOUNTS / "layer-0").mkdir(parents=True)
    lxc_userns.unmount_all(tmp_path)  # a mount point with nothing mounted is passed by
    assert (tmp_path / lxc_userns.MOUNTS / "layer-0").is_dir()


class PodlessUsernsDriver(UsernsDriver):
    """User namespaces of its own, but none beside a pod's namespaces (LXC's)."""

    async def fingerprint(self) -> Fingerprint:
        capabilities = Capabilities(user_namespace=True, no_pod_user_namespace=True)
        return Fingerprint(self.name, "1", True, capabilities=capabilities)


async def test_a_runtime_without_them_in_pods_gets_none_beside_a_pods_namespaces(
    tmp_path: Path,
) -> None:
    core, _ = node(tmp_path, default=True)
    core.drivers["native"] = PodlessUsernsDriver()
    await core.recover()
    in_pod = LinuxOptions(namespaces=(("net", "/proc/9/ns/net"),))
    record = await core.launch(spec("member", tmp_path, linux=in_pod))
    assert record.spec.id_mapping is None
    assert any("does not apply" in warning for warning in record.warnings)
    with pytest.raises(FailedPrecondition, match="beside the namespaces the launch joins"):
        await core.launch(spec("asking", tmp_path, linux=in_pod, user_namespace=True))
    alone = await core.launch(spec("alone", tmp_path))
    assert alone.spec.id_mapping is not None
    await core.close()
