"""What the operator's tools see of a real service: /metrics parsed back by prometheus_client's
own parser and checked against the cgroup files, /healthz, the events CLI with --since, JSON
log lines, and systemd's READY=1 / STOPPING=1 on a socket of the test's own."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from tests.conftest import CGROUP_MOUNT, ServiceProcess, require_root
from tests.integration.api import launch, wait
from tests.integration.test_security_edge import free_port

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
USER_HZ = os.sysconf("SC_CLK_TCK")
# Burns a little CPU, holds a few MiB of page cache, then sleeps: its counters settle.
WORKLOAD = (
    "i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done;"
    " head -c 4m /dev/zero > /tmp/cache-$$; exec sleep 600"
)


@dataclass
class ObservedService:
    service: ServiceProcess
    metrics_url: str
    notify: socket.socket

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.metrics_url + path, timeout=10) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def scrape(self) -> dict[str, list[Sample]]:
        status, text = self.get("/metrics")
        assert status == 200
        return {family.name: family.samples for family in text_string_to_metric_families(text)}

    def log_lines(self) -> list[dict[str, object]]:
        lines = self.service.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.fixture
def observed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ObservedService]:
    """A service of the test's own with metrics on a free loopback port, JSON logs, and
    NOTIFY_SOCKET set to a datagram socket the test reads."""
    require_root()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(20)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    port = free_port()
    process = ServiceProcess(
        tmp_path, f'metrics_listen = "127.0.0.1:{port}"\nlog_format = "json"\n'
    )
    process.start()
    try:
        yield ObservedService(process, f"http://127.0.0.1:{port}", notify)
    finally:
        with contextlib.suppress(Exception):
            if process.process and process.process.poll() is None:
                process.destroy_all()
        process.stop()
        process.remove_cgroup_roots()
        notify.close()


def labelled(samples: list[Sample], container_id: str, name: str | None = None) -> float:
    found = [
        s.value
        for s in samples
        if s.labels.get("id") == container_id and (name is None or s.name == name)
    ]
    assert len(found) == 1, (container_id, name, samples)
    return found[0]


def cgroup(service: ServiceProcess, controller: str, container_id: str) -> Path:
    return CGROUP_MOUNT / controller / service.cgroups_root / container_id


def kv(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}


def cgroup_reading(service: ServiceProcess, container_id: str) -> dict[str, float]:
    memory = cgroup(service, "memory", container_id)
    usage = int((memory / "memory.usage_in_bytes").read_text())
    ticks = kv(cgroup(service, "cpuacct", container_id) / "cpuacct.stat")
    inactive_file = kv(memory / "memory.stat")["total_inactive_file"]
    return {
        "cpu": (ticks["user"] + ticks["system"]) / USER_HZ,
        "usage": usage,
        "working_set": usage - inactive_file,
        "limit": int((memory / "memory.limit_in_bytes").read_text()),
    }


def test_metrics_match_the_cgroup_files(observed: ObservedService) -> None:
    service = observed.service
    stub = service.stub()
    ids = ["metrics-a", "metrics-b"]
    for cid in ids:
        launch(stub, cid, WORKLOAD, mem=64, cpus=0.5)
    time.sleep(1.5)  # the loop and the write are done; the counters settle
    before = {cid: cgroup_reading(service, cid) for cid in ids}
    families = observed.scrape()
    after = {cid: cgroup_reading(service, cid) for cid in ids}
    for cid in ids:
        low, high = before[cid], after[cid]
        cpu = labelled(families["container_cpu_usage_seconds"], cid)
        assert low["cpu"] <= cpu <= high["cpu"] and cpu > 0
        usage = labelled(families["container_memory_usage_bytes"], cid)
        assert min(low["usage"], high["usage"]) - 65536 <= usage
        assert usage <= max(low["usage"], high["usage"]) + 65536
        working_set = labelled(families["container_memory_working_set_bytes"], cid)
        assert abs(working_set - high["working_set"]) <= 65536 + abs(
            high["working_set"] - low["working_set"]
        )
        limit = labelled(families["container_spec_memory_limit_bytes"], cid)
        assert limit == high["limit"] == 64 << 20
        labels = next(
            s.labels for s in families["container_memory_usage_bytes"] if s.labels["id"] == cid
        )
        assert labels == {"id": cid, "runtime": "native", "image": "", "pod": "", "namespace": ""}
    launches = families["containerizer_launches"]
    assert labelled_service(launches, runtime="native", outcome="success") >= 2
    durations = families["containerizer_launch_duration_seconds"]
    assert labelled_service(durations, name="containerizer_launch_duration_seconds_count") >= 2
    assert labelled_service(families["containerizer_recoveries"]) == 1
    rpc = families["containerizer_rpc_duration_seconds"]
    assert (
        labelled_service(rpc, name="containerizer_rpc_duration_seconds_count", method="Launch") >= 2
    )


def labelled_service(samples: list[Sample], name: str | None = None, **labels: str) -> float:
    """Sum of the samples named `name` (default: the _total or plain one) with these labels."""
    values = [
        s.value
        for s in samples
        if ((name is None and not s.name.endswith("_created")) or s.name == name)
        and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert values, (name, labels, samples)
    return sum(values)


def test_oom_kill_counted(observed: ObservedService) -> None:
    stub = observed.service.stub()
    launch(stub, "metrics-oom", "head -c 200m /dev/zero | tail > /dev/null; sleep 300", mem=32)
    assert wait(stub, "metrics-oom").reason == pb.LIMITATION_MEMORY
    families = observed.scrape()
    assert labelled(families["container_oom_events"], "metrics-oom") == 1


def test_healthz_ready_and_systemd_notified(observed: ObservedService) -> None:
    assert observed.get("/healthz") == (200, "ok\n")
    assert observed.get("/nothing")[0] == 404
    assert observed.notify.recv(4096) == b"READY=1"
    observed.service.stop()
    assert observed.notify.recv(4096) == b"STOPPING=1"


def test_lifecycle_and_rpc_errors_logged_as_json(observed: ObservedService) -> None:
    stub = observed.service.stub()
    launch(stub, "logged", "exit 3")
    wait(stub, "logged")
    with pytest.raises(grpc.RpcError):
        stub.Status(pb.StatusRequest(container_id="not-there"), timeout=10)
    # The error's line is written once the call has ended, which its client may see first.
    deadline = time.monotonic() + 10
    while not any(line.get("rpc") == "Status" for line in observed.log_lines()):
        assert time.monotonic() < deadline, "no log line for the failed Status call"
        time.sleep(0.05)
    lines = observed.log_lines()
    transitions = [line for line in lines if line.get("container_id") == "logged"]
    assert [line["state"] for line in transitions][:2] == ["LAUNCHING", "RUNNING"]
    assert transitions[-1]["state"] == "TERMINATED" and transitions[-1]["reason"] == "EXITED"
    assert {line["runtime"] for line in transitions} == {"native"}
    errors = [line for line in lines if line.get("rpc") == "Status"]
    assert errors and errors[0]["code"] == "NOT_FOUND"
    assert errors[0]["container_id"] == "not-there" and errors[0]["level"] == "WARNING"


def test_events_cli_replays_since_as_json(observed: ObservedService) -> None:
    service = observed.service
    stub = service.stub()
    launch(stub, "evented", "exit 0")
    wait(stub, "evented")
    launch(stub, "other", "exit 0")
    wait(stub, "other")
    events = subprocess.Popen(
        [
            *(str(BIN / "containerizer"), "--endpoint", service.endpoint, "events", "--json"),
            *("--since", "10m", "--filter", "id=evented,state=RUNNING,state=TERMINATED"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert events.stdout is not None
        lines = [json.loads(events.stdout.readline())]
        while lines[-1]["state"] != "TERMINATED":
            lines.append(json.loads(events.stdout.readline()))
    finally:
        events.terminate()
        events.communicate(timeout=10)  # and closes its stdout
    # RUNNING, RUNNING with the exit recorded (cleanup under way), TERMINATED: only its own.
    assert [line["state"] for line in lines] == ["RUNNING", "RUNNING", "TERMINATED"]
    assert {(line["container_id"], line["runtime"]) for line in lines} == {("evented", "native")}
    assert lines[-1]["termination"]["reason"] == "EXITED"


def test_events_since_over_grpc_and_bad_since(observed: ObservedService) -> None:
    stub = observed.service.stub()
    started = time.time()
    launch(stub, "replayed", "exit 0")
    wait(stub, "replayed")
    stream = stub.Events(pb.EventsRequest(container_id="replayed", since=started), timeout=10)
    states = []
    for event in stream:
        states.append(event.state)
        if event.state == pb.TERMINATED:
            break
    stream.cancel()
    assert states[:2] == [pb.LAUNCHING, pb.RUNNING] and states[-1] == pb.TERMINATED
    with pytest.raises(grpc.RpcError) as refused:
        next(iter(stub.Events(pb.EventsRequest(since=float("inf")), timeout=10)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
