"""The lifecycle state machine, termination policy and recovery, against a fake runtime."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from adapter.core import termination as termination_module
from adapter.core.containerizer import Containerizer
from adapter.core.errors import AlreadyExists, FailedPrecondition, LaunchFailed, NotFound
from adapter.core.model import (
    Command,
    Exit,
    Fingerprint,
    LaunchSpec,
    Reason,
    Resources,
    State,
    Statistics,
    Termination,
)
from adapter.core.state import ContainerRecord, StateStore
from adapter.runtimes.base import Checkpointed, Launched


class FakeDriver:
    """Containers 'run' until the test finishes them or kill_all kills them."""

    name = "native"

    def __init__(self) -> None:
        self.exits: dict[str, asyncio.Future[Exit]] = {}
        self.destroyed: list[str] = []  # cleaned up
        self.killed_all: list[str] = []
        self.calls: list[tuple[str, str]] = []  # (verb, container id), in order
        self.updated: list[Resources] = []
        self.recovered: list[tuple[list[Checkpointed], set[str]]] = []
        self.fail_launch = False
        # How kill_all ends a container (a test may note a limit the container had hit); None:
        # the kill leaves no exit to report.
        self.kill_exit: Exit | None = Exit(signal=9)
        # Like every runtime: once cleaned up, a container is no longer known to wait.
        self.forgets_destroyed = False

    async def fingerprint(self) -> Fingerprint:
        return Fingerprint(self.name, "1", True)

    async def start(self, spec: LaunchSpec) -> Launched:
        self.calls.append(("start", spec.container_id))
        if self.fail_launch:
            raise LaunchFailed("no such binary")
        self.exits[spec.container_id] = asyncio.get_running_loop().create_future()
        return Launched(handle={"fake": spec.container_id}, pid=4242)

    def finish(self, cid: str, exit_: Exit) -> None:
        self.exits[cid].set_result(exit_)

    async def wait(self, container_id: str) -> Exit:
        if container_id not in self.exits:
            return Exit(lost=True, message="unknown")
        exit_ = await self.exits[container_id]
        self.calls.append(("exit", container_id))
        return exit_

    async def signal(self, container_id: str, signal: int) -> None:
        self.finish(container_id, Exit(signal=signal))

    async def kill_all(self, container_id: str) -> None:
        self.calls.append(("kill_all", container_id))
        self.killed_all.append(container_id)
        future = self.exits.get(container_id)
        if future is not None and not future.done() and self.kill_exit is not None:
            future.set_result(self.kill_exit)

    async def cleanup(self, container_id: str) -> None:
        self.calls.append(("cleanup", container_id))
        self.destroyed.append(container_id)
        if self.forgets_destroyed:
            self.exits.pop(container_id, None)

    async def update(self, container_id: str, resources: Resources) -> None:
        self.updated.append(resources)

    async def usage(self, container_id: str) -> Statistics:
        return {"cpus_user_time_secs": 1.5}

    async def recover(self, checkpointed: list[Checkpointed], known_ids: set[str]) -> None:
        self.recovered.append((checkpointed, known_ids))
        for entry in checkpointed:
            self.exits[entry.spec.container_id] = asyncio.get_running_loop().create_future()

    async def close(self) -> None:
        pass


def make_spec(cid: str, tmp_path: Path) -> LaunchSpec:
    return LaunchSpec(
        container_id=cid,
        command=Command(shell="true"),
        resources=Resources(cpus=1, mem_mib=64),
        runtime="native",
        sandbox=str(tmp_path / "sandboxes" / cid),
    )


@pytest.fixture
async def core(tmp_path: Path):  # type: ignore[no-untyped-def]
    driver = FakeDriver()
    containerizer = Containerizer(
        {"native": driver}, StateStore(tmp_path / "state.db"), default_runtime="native"
    )
    await containerizer.recover()
    yield containerizer, driver
    await containerizer.close()


async def test_launch_wait_exit_code(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    containerizer, driver = core
    record = await containerizer.launch(make_spec("a", tmp_path))
    assert record.state is State.RUNNING and record.pid == 4242
    assert Path(record.spec.sandbox).is_dir()
    driver.finish("a", Exit(exit_code=3))
    termination = await containerizer.wait("a")
    assert termination.reason is Reason.EXITED
    assert (termination.exit_code, termination.status, termination.killed) == (3, 768, False)
    assert containerizer.status("a").state is State.TERMINATED
    assert "a" in driver.destroyed  # cleanup ran before Wait returned


async def test_signal_and_limitation_policy(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    containerizer, driver = core
    await containerizer.launch(make_spec("oom", tmp_path))
    driver.finish("oom", Exit(signal=9, limitation="mem", limitation_message="limit 64 MiB"))
    termination = await containerizer.wait("oom")
    assert termination.reason is Reason.LIMITATION_MEMORY
    assert termination.killed and termination.limited_resources == ("mem",)
    assert termination.status == 9
    assert termination.message == "killed by signal 9 (SIGKILL); limit 64 MiB"


async def test_destroy_reports_destroyed_then_acknowledges(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    containerizer, _ = core
    await containerizer.launch(make_spec("d", tmp_path))
    termination = await containerizer.destroy("d")
    assert termination.reason is Reason.DESTROYED and termination.killed
    assert termination.signal == 9
    assert (await containerizer.wait("d")) == termination  # still retained for late waiters
    assert (await containerizer.destroy("d")) == termination  # acknowledge: forgotten now
    with pytest.raises(NotFound):
        containerizer.status("d")


async def test_duplicate_and_relaunch(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    containerizer, driver = core
    await containerizer.launch(make_spec("dup", tmp_path))
    with pytest.raises(AlreadyExists):
        await containerizer.launch(make_spec("dup", tmp_path))
    driver.finish("dup", Exit(exit_code=0))
    await containerizer.wait("dup")
    relaunched = await containerizer.launch(make_spec("dup", tmp_path))
    assert relaunched.state is State.RUNNING


async def test_launch_failure_is_recorded(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    containerizer, driver = core
    driver.fail_launch = True
    with pytest.raises(LaunchFailed):
        await containerizer.launch(make_spec("bad", tmp_path))
    termination = await containerizer.wait("bad")
    assert termination.reason is Reason.LAUNCH_FAILED
    assert "no such binary" in termination.message
    assert "bad" in driver.destroyed


async def test_update_usage_and_state_errors(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    containerizer, driver = core
    await containerizer.launch(make_spec("u", tmp_path))
    await containerizer.update("u", Resources(cpus=2))
    assert driver.updated == [Resources(cpus=2, mem_mib=64)]  # merged, complete
    assert containerizer.status("u").spec.resources.cpus == 2
    usage = await containerizer.usage("u")
    assert usage["cpus_user_time_secs"] == 1.5 and usage["timestamp"] > 0
    driver.finish("u", Exit(exit_code=0))
    await containerizer.wait("u")
    with pytest.raises(FailedPrecondition, match="TERMINATED"):
        await containerizer.usage("u")
    with pytest.raises(NotFound):
        await containerizer.kill("nope", 15)


async def test_unconfigured_runtime_is_failed_precondition(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    containerizer, _ = core
    spec = make_spec("x", tmp_path)
    with pytest.raises(FailedPrecondition, match="'lxc' is not configured"):
        await containerizer.launch(LaunchSpec(**{**spec.__dict__, "runtime": "lxc"}))


async def test_events_stream_transitions(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    containerizer, driver = core
    seen: list[State] = []

    async def collect() -> None:
        async for event in containerizer.events("ev"):
            seen.append(event.state)
            if event.state is State.TERMINATED:
                return

    collector = asyncio.create_task(collect())
    await asyncio.sleep(0)
    await containerizer.launch(make_spec("ev", tmp_path))
    driver.finish("ev", Exit(exit_code=0))
    await asyncio.wait_for(collector, 5)
    assert seen[0] is State.LAUNCHING and seen[1] is State.RUNNING
    assert seen[-1] is State.TERMINATED


async def test_recovery_resumes_and_fails_interrupted_launches(tmp_path: Path) -> None:
    store_path = tmp_path / "state.db"
    first = FakeDriver()
    before = Containerizer({"native": first}, StateStore(store_path), default_runtime="native")
    await before.recover()
    await before.launch(make_spec("keeps", tmp_path))
    await before.launch(make_spec("done", tmp_path))
    first.finish("done", Exit(exit_code=7))
    await before.wait("done")
    # Simulate a crash in the middle of a launch: LAUNCHING checkpointed, nothing else.
    interrupted = before.status("keeps").evolve(
        spec=make_spec("half", tmp_path), state=State.LAUNCHING, handle={}
    )
    StateStore(store_path).put(interrupted)
    await before.close()

    second = FakeDriver()
    after = Containerizer({"native": second}, StateStore(store_path), default_runtime="native")
    await after.recover()
    checkpointed, known = second.recovered[0]
    assert [c.spec.container_id for c in checkpointed] == ["keeps"]
    assert known == {"keeps", "done", "half"}
    assert (await after.wait("done")).exit_code == 7
    half = await after.wait("half")
    assert half.reason is Reason.LAUNCH_FAILED and "restarted" in half.message
    second.finish("keeps", Exit(exit_code=5))
    assert (await after.wait("keeps")).exit_code == 5
    await after.close()


async def test_terminations_expire_after_retention(tmp_path: Path) -> None:
    driver = FakeDriver()
    containerizer = Containerizer(
        {"native": driver},
        StateStore(tmp_path / "s.db"),
        default_runtime="native",
        termination_retention=0,
    )
    await containerizer.recover()
    await containerizer.launch(make_spec("old", tmp_path))
    driver.finish("old", Exit(exit_code=0))
    await containerizer.wait("old")
    containerizer._prune()
    assert containerizer.containers() == []
    await containerizer.close()


async def test_forgetting_removes_only_our_own_sandboxes(tmp_path: Path) -> None:
    driver = FakeDriver()
    containerizer = Containerizer(
        {"native": driver},
        StateStore(tmp_path / "s.db"),
        default_runtime="native",
        sandbox_root=tmp_path / "sandboxes",
    )
    await containerizer.recover()
    ours = make_spec("ours", tmp_path)  # under tmp_path/sandboxes: created by us
    theirs = LaunchSpec(
        **{**make_spec("theirs", tmp_path).__dict__, "sandbox": str(tmp_path / "mine")}
    )
    for spec in (ours, theirs):
        await containerizer.launch(spec)
        await containerizer.destroy(spec.container_id)
        await containerizer.destroy(spec.container_id)  # acknowledge: the record goes
    assert not Path(ours.sandbox).exists()
    assert Path(theirs.sandbox).is_dir()
    await containerizer.close()


async def test_recovery_finishes_a_cleanup_the_crash_interrupted(tmp_path: Path) -> None:
    """Exit checkpointed, then a crash before cleanup: the record is still RUNNING with a
    termination. Recovery cleans up and reports that termination, without waiting again."""
    store_path = tmp_path / "state.db"
    recorded = Termination(Reason.EXITED, exit_code=9, status=9 << 8, finished_at=time.time())
    store = StateStore(store_path)
    store.put(
        ContainerRecord(
            spec=make_spec("mid-cleanup", tmp_path),
            state=State.RUNNING,
            launched_at=0.5,
            handle={"fake": "mid-cleanup"},
            termination=recorded,
        )
    )
    store.close()
    driver = FakeDriver()
    containerizer = Containerizer(
        {"native": driver}, StateStore(store_path), default_runtime="native"
    )
    await containerizer.recover()
    assert await asyncio.wait_for(containerizer.wait("mid-cleanup"), 5) == recorded
    assert driver.destroyed == ["mid-cleanup"]
    assert driver.killed_all == []  # its exit is known: nothing to kill, cleanup only
    assert containerizer.status("mid-cleanup").state is State.TERMINATED
    await containerizer.close()


async def test_unusable_sandbox_fails_the_launch_cleanly(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    containerizer, driver = core
    (tmp_path / "a-file").write_text("not a directory")
    spec = LaunchSpec(
        **{**make_spec("nosb", tmp_path).__dict__, "sandbox": str(tmp_path / "a-file" / "sb")}
    )
    with pytest.raises(LaunchFailed, match="sandbox"):
        await containerizer.launch(spec)
    termination = await containerizer.wait("nosb")
    assert termination.reason is Reason.LAUNCH_FAILED and "Not a directory" in termination.message
    assert "nosb" not in driver.exits  # never reached the runtime


def store_destroying(store_path: Path, tmp_path: Path, *ids: str) -> None:
    """Records as a crash between the DESTROYING checkpoint and the kill leaves them."""
    store = StateStore(store_path)
    for cid in ids:
        store.put(
            ContainerRecord(
                spec=make_spec(cid, tmp_path),
                state=State.DESTROYING,
                launched_at=0.5,
                handle={"fake": cid},
            )
        )
    store.close()


async def test_a_destroy_interrupted_by_a_restart_ends_destroyed(tmp_path: Path) -> None:
    """The restart finishes the destroy in a live one's order: the watcher waits before the
    kill, so a runtime that drops its record on destroy still reports the container's exit."""
    store_path = tmp_path / "state.db"
    store_destroying(store_path, tmp_path, "d1", "d2", "d3")
    driver = FakeDriver()
    driver.forgets_destroyed = True
    containerizer = Containerizer(
        {"native": driver}, StateStore(store_path), default_runtime="native"
    )
    await containerizer.recover()
    for cid in ("d1", "d2", "d3"):
        termination = await asyncio.wait_for(containerizer.wait(cid), 5)
        assert termination.reason is Reason.DESTROYED, termination.message
        assert (termination.signal, termination.killed) == (9, True)
        assert termination.message == "destroyed: killed by signal 9 (SIGKILL)"
    assert sorted(set(driver.destroyed)) == ["d1", "d2", "d3"]
    await containerizer.close()


async def test_a_requested_destroy_whose_exit_was_lost_ends_destroyed(tmp_path: Path) -> None:
    """The runtime has no exit to report for it (the service died while it was being killed):
    the destroy was still requested, so it ends DESTROYED, not LOST."""
    store_path = tmp_path / "state.db"
    store_destroying(store_path, tmp_path, "gone")
    driver = FakeDriver()
    containerizer = Containerizer(
        {"native": driver}, StateStore(store_path), default_runtime="native"
    )
    await containerizer.recover()
    driver.finish("gone", Exit(lost=True, message="no exit status was recorded"))
    termination = await asyncio.wait_for(containerizer.wait("gone"), 5)
    assert termination.reason is Reason.DESTROYED and termination.killed
    assert termination.message == "destroyed: no exit status was recorded"
    await containerizer.close()


async def test_a_destroy_after_a_pids_limit_is_destroyed_with_the_limit_noted(
    core, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    containerizer, driver = core
    driver.kill_exit = Exit(
        signal=9, limitation="pids", limitation_message="Task limit reached: pids.max 8"
    )
    await containerizer.launch(make_spec("forks", tmp_path))
    termination = await containerizer.destroy("forks")
    assert termination.reason is Reason.DESTROYED and termination.killed
    assert termination.limited_resources == ("pids",)
    assert termination.message == (
        "destroyed: killed by signal 9 (SIGKILL); Task limit reached: pids.max 8"
    )


async def test_a_pids_limit_without_a_destroy_stays_the_reason(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    containerizer, driver = core
    await containerizer.launch(make_spec("bomb", tmp_path))
    driver.finish("bomb", Exit(exit_code=2, limitation="pids", limitation_message="Task limit"))
    termination = await containerizer.wait("bomb")
    assert termination.reason is Reason.LIMITATION_PIDS and not termination.killed
    assert termination.message == "exited with code 2; Task limit"


async def test_an_oom_kill_before_the_destroy_stays_a_memory_limitation(
    core, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    containerizer, driver = core
    driver.kill_exit = Exit(signal=9, limitation="mem", limitation_message="Memory limit exceeded")
    await containerizer.launch(make_spec("oom-then-destroy", tmp_path))
    termination = await containerizer.destroy("oom-then-destroy")
    assert termination.reason is Reason.LIMITATION_MEMORY and termination.killed
    assert termination.message == "killed by signal 9 (SIGKILL); Memory limit exceeded"


async def test_the_message_says_what_happened_once(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    containerizer, driver = core
    for cid in ("code", "term", "destroyed"):
        await containerizer.launch(make_spec(cid, tmp_path))
    driver.finish("code", Exit(exit_code=3))
    await containerizer.kill("term", 15)
    messages = {
        "code": (await containerizer.wait("code")).message,
        "term": (await containerizer.wait("term")).message,
        "destroyed": (await containerizer.destroy("destroyed")).message,
    }
    assert messages == {
        "code": "exited with code 3",
        "term": "killed by signal 15 (SIGTERM)",
        "destroyed": "destroyed: killed by signal 9 (SIGKILL)",
    }


async def test_a_disk_request_is_accepted_with_a_warning_it_is_not_enforced(
    core, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    containerizer, _ = core
    spec = make_spec("disk", tmp_path)
    with_disk = LaunchSpec(**{**spec.__dict__, "resources": Resources(disk_mib=1)})
    record = await containerizer.launch(with_disk, warnings=("mem raised",))
    assert record.state is State.RUNNING
    assert record.warnings[0] == "mem raised"
    assert any("disk is not enforced" in w and "1 MiB" in w for w in record.warnings)
    plain = await containerizer.launch(make_spec("no-disk", tmp_path))
    assert not any("disk" in w for w in plain.warnings)
    (fingerprint,) = await containerizer.runtimes()
    assert fingerprint.message.endswith("disk: not enforced")
    assert not fingerprint.capabilities.disk_enforced


async def test_a_failed_launch_is_rolled_back_once(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    containerizer, driver = core
    driver.fail_launch = True
    with pytest.raises(LaunchFailed):
        await containerizer.launch(make_spec("once", tmp_path))
    assert driver.calls == [("start", "once"), ("kill_all", "once"), ("cleanup", "once")]


async def test_destroy_kills_then_waits_for_the_exit_then_cleans_up(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Mesos' order: the runtime still knows the container when its exit is reported, because
    cleanup (which forgets it) comes only after."""
    containerizer, driver = core
    driver.forgets_destroyed = True
    await containerizer.launch(make_spec("order", tmp_path))
    termination = await containerizer.destroy("order")
    assert (termination.reason, termination.signal) == (Reason.DESTROYED, 9)
    verbs = [verb for verb, cid in driver.calls if cid == "order"]
    assert verbs == ["start", "kill_all", "exit", "cleanup"]


async def test_an_exit_that_never_comes_after_the_kill_is_recorded_and_cleaned_up(
    core, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    containerizer, driver = core
    monkeypatch.setattr(termination_module, "EXIT_AFTER_KILL_TIMEOUT", 0.05)
    driver.kill_exit = None  # the runtime cannot report an exit
    await containerizer.launch(make_spec("stuck", tmp_path))
    termination = await asyncio.wait_for(containerizer.destroy("stuck"), 5)
    assert termination.reason is Reason.DESTROYED and termination.killed
    assert termination.message == "destroyed: no exit reported within 0.05 s of the kill"
    assert driver.destroyed == ["stuck"]
    assert containerizer.status("stuck").state is State.TERMINATED
