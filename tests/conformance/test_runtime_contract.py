"""The runtime contract: what every runtime must do, each behaviour checked through the real
gRPC API of a real service on that runtime (native, lxc, containerd, docker, libvirt), so a new
runtime is held to the same bar by adding it to RUNTIMES and tests/conformance/runtimes.py.

What a runtime genuinely cannot do is declared once, in LACKS below, with the reason; its
parameter is then marked (expected to fail, not run) in that behaviour's test. Where the
runtime's Fingerprint (the Runtimes RPC) has a capability for the behaviour, the declaration
must agree with it (test_the_declared_lacks_are_the_fingerprints).
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from tests.conformance.nodes import (
    READY,
    RUNTIMES,
    Node,
    alive,
    cpu_seconds_of_tree,
    limits_cgroup,
    processes_in,
    wait_for,
    wait_until_ready,
)
from tests.conftest import BIN
from tests.integration.api import destroy, scalar, usage, wait

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
GUEST = "a guest has a kernel of its own"
# (runtime, behaviour) -> why that runtime cannot have it.
LACKS: dict[tuple[str, str], str] = {
    ("libvirt", "oom"): (
        f"{GUEST}: its memory is guest RAM fixed at boot, an allocation past it meets the guest"
        " kernel's OOM killer, not a host cgroup limit (Fingerprint: no oom_detection)"
    ),
    ("libvirt", "pids_limit"): (
        f"{GUEST}: the workload's processes are the guest's, no host pids cgroup counts them"
    ),
    ("libvirt", "update_memory"): f"{GUEST}: guest RAM is fixed at boot",
    ("libvirt", "image_settings"): (
        "runs no image of the store: a guest boots our initramfs, or a configured disk image"
        " (Fingerprint: no images)"
    ),
}
# Behaviour -> the Fingerprint capability that declares it.
FINGERPRINT = {
    "oom": "oom_detection",
    "image_settings": "images",
    "update_cpus": "live_update",
    "recovery": "recover",
}
BEHAVIOURS = (
    "exit_codes", "sigterm", "oom", "pids_limit", "update_cpus", "update_memory", "usage",
    "destroy", "recovery", "missing_binary", "unknown_image", "hostile_input", "image_settings",
    "sandbox_outputs",
)  # fmt: skip
# (runtime, behaviour) -> how that runtime falls short of the contract today: defects, not lacks.
# Each still runs and must fail (strict), so a fix turns its entry into a failure to remove.
# RACY_DEFECTS are the same, for a defect that shows only when a race goes one way: they run, and
# may pass or fail.
KNOWN_DEFECTS: dict[tuple[str, str], str] = {
    ("containerd", "sigterm"): "the workload is pid 1 of its namespace with no init of ours: it"
    " ignores a SIGTERM it has no handler for",
    ("libvirt", "sigterm"): "the guest's init reports the command's 128+15 as an exit code",
    ("docker", "oom"): "an OOM kill of a process other than init leaves the container running;"
    " only an exit is checked for the limitation",
    ("docker", "pids_limit"): "the limit is set on Docker's own cgroup; ours has pids.max 'max'",
    ("containerd", "missing_binary"): "runc's exec failure comes back INTERNAL",
    ("docker", "missing_binary"): "Docker starts the container; it ends EXITED 127",
    ("libvirt", "missing_binary"): "the guest starts; the command ends EXITED 127",
    ("libvirt", "unknown_image"): "an unknown disk image is INVALID_ARGUMENT, not NOT_FOUND",
}
RACY_DEFECTS: dict[tuple[str, str], str] = {
    ("lxc", "pids_limit"): "pids.events is read when the monitor exits, and LXC may have removed"
    " the container's cgroups by then: the limit is reported only when the read wins",
}
assert {b for _, b in LACKS} | {b for _, b in KNOWN_DEFECTS} | {b for _, b in RACY_DEFECTS} | set(
    FINGERPRINT
) <= set(BEHAVIOURS)

Test = TypeVar("Test", bound=Callable[..., None])


def contract(behaviour: str, fixture: str = "node") -> Callable[[Test], Test]:
    """Parametrize a test over every runtime (indirectly, through `fixture`), marking the
    runtimes LACKS declares unable to have `behaviour`."""
    assert behaviour in BEHAVIOURS, behaviour
    params = [
        pytest.param(runtime, id=runtime, marks=_marks(runtime, behaviour)) for runtime in RUNTIMES
    ]
    return pytest.mark.parametrize(fixture, params, indirect=True)


def _marks(runtime: str, behaviour: str) -> list[pytest.MarkDecorator]:
    if (runtime, behaviour) in LACKS:
        return [pytest.mark.xfail(run=False, reason=f"{runtime}: {LACKS[runtime, behaviour]}")]
    if (runtime, behaviour) in KNOWN_DEFECTS:
        reason = f"known defect of {runtime}: {KNOWN_DEFECTS[runtime, behaviour]}"
        return [pytest.mark.xfail(strict=True, reason=reason)]
    if (runtime, behaviour) in RACY_DEFECTS:
        reason = f"racy defect of {runtime}: {RACY_DEFECTS[runtime, behaviour]}"
        return [pytest.mark.xfail(strict=False, reason=reason)]
    return []


def cli_wait(node: Node, container_id: str) -> int:
    """`containerizer wait ID`'s exit status: the workload's own, 128+n for signal n."""
    completed = subprocess.run(
        [str(BIN / "containerizer"), "--endpoint", node.service.endpoint, "wait", container_id],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return completed.returncode


def ended_within(node: Node, container_id: str, seconds: float, after: str) -> pb.Termination:
    """The termination, which must come within `seconds`: a container still running then
    fails the test at once, saying so, rather than holding the suite for a long deadline."""
    try:
        return wait(node.service.stub(), container_id, timeout=seconds)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    status = node.service.stub().Status(pb.StatusRequest(container_id=container_id), timeout=10)
    state = pb.State.Name(status.state)
    raise AssertionError(f"{after}, the container is still {state} {seconds:g} s later")


def sandbox_of(reply: pb.LaunchResponse) -> Path:
    return Path(reply.status.sandbox)


def launch_refused(
    node: Node, container_id: str, shell: str = "", **options: object
) -> grpc.RpcError:
    """The error of a launch that must fail. One that runs instead fails the test, saying how
    the container then ended."""
    try:
        node.launch(container_id, shell, **options)
    except grpc.RpcError as error:
        return error
    ended = ended_within(node, container_id, 60, "after a launch that should have failed")
    reason = pb.Reason.Name(ended.reason)
    raise AssertionError(f"not refused: the container ran and ended {reason}: {ended.message}")


@contract("exit_codes")
def test_exit_codes_reach_wait_and_the_cli(node: Node, container_id: str) -> None:
    stub = node.service.stub()
    zero, three = f"{container_id}-0", f"{container_id}-3"
    node.launch(zero, "exit 0")
    reply = node.launch(three, "echo out; echo err >&2; exit 3")
    ended = wait(stub, zero, timeout=180)
    assert (ended.reason, ended.exit_code, ended.status) == (pb.EXITED, 0, 0), ended.message
    ended = wait(stub, three, timeout=180)
    assert (ended.reason, ended.exit_code, ended.status) == (pb.EXITED, 3, 3 << 8), ended.message
    assert not ended.HasField("signal") and not ended.killed
    assert ended.message == "exited with code 3"
    assert (sandbox_of(reply) / "stdout").read_text() == "out\n"
    assert (sandbox_of(reply) / "stderr").read_text() == "err\n"
    assert (cli_wait(node, zero), cli_wait(node, three)) == (0, 3)


@contract("sigterm")
def test_sigterm_through_kill_ends_with_signal_15(node: Node, container_id: str) -> None:
    stub = node.service.stub()
    reply = node.launch(container_id, f"{READY}; while :; do sleep 0.1; done")
    wait_until_ready(sandbox_of(reply))
    stub.Kill(pb.KillRequest(container_id=container_id, signal=15), timeout=30)
    ended = ended_within(node, container_id, 15, "after Kill with SIGTERM")
    assert ended.reason == pb.EXITED, ended.message
    assert ended.signal == 15 and ended.status == 15, ended.message
    assert not ended.HasField("exit_code")
    assert ended.message == "killed by signal 15 (SIGTERM)"
    assert cli_wait(node, container_id) == 128 + 15


@contract("oom")
def test_out_of_memory_is_a_memory_limitation(node: Node, container_id: str) -> None:
    """`tail /dev/zero` keeps a line that never ends; the shell would sleep on, but a container
    that hit its memory limit is ended (Mesos)."""
    node.launch(container_id, "tail /dev/zero; sleep 600", mem=32)
    ended = ended_within(node, container_id, 15, "after its memory limit was hit")
    assert ended.reason == pb.LIMITATION_MEMORY, ended.message
    assert list(ended.limited_resources) == ["mem"] and ended.killed
    assert "Memory limit exceeded" in ended.message


# Forks 200 sleepers in a subshell that ends at the first refused fork, says so with a file
# (no fork needed), and spins on builtins until the test has looked: then exits 0 by itself.
FORKS = """
( i=0; while [ $i -lt 200 ]; do sleep 60 & i=$((i+1)); done; echo forked-all )
echo > "$MESOS_SANDBOX/forked"
while [ ! -e "$MESOS_SANDBOX/looked" ]; do :; done
"""


@contract("pids_limit")
def test_the_pids_limit_bounds_a_fork_bomb(node: Node, container_id: str) -> None:
    stub = node.service.stub()
    limit = 24
    reply = node.launch(container_id, FORKS, pids=limit)
    sandbox = sandbox_of(reply)
    wait_for(lambda: (sandbox / "forked").exists(), "the forks to end")
    cgroup = limits_cgroup(reply.status.pid, "pids")
    try:
        assert (cgroup / "pids.max").read_text().strip() == str(limit)
        assert len(processes_in(cgroup)) <= limit
        assert usage(stub, container_id).processes <= limit
    finally:
        (sandbox / "looked").touch()
    ended = wait(stub, container_id)
    assert ended.reason == pb.LIMITATION_PIDS, ended.message
    assert list(ended.limited_resources) == ["pids"]
    assert f"pids.max {limit}" in ended.message
    assert "forked-all" not in (sandbox / "stdout").read_text()
    assert node.leftovers(container_id) == []


def cpu_shares(pid: int) -> int:
    return int((limits_cgroup(pid, "cpu") / "cpu.shares").read_text())


def memory_limit(pid: int) -> int:
    return int((limits_cgroup(pid, "memory") / "memory.limit_in_bytes").read_text())


@contract("update_cpus")
def test_cpus_update_live(node: Node, container_id: str) -> None:
    stub = node.service.stub()
    reply = node.launch(container_id, f"{READY}; sleep 600", cpus=0.5, mem=128)
    pid = reply.status.pid
    assert cpu_shares(pid) == 512
    stub.Update(
        pb.UpdateRequest(container_id=container_id, resources=[scalar("cpus", 2)]), timeout=30
    )
    assert cpu_shares(pid) == 2048
    status = stub.Status(pb.StatusRequest(container_id=container_id), timeout=10)
    assert {r.name: r.scalar.value for r in status.resources}["cpus"] == 2
    assert usage(stub, container_id).cpus_limit == 2
    assert destroy(stub, container_id).reason == pb.DESTROYED


@contract("update_memory")
def test_memory_updates_live(node: Node, container_id: str) -> None:
    stub = node.service.stub()
    reply = node.launch(container_id, f"{READY}; sleep 600", mem=64)
    pid = reply.status.pid
    assert memory_limit(pid) == 64 * MIB
    stub.Update(
        pb.UpdateRequest(container_id=container_id, resources=[scalar("mem", 128)]), timeout=30
    )
    assert memory_limit(pid) == 128 * MIB
    status = stub.Status(pb.StatusRequest(container_id=container_id), timeout=10)
    assert {r.name: r.scalar.value for r in status.resources}["mem"] == 128
    assert usage(stub, container_id).mem_limit_bytes == 128 * MIB
    assert destroy(stub, container_id).reason == pb.DESTROYED


@contract("usage")
def test_usage_of_a_busy_loop_is_within_tolerance(node: Node, container_id: str) -> None:
    """Our CPU time against the host's own count for the container's processes over the same
    interval (other tests share the CPUs, so the loop's share of the wall time varies); one
    busy thread cannot use more than one CPU."""
    stub = node.service.stub()
    reply = node.launch(container_id, f"{READY}; while :; do :; done", cpus=1, mem=128)
    wait_until_ready(sandbox_of(reply))
    pid = reply.status.pid
    before, host_before = usage(stub, container_id), cpu_seconds_of_tree(pid)
    time.sleep(1.5)
    after, host_after = usage(stub, container_id), cpu_seconds_of_tree(pid)
    ours = (after.cpus_user_time_secs + after.cpus_system_time_secs) - (
        before.cpus_user_time_secs + before.cpus_system_time_secs
    )
    host = host_after - host_before
    wall = after.timestamp - before.timestamp
    assert host > 0.1, f"the loop got {host:.2f} s of CPU in {wall:.2f} s"
    assert abs(ours - host) <= max(0.15 * host, 0.1), (ours, host)
    assert ours <= 1.1 * wall + 0.05, (ours, wall)
    assert after.mem_rss_bytes > 0
    assert after.mem_limit_bytes == 128 * MIB and after.cpus_limit == 1
    assert after.processes >= 1
    destroy(stub, container_id)


@contract("destroy")
def test_destroy_with_a_stopped_member_leaves_nothing(node: Node, container_id: str) -> None:
    stub = node.service.stub()
    reply = node.launch(container_id, f"sleep 600 & kill -STOP $!; {READY}; sleep 600")
    wait_until_ready(sandbox_of(reply))
    ended = destroy(stub, container_id)
    assert ended.reason == pb.DESTROYED and ended.killed, ended.message
    assert ended.signal == 9, ended.message
    assert node.leftovers(container_id) == []
    assert not alive(reply.status.pid)


@contract("recovery", fixture="fresh_node")
def test_an_exit_during_an_outage_is_reported_and_a_running_one_re_attached(
    fresh_node: Node, container_id: str
) -> None:
    node = fresh_node
    running, exiting = f"{container_id}-runs", f"{container_id}-exits"
    kept = node.launch(running, "sleep 600", mem=128).status.pid
    exits = node.launch(exiting, "sleep 2; exit 7", mem=128).status.pid
    node.service.kill()  # kill -9: nobody of ours watches now
    wait_for(lambda: not alive(exits), "the container to exit while the service is down")
    node.service.start()
    stub = node.service.stub()
    ended = wait(stub, exiting)
    assert (ended.reason, ended.exit_code, ended.status) == (pb.EXITED, 7, 7 << 8), ended.message
    status = stub.Status(pb.StatusRequest(container_id=running), timeout=10)
    assert (status.state, status.pid) == (pb.RUNNING, kept), status.termination.message
    assert usage(stub, running).mem_limit_bytes == 128 * MIB
    ended = destroy(stub, running)
    assert ended.reason == pb.DESTROYED and ended.killed, ended.message
    assert node.leftovers(running) == [] and node.leftovers(exiting) == []
    assert not alive(kept)


@contract("missing_binary")
def test_a_missing_binary_fails_the_launch_and_leaves_nothing(
    node: Node, container_id: str
) -> None:
    stub = node.service.stub()
    error = launch_refused(node, container_id, argv=("/no/such/binary",))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    assert "No such file or directory" in (error.details() or "")
    ended = wait(stub, container_id)
    assert ended.reason == pb.LAUNCH_FAILED, ended.message
    assert node.leftovers(container_id) == []


@contract("unknown_image")
def test_an_unknown_image_fails_the_launch_and_leaves_nothing(
    node: Node, container_id: str
) -> None:
    stub = node.service.stub()
    image = f"localhost/contract-missing-{uuid.uuid4().hex[:8]}:1"
    error = launch_refused(node, container_id, "true", image=image)
    codes = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
    assert error.code() in codes, (error.code(), error.details())
    assert image in (error.details() or "")
    try:
        status = stub.Status(pb.StatusRequest(container_id=container_id), timeout=10)
    except grpc.RpcError as gone:  # refused before any record was made
        assert gone.code() == grpc.StatusCode.NOT_FOUND
    else:
        assert status.termination.reason == pb.LAUNCH_FAILED, status.termination.message
    assert node.leftovers(container_id) == []


HOSTILE_IDS = ["../x", "a/b", "", "x" * 129, "a\x00b", "-x", ".x", "a b", "a\nb", "é"]


@contract("sandbox_outputs")
def test_a_symlinked_output_in_a_reused_sandbox_is_refused(
    node: Node, container_id: str, tmp_path: Path
) -> None:
    """A workload of an earlier launch of this sandbox turned `stdout` into a symlink to a host
    file: no runtime may open it (a shim or QEMU as root would append to the host file)."""
    victim = tmp_path / "victim"
    victim.write_text("host data\n")
    victim.chmod(0o600)
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (sandbox / "stdout").symlink_to(victim)
    with pytest.raises(grpc.RpcError) as refused:
        node.launch(container_id, "echo overwritten", sandbox=str(sandbox))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "stdout" in (refused.value.details() or "")
    assert victim.read_text() == "host data\n"
    assert victim.stat().st_mode & 0o7777 == 0o600
    assert node.leftovers(container_id) == []


@contract("hostile_input")
def test_hostile_ids_are_refused_before_anything_is_made(node: Node) -> None:
    sandboxes = node.service.state_dir / "sandboxes"
    before = set(sandboxes.iterdir()) if sandboxes.exists() else set()
    for hostile in HOSTILE_IDS:
        error = launch_refused(node, hostile, "true")
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (hostile, error.details())
        assert "container_id" in (error.details() or "")
    assert (set(sandboxes.iterdir()) if sandboxes.exists() else set()) == before


def widest_id() -> str:
    """128 characters, every kind the API allows: the longest id a runtime must take."""
    return (f"Z{uuid.uuid4().hex[:8]}" + "._-az09AZ" * 15)[:128]


def hostile_value(marker: str) -> str:
    """Newlines, quotes, command substitutions, format and config syntax: a value that any
    shell, printf or config file on the way would change (or run: it would create `marker`)."""
    return (
        f"line1\nline2 \"double\" 'single' $(touch {marker}) `touch {marker}` ${{HOME}} %s"
        " \\ \t; lxc.mount.entry = /etc etc none bind 0 0 ]]> </domain>"
    )


@contract("hostile_input")
def test_the_widest_id_and_hostile_environment_values_arrive_verbatim(node: Node) -> None:
    """One launch (a guest boot) for both: the longest id of every allowed character, and
    values that must reach the workload byte for byte."""
    stub = node.service.stub()
    container_id = widest_id()
    marker = f"/tmp/ctz-contract-pwned-{uuid.uuid4().hex[:8]}"
    environment = {"HOSTILE": hostile_value(marker), "EQUALS": "a=b=c", "EMPTY": ""}
    script = f'printf "%s|" "$HOSTILE" "$EQUALS" "$EMPTY"; [ ! -e {marker} ]'
    reply = node.launch(container_id, script, environment=environment)
    ended = wait(stub, container_id, timeout=180)
    assert (ended.reason, ended.exit_code) == (pb.EXITED, 0), ended.message  # nothing ran it
    stdout = (sandbox_of(reply) / "stdout").read_text()
    assert stdout == f"{environment['HOSTILE']}|a=b=c||"
    assert not Path(marker).exists()  # nor on the host
    destroy(stub, container_id)
    assert node.leftovers(container_id) == []


@contract("image_settings")
def test_the_images_settings_apply_and_the_requests_win(node: Node, container_id: str) -> None:
    stub = node.service.stub()
    image = node.settings_image
    own = node.launch(container_id, image=image)  # no command: the image's Entrypoint + Cmd
    ended = wait(stub, container_id)
    assert (ended.reason, ended.exit_code) == (pb.EXITED, 0), ended.message
    assert (sandbox_of(own) / "stdout").read_text() == "from-image\n/srv\n65534\n"

    overridden = f"{container_id}-request"
    reply = node.launch(
        overridden,
        'echo "$GREETING|$PATH|$(pwd)|$(id -u)"',
        image=image,
        environment={"GREETING": "from-request"},
        working_dir="/tmp",
        user="root",
    )
    ended = wait(stub, overridden)
    assert (ended.reason, ended.exit_code) == (pb.EXITED, 0), ended.message
    assert (sandbox_of(reply) / "stdout").read_text() == "from-request|/bin|/tmp|0\n"


@pytest.mark.parametrize("node", [pytest.param(r, id=r) for r in RUNTIMES], indirect=True)
def test_the_declared_lacks_are_the_fingerprints(node: Node) -> None:
    runtimes = node.service.stub().Runtimes(pb.RuntimesRequest(), timeout=60).runtimes
    (info,) = [runtime for runtime in runtimes if runtime.name == node.runtime]
    assert info.healthy, info.message
    declared = {
        capability: (node.runtime, behaviour) not in LACKS
        for behaviour, capability in FINGERPRINT.items()
    }
    reported = {capability: getattr(info.capabilities, capability) for capability in declared}
    assert reported == declared
