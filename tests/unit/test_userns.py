"""The user namespace allocator and its [user_namespace] config table, without a kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter.core.config import parse_config
from adapter.core.errors import ConfigError, FailedPrecondition
from adapter.core.model import IdMapping, LaunchSpec
from adapter.core.userns import IdRangeAllocator, parse_id_range, subordinate_ranges
from adapter.runtimes.containerd.remap import shift_owners

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
