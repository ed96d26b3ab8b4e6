"""`containerizer compare` end to end: the real command against a real service on the native
runtime (CFS on, so the cpu limit is enforced), and the other runtimes named but not configured.

One compare run (JSON + HTML) is shared by the module's checks: it is the expensive part.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import images_pb2, images_pb2_grpc
from adapter.clients.compare.results import SECTIONS
from adapter.clients.compare.session import OWNER_LABEL
from tests.conftest import BIN, ServiceProcess, require, require_root, serving
from tests.image_fixtures import busybox_oci_tar  # noqa: F401

pytestmark = pytest.mark.integration
ALL_RUNTIMES = "native,containerd,lxc,libvirt,docker"
# LXC needs no daemon, so it runs beside native here; the daemon runtimes are named unconfigured.
CONFIGURED = ("native", "lxc")
NOT_CONFIGURED = ("containerd", "libvirt", "docker")
RUNS = 8
DENSITY = 8
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class CompareRun:
    report: dict[str, Any]
    html: str
    stderr: str


def compare(service: ServiceProcess, *options: str) -> subprocess.CompletedProcess[str]:
    command = [str(BIN / "containerizer"), "compare", "--endpoint", service.endpoint, *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def cfs_service(
    tmp_path_factory: pytest.TempPathFactory,
    busybox_oci_tar: Path,  # noqa: F811
) -> Iterator[ServiceProcess]:
    """A service with CFS on and the busybox image imported: the native runtime runs the same
    workload spec as the image runtimes, in the image's rootfs."""
    require_root()
    require((BIN / "containerizer").exists(), "containerizer not installed")
    service = ServiceProcess(
        tmp_path_factory.mktemp("compare"),
        extra_config="cgroups_enable_cfs = true\n[runtimes.native]\n[runtimes.lxc]",
    )
    service.start()
    channel = grpc.insecure_channel(service.endpoint)
    list(
        images_pb2_grpc.ImagesStub(channel).Import(
            images_pb2.ImportRequest(path=str(busybox_oci_tar))
        )
    )
    channel.close()
    yield service
    with contextlib.suppress(Exception):
        service.destroy_all()
    service.stop()
    service.remove_cgroup_roots()


@pytest.fixture(scope="module")
def compare_run(cfs_service: ServiceProcess) -> CompareRun:
    html_path = cfs_service.workdir / "report.html"
    done = compare(
        cfs_service,
        f"--runtimes={ALL_RUNTIMES}",
        f"--runs={RUNS}",
        f"--density={DENSITY}",
        "--json",
        f"--html={html_path}",
    )
    assert done.returncode == 0, done.stderr
    return CompareRun(json.loads(done.stdout), html_path.read_text(), done.stderr)


def configured_entries(run: CompareRun) -> list[dict[str, Any]]:
    entries = [e for e in run.report["runtimes"] if e["name"] in CONFIGURED]
    assert [e["name"] for e in entries] == list(CONFIGURED)
    return entries


def test_every_section_is_present_for_every_runtime(compare_run: CompareRun) -> None:
    runtimes = compare_run.report["runtimes"]
    assert [entry["name"] for entry in runtimes] == ALL_RUNTIMES.split(",")
    for entry in runtimes:
        assert set(SECTIONS) <= set(entry), entry["name"]
    for entry in configured_entries(compare_run):
        assert entry["available"] and entry["errors"] == {}, entry["name"]
        assert entry["root"] == "image localhost/busybox:latest"  # one spec for every runtime
        assert entry["capabilities"]["oom_detection"] is True


def test_latencies_are_measured_for_every_run(compare_run: CompareRun) -> None:
    for entry in configured_entries(compare_run):
        latency = entry["latency"]
        for kind in ("launch", "lifecycle", "teardown"):
            series = latency[kind]
            assert series["count"] == RUNS and series["failures"] == 0
            assert 0 < series["p50_ms"] <= series["p95_ms"] <= series["p99_ms"] <= series["max_ms"]
        # a lifecycle includes its launch
        assert latency["lifecycle"]["p50_ms"] > latency["launch"]["p50_ms"]


def test_density_launches_all_and_leaves_nothing(
    compare_run: CompareRun, cfs_service: ServiceProcess
) -> None:
    assert cfs_service.process is not None  # the pid SO_PEERCRED must have found
    for entry in configured_entries(compare_run):
        density = entry["density"]
        assert density["launched"] == DENSITY and density["launch_errors"] == []
        assert density["launch_seconds"] > 0 and density["destroy_seconds"] > 0
        assert density["nothing_left"] and density["leftovers"] == []
        assert density["service_rss_with_containers_bytes"] > 0
        assert f"RSS of pid {cfs_service.process.pid}," in density["service_memory_source"]
    # after the whole run: no container, record or cgroup of compare's is left
    listed = cfs_service.stub().Containers(pb.ContainersRequest(), timeout=10).containers
    assert [status.container_id for status in listed] == []
    assert cfs_service.leftover_cgroups() == []


def test_limits_hold(compare_run: CompareRun) -> None:
    for entry in configured_entries(compare_run):
        isolation = entry["isolation"]
        assert isolation["memory"]["verdict"] == "enforced", isolation["memory"]
        assert "LIMITATION_MEMORY" in isolation["memory"]["detail"]
        assert isolation["pids"]["verdict"] == "enforced", isolation["pids"]
        assert isolation["pids"]["measured"] <= isolation["pids"]["expected"] == 32
        # With CFS the loop never gets more than its quota (+25 %); a busy host may give it
        # less, which the report calls "unknown" rather than a pass.
        cpu = isolation["cpu"]
        assert cpu["verdict"] in ("enforced", "unknown"), cpu
        assert cpu["expected"] == 0.5 and 0 < cpu["measured"] <= 0.625


def test_accounting_is_within_tolerance(compare_run: CompareRun) -> None:
    for entry in configured_entries(compare_run):
        accounting = entry["accounting"]
        for check in ("cpu", "memory"):
            assert accounting[check]["within_tolerance"], (entry["name"], accounting[check])
        assert accounting["cpu"]["reference"].startswith("the workload's own rusage")
        assert accounting["memory"]["expected"] == 64 * 1024 * 1024


def test_unconfigured_runtimes_appear_with_their_reason(compare_run: CompareRun) -> None:
    unconfigured = [e for e in compare_run.report["runtimes"] if e["name"] not in CONFIGURED]
    assert [e["name"] for e in unconfigured] == list(NOT_CONFIGURED)
    for entry in unconfigured:
        assert not entry["available"]
        assert entry["reason"] == (
            f"not configured on this node: the service config has no [runtimes.{entry['name']}]"
            " table (configured: lxc, native)"
        )
        assert entry["latency"] is None and entry["isolation"] is None


def test_html_report_embeds_its_charts(compare_run: CompareRun) -> None:
    images = re.findall(
        r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', compare_run.html
    )
    assert len(images) == 4
    assert all(base64.b64decode(image).startswith(PNG_SIGNATURE) for image in images)
    assert "[runtimes.libvirt]" in compare_run.html


def test_progress_goes_to_stderr_as_lines_when_not_a_terminal(compare_run: CompareRun) -> None:
    lines = compare_run.stderr.splitlines()
    assert lines == [
        line
        for name in CONFIGURED
        for line in (
            f"compare: {name}: latency ({RUNS} runs)",
            f"compare: {name}: density ({DENSITY} containers)",
            f"compare: {name}: isolation",
            f"compare: {name}: accounting",
        )
    ]


def test_text_report_and_orphans_of_a_dead_run_are_swept(cfs_service: ServiceProcess) -> None:
    """A container labelled with a compare run that no longer exists is removed by the next."""
    stub = cfs_service.stub()
    orphan = "compare-native-orphan-idle-0"
    stub.Launch(
        pb.LaunchRequest(
            container_id=orphan,
            command=pb.CommandInfo(argv=["/bin/sleep", "600"]),
            labels={OWNER_LABEL: "999999999:1.00"},
        ),
        timeout=30,
    )
    done = compare(cfs_service, "--runtimes=native,docker", "--runs=2", "--density=2")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for title in ("Runtimes", "Latency", "Density", "Isolation", "Accounting", "Capabilities"):
        assert re.search(rf"^{title}", text, re.MULTILINE), title
    assert "docker (unavailable)" in text and "[runtimes.docker]" in text
    listed = stub.Containers(pb.ContainersRequest(), timeout=10).containers
    assert orphan not in [status.container_id for status in listed]
    assert cfs_service.leftover_cgroups() == []


@pytest.fixture(scope="module")
def bare_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A node as a newcomer has it: the native runtime and an empty image store."""
    require_root()
    require((BIN / "containerizer").exists(), "containerizer not installed")
    service = ServiceProcess(
        tmp_path_factory.mktemp("compare-bare"), extra_config="[runtimes.native]"
    )
    yield from serving(service)


def test_compare_on_a_fresh_node_makes_its_image_and_measures(bare_service: ServiceProcess) -> None:
    require(Path("/bin/busybox").is_file(), "/bin/busybox missing: apt-get install busybox-static")
    done = compare(bare_service, "--runtimes=native", "--runs=2", "--density=2", "--json")
    assert done.returncode == 0, done.stderr
    assert (
        "compare: localhost/busybox:latest is not in the image store: building it from this "
        "node's busybox and importing it"
    ) in done.stderr
    report = json.loads(done.stdout)
    (native,) = report["runtimes"]
    assert native["root"] == "image localhost/busybox:latest"
    assert native["errors"] == {} and report["unmeasured"] == []
    with grpc.insecure_channel(bare_service.endpoint) as channel:
        listed = images_pb2_grpc.ImagesStub(channel).List(images_pb2.ListImagesRequest())
    assert [image.reference for image in listed.images] == ["localhost/busybox:latest"]


def test_compare_exits_1_naming_what_no_runtime_measured(bare_service: ServiceProcess) -> None:
    done = compare(
        bare_service, "--runtimes=native,docker", "--image=localhost/absent:1", "--runs=3",
        "--density=2",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1] == (
        "compare: not measured on any runtime: latency, density, isolation.memory, "
        "isolation.cpu, isolation.pids, accounting.cpu, accounting.memory "
        "(the report's errors and reasons say why)"
    )
    assert "localhost/absent:1" in done.stdout  # each section's error names the missing image
    assert "building it" not in done.stderr  # a named image is never replaced by ours
    listed = bare_service.stub().Containers(pb.ContainersRequest(), timeout=10).containers
    assert [status.container_id for status in listed] == []
