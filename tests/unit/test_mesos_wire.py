"""Wire compatibility: our containerizer.v1 messages and our Mesos description agree byte for byte.

`usage` answers with the service's ResourceStatistics bytes as a mesos.ResourceStatistics, and the
service's Value/Resource are Mesos-shaped: these tests prove the numbers and types line up by
serializing one and parsing it as the other, field by field.
"""

from __future__ import annotations

import pytest
from google.protobuf import unknown_fields

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.mesos import containerizer_pb2 as ecp
from adapter.api.mesos import mesos_pb2 as mesos
from adapter.clients.mesos import translate

# Every field of containerizer.v1.ResourceStatistics, each with a value that is distinct and
# does not survive a wrong wire type or number (large integers, non-integral doubles).
STATISTICS = {
    "timestamp": 1_700_000_000.25,
    "processes": 7,
    "threads": 19,
    "cpus_user_time_secs": 12.5,
    "cpus_system_time_secs": 3.75,
    "cpus_limit": 1.5,
    "cpus_nr_periods": 1001,
    "cpus_nr_throttled": 17,
    "cpus_throttled_time_secs": 0.125,
    "mem_total_bytes": 3 * 2**30 + 1,
    "mem_total_memsw_bytes": 3 * 2**30 + 2,
    "mem_limit_bytes": 4 * 2**30,
    "mem_soft_limit_bytes": 2 * 2**30 + 3,
    "mem_file_bytes": 5 * 2**20 + 4,
    "mem_anon_bytes": 6 * 2**20 + 5,
    "mem_cache_bytes": 7 * 2**20 + 6,
    "mem_rss_bytes": 8 * 2**20 + 7,
    "mem_mapped_file_bytes": 9 * 2**20 + 8,
    "mem_swap_bytes": 10 * 2**20 + 9,
    "mem_unevictable_bytes": 11 * 2**20 + 10,
    "disk_limit_bytes": 2**40 + 11,
    "disk_used_bytes": 2**33 + 12,
    "net_rx_packets": 2**35 + 13,
    "net_rx_bytes": 2**36 + 14,
    "net_rx_errors": 15,
    "net_rx_dropped": 16,
    "net_tx_packets": 2**37 + 17,
    "net_tx_bytes": 2**38 + 18,
    "net_tx_errors": 19,
    "net_tx_dropped": 20,
}


def test_statistics_cover_every_field_of_ours() -> None:
    ours = {field.name for field in pb.ResourceStatistics.DESCRIPTOR.fields}
    assert ours == set(STATISTICS)


def test_our_statistics_parse_as_mesos_resource_statistics_field_by_field() -> None:
    payload = pb.ResourceStatistics(**STATISTICS).SerializeToString()
    theirs = mesos.ResourceStatistics.FromString(payload)
    # Every byte landed in a declared field: a wrong number or wire type would be "unknown".
    assert len(unknown_fields.UnknownFieldSet(theirs)) == 0
    for name, value in STATISTICS.items():
        assert theirs.HasField(name), name
        assert getattr(theirs, name) == value, name


@pytest.mark.parametrize("name", [n for n in STATISTICS if n != "timestamp"])
def test_a_measured_zero_is_sent(name: str) -> None:
    # proto2 optional semantics: a zero that was measured reaches Mesos as a zero, not absent.
    payload = pb.ResourceStatistics(timestamp=1.0, **{name: 0}).SerializeToString()
    assert mesos.ResourceStatistics.FromString(payload).HasField(name)


def test_field_numbers_and_types_match_declaration_by_declaration() -> None:
    theirs = mesos.ResourceStatistics.DESCRIPTOR.fields_by_name
    for field in pb.ResourceStatistics.DESCRIPTOR.fields:
        assert theirs[field.name].number == field.number, field.name
        assert theirs[field.name].type == field.type, field.name


def test_mesos_refuses_statistics_without_timestamp() -> None:
    # Why statistics_bytes() fills one in: Mesos declares it required.
    payload = pb.ResourceStatistics(cpus_limit=1.0).SerializeToString()
    assert not mesos.ResourceStatistics.FromString(payload).IsInitialized()
    assert mesos.ResourceStatistics.FromString(
        pb.ResourceStatistics(timestamp=1.0).SerializeToString()
    ).IsInitialized()


def test_mesos_resources_parse_as_ours() -> None:
    theirs = mesos.Resource(name="ports", type=mesos.Value.RANGES)
    theirs.ranges.range.add(begin=31000, end=32000)
    ours = pb.Resource.FromString(theirs.SerializeToString())
    assert (ours.name, ours.type) == ("ports", pb.Value.RANGES)
    assert (ours.ranges.range[0].begin, ours.ranges.range[0].end) == (31000, 32000)
    cpus = mesos.Resource(name="cpus", type=mesos.Value.SCALAR)
    cpus.scalar.value = 0.5
    assert pb.Resource.FromString(cpus.SerializeToString()).scalar.value == 0.5


def test_launch_field_numbers_are_mesos_ones() -> None:
    # include/mesos/containerizer/containerizer.proto (0.19-0.27).
    numbers = {f.name: f.number for f in ecp.Launch.DESCRIPTOR.fields}
    assert numbers == {
        "container_id": 1,
        "task_info": 2,
        "executor_info": 3,
        "directory": 4,
        "user": 5,
        "slave_id": 6,
        "slave_pid": 7,
        "checkpoint": 8,
    }
    termination = {f.name: f.number for f in ecp.Termination.DESCRIPTOR.fields}
    assert termination == {"killed": 1, "message": 2, "status": 3}


def test_termination_bytes_match_a_hand_encoded_mesos_termination() -> None:
    reply = ecp.Termination(killed=False, message="", status=768)
    # field 1 varint 0, field 2 empty string, field 3 varint 768.
    assert reply.SerializeToString() == b"\x08\x00\x12\x00\x18\x80\x06"


def test_launch_from_the_mesos_documentation_hexdump_parses() -> None:
    # The first bytes of the External Containerizer page's example Launch: container_id.
    prefix = bytes.fromhex("0a260a24") + b"435253ab-d246-47be-a350-35420465d868"
    launch = ecp.Launch.FromString(prefix)
    assert launch.container_id.value == "435253ab-d246-47be-a350-35420465d868"


# ---- the statistics the service's ECP socket sends back for `usage` ----


def test_usage_statistics_are_the_statistics_bytes() -> None:
    statistics = pb.ResourceStatistics(**STATISTICS)
    payload = translate.usage_statistics(statistics, now=1.0)
    assert payload == statistics.SerializeToString()
    assert mesos.ResourceStatistics.FromString(payload).timestamp == STATISTICS["timestamp"]


def test_statistics_without_timestamp_get_one() -> None:
    statistics = pb.ResourceStatistics(cpus_limit=0.5, mem_limit_bytes=0)
    theirs = mesos.ResourceStatistics.FromString(translate.usage_statistics(statistics, 1234.5))
    assert theirs.IsInitialized()
    assert (theirs.timestamp, theirs.cpus_limit) == (1234.5, 0.5)
    assert theirs.HasField("mem_limit_bytes") and theirs.mem_limit_bytes == 0
    assert statistics.timestamp == 0  # the service's own message is left as it was


def test_empty_statistics_still_give_valid_mesos_statistics() -> None:
    theirs = mesos.ResourceStatistics.FromString(
        translate.usage_statistics(pb.ResourceStatistics(), now=1.0)
    )
    assert theirs.IsInitialized() and theirs.timestamp == 1.0
