"""The observability parts without a service: the event ring and a slow reader's missed count,
the metrics collector and listener, sd_notify, log formats, completion, metrics_listen."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from adapter.clients.cli.main import main as cli_main
from adapter.core.config import parse_config
from adapter.core.errors import ConfigError
from adapter.core.events import Event, EventHub, Missed
from adapter.core.model import Command, LaunchSpec, Reason, Resources, State, Termination
from adapter.core.state import ContainerRecord
from adapter.server import sd_notify
from adapter.server.containers import to_event
from adapter.server.metrics import (
    ContainerCollector,
    ContainerSample,
    ServiceMetrics,
    kubernetes_pod_labels,
)
from adapter.server.metrics_http import MetricsEndpoint
from adapter.server.service_log import JsonFormatter, TextFormatter, log_transition


def event(container_id: str, state: State = State.RUNNING, at: float = 1.0) -> Event:
    return Event(at, container_id, state, runtime="native")


async def take(stream: object, count: int) -> list[Event | Missed]:
    taken = []
    for _ in range(count):
        taken.append(await asyncio.wait_for(stream.__anext__(), 2))  # type: ignore[attr-defined]
    return taken


async def test_a_slow_reader_is_told_how_many_it_missed() -> None:
    hub = EventHub(ring=100, reader_queue=3)
    stream = hub.follow()
    first = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)  # the reader is subscribed, waiting
    for number in range(10):
        hub.publish(event(f"c{number}"))
    assert await first == event("c0")
    # c0..c2 fitted its queue of 3; c3..c9 did not: one notice where they would have been.
    assert await take(stream, 3) == [event("c1"), event("c2"), Missed(7)]
    hub.publish(event("after"))
    assert await take(stream, 1) == [event("after")]
    await stream.aclose()
    assert to_event(Missed(7)).missed == 7 and not to_event(Missed(7)).container_id


async def test_since_replays_the_kept_events_then_follows() -> None:
    hub = EventHub(ring=3)
    for number in range(5):
        hub.publish(event(f"c{number}", at=float(number)))
    stream = hub.follow(since=3.0)
    assert await take(stream, 1) == [event("c3", at=3.0)]
    assert await take(stream, 1) == [event("c4", at=4.0)]
    hub.publish(event("c5", at=5.0))
    assert await take(stream, 1) == [event("c5", at=5.0)]
    await stream.aclose()
    only_c1 = hub.follow(container_id="c1", since=0.0)  # c1 has left the ring of 3
    hub.publish(event("c1", State.TERMINATED, at=6.0))
    assert await take(only_c1, 1) == [event("c1", State.TERMINATED, at=6.0)]
    await only_c1.aclose()


def record(container_id: str, *, labels: tuple[tuple[str, str], ...] = ()) -> ContainerRecord:
    spec = LaunchSpec(
        container_id=container_id,
        command=Command(shell="true"),
        resources=Resources(),
        runtime="native",
        sandbox="/nonexistent",
        image="busybox",
        labels=labels,
    )
    return ContainerRecord(spec=spec, state=State.RUNNING, launched_at=100.0, handle={})


def test_collector_writes_cadvisor_names_and_labels() -> None:
    pod = (("io.kubernetes.pod.name", "web"), ("io.kubernetes.pod.namespace", "prod"))
    stats = {
        "cpus_user_time_secs": 1.5,
        "cpus_system_time_secs": 0.5,
        "mem_total_bytes": 1000,
        "mem_inactive_file_bytes": 300,
        "net_rx_bytes": 7,
    }
    samples = [ContainerSample(record("a", labels=pod), stats), ContainerSample(record("b"), None)]
    text = generate_latest(ContainerCollector(samples, kubernetes_pod_labels)).decode()
    families = {f.name: f.samples for f in text_string_to_metric_families(text)}
    [cpu] = families["container_cpu_usage_seconds"]
    assert cpu.name == "container_cpu_usage_seconds_total" and cpu.value == 2.0
    assert cpu.labels == {
        "id": "a", "runtime": "native", "image": "busybox", "pod": "web", "namespace": "prod"
    }  # fmt: skip
    assert families["container_memory_working_set_bytes"][0].value == 700
    assert families["container_spec_memory_limit_bytes"][0].value == 0  # unlimited
    assert families["container_network_receive_bytes"][0].value == 7
    # b has no usage (not running): only what its record says.
    assert {s.labels["id"] for s in families["container_start_time_seconds"]} == {"a", "b"}
    assert not families["container_memory_usage_bytes"][1:]


def test_collector_text_is_what_prometheus_client_writes() -> None:
    """The fast writer against prometheus_client's own, parsed back by its parser; label
    values that need escaping included."""
    odd = (("io.kubernetes.pod.name", 'we"b\\1\nx'), ("io.kubernetes.pod.namespace", "p"))
    stats = {"cpus_user_time_secs": 0.25, "mem_total_bytes": 4096, "mem_limit_bytes": 1 << 30}
    done = record("c").evolve(
        state=State.TERMINATED, termination=Termination(reason=Reason.LIMITATION_MEMORY)
    )
    samples = [
        ContainerSample(record("a", labels=odd), stats),
        ContainerSample(record("b"), {"mem_total_bytes": 1}),
        ContainerSample(done, None),
    ]
    collector = ContainerCollector(samples, kubernetes_pod_labels)

    def parsed(text: str) -> list[tuple[str, list[tuple[str, dict[str, str], float]]]]:
        return [
            (f.name, [(s.name, s.labels, s.value) for s in f.samples])
            for f in text_string_to_metric_families(text)
        ]

    assert parsed(collector.text().decode()) == parsed(generate_latest(collector).decode())
    ooms = {f.name: f for f in text_string_to_metric_families(collector.text().decode())}
    assert [s.value for s in ooms["container_oom_events"].samples] == [0, 0, 1]


def test_service_metrics_follow_the_transitions() -> None:
    metrics = ServiceMetrics()
    metrics.observe(Event(10.0, "a", State.LAUNCHING, runtime="native"))
    metrics.observe(Event(10.5, "a", State.RUNNING, runtime="native"))
    metrics.observe(Event(11.0, "a", State.DESTROYING, runtime="native"))
    destroyed = Termination(reason=Reason.DESTROYED, finished_at=12.0)
    metrics.observe(Event(12.0, "a", State.TERMINATED, destroyed, runtime="native"))
    failed = Termination(reason=Reason.LAUNCH_FAILED, finished_at=13.0)
    metrics.observe(Event(13.0, "b", State.LAUNCHING, runtime="lxc"))
    metrics.observe(Event(13.0, "b", State.TERMINATED, failed, runtime="lxc"))
    value = metrics.registry.get_sample_value
    assert value("containerizer_launches_total", {"runtime": "native", "outcome": "success"}) == 1
    assert value("containerizer_launches_total", {"runtime": "lxc", "outcome": "failure"}) == 1
    assert value("containerizer_destroys_total", {"runtime": "native", "outcome": "destroyed"}) == 1
    assert value("containerizer_launch_duration_seconds_sum", {"runtime": "native"}) == 0.5


async def http_get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    reply = await reader.read()
    writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_healthz_is_503_until_ready_and_metrics_are_served() -> None:
    async def scrape() -> bytes:
        return b"up 1\n"

    endpoint = MetricsEndpoint(scrape)
    address = await endpoint.start("127.0.0.1:0")
    port = int(address.rpartition(":")[2])
    try:
        assert (await http_get(port, "/healthz"))[0] == 503
        endpoint.ready = True
        assert await http_get(port, "/healthz") == (200, b"ok\n")
        assert await http_get(port, "/metrics") == (200, b"up 1\n")
        assert await http_get(port, "/metrics", "HEAD") == (200, b"")
        assert (await http_get(port, "/metrics", "POST"))[0] == 405
        assert (await http_get(port, "/other"))[0] == 404
    finally:
        await endpoint.close()


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_sends_a_datagram(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abstract: bool
) -> None:
    name = f"@ctz-notify-{os.getpid()}" if abstract else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name[1:] if abstract else name)
        listener.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        assert sd_notify.notify("READY=1")
        assert listener.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify.notify("READY=1")


def format_transition(formatter: logging.Formatter) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("containerizer.lifecycle")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        termination = Termination(reason=Reason.EXITED, message="exited with code 3")
        log_transition(Event(1.0, "c1", State.TERMINATED, termination, runtime="lxc"))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return stream.getvalue()


def test_transitions_log_one_line_as_json_or_text() -> None:
    line = json.loads(format_transition(JsonFormatter()))
    assert line["container_id"] == "c1" and line["runtime"] == "lxc"
    assert line["state"] == "TERMINATED" and line["reason"] == "EXITED"
    assert line["message"] == "container c1 TERMINATED: exited with code 3"
    text = format_transition(TextFormatter())
    assert text.count("\n") == 1 and "container_id=c1 runtime=lxc" in text


def test_metrics_listen_must_be_loopback() -> None:
    assert parse_config({"metrics_listen": "[::1]:9101"}).metrics_listen == "[::1]:9101"
    with pytest.raises(ConfigError, match="metrics_listen: expected a loopback"):
        parse_config({"metrics_listen": "0.0.0.0:9101"})
    with pytest.raises(ConfigError, match="log_format"):
        parse_config({"log_format": "xml"})


def completion_script(shell: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    assert cli_main(["completion", shell]) == 0
    script = tmp_path / f"completion.{shell}"
    script.write_text(capsys.readouterr().out)
    return script


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script_parses(
    shell: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = completion_script(shell, tmp_path, capsys)
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_completion_offers_nested_subcommands_and_choices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = completion_script("bash", tmp_path, capsys)

    def offered(*words: str) -> list[str]:
        probe = (
            f"source {script}; COMP_WORDS=(containerizer {' '.join(words)});"
            f' COMP_CWORD={len(words)}; _containerizer_complete; echo "${{COMPREPLY[@]}}"'
        )
        return subprocess.run(["bash", "-c", probe], capture_output=True, text=True).stdout.split()

    assert offered("images", "pu") == ["pull"]
    assert offered("run", "--network", "b") == ["bridge"]
    assert "--since" in offered("events", "--")
    assert offered("ev") == ["events"]


def test_text_lines_are_logging_s_own_format_with_the_fields() -> None:
    """TextFormatter formats each second's date once; its lines are still the stock
    formatter's, in every second and with a traceback, then the fields."""
    stock = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    ours = TextFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        failure = sys.exc_info()
    for created in (1_700_000_000.25, 1_700_000_000.999, 1_700_000_001.0, 1_699_999_999.5):
        for exc_info in (None, failure):
            attributes = {"msg": "container %s", "args": ("c1",), "exc_info": exc_info}
            attributes["created"] = created
            attributes["msecs"] = int((created - int(created)) * 1000) + 0.0
            expected = stock.format(logging.makeLogRecord(attributes))
            assert ours.format(logging.makeLogRecord(attributes)) == expected
    with_fields = logging.makeLogRecord({"msg": "m", "container_id": "c1", "created": 5.5})
    assert ours.format(with_fields).endswith(": m container_id=c1")
