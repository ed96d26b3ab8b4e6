"""The lifecycle state machine, termination policy and recovery, against a fake driver."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from adapter.containerizer import Containerizer
from adapter.drivers.base import Checkpointed, Launched
from adapter.errors import AlreadyExists, FailedPrecondition, LaunchFailed, NotFound
from adapter.model import (
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
from adapter.state import ContainerRecord, StateStore


class FakeDriver:
    """Containers 'run' until the test finishes them or destroy kills them."""

    name = "native"

    def __init__(self) -> None:
        self.exits: dict[str, asyncio.Future[Exit]] = {}
        self.destroyed: list[str] = []
        self.updated: list[Resources] = []
        self.recovered: list[tuple[list[Checkpointed], set[str]]] = []
        self.fail_launch = False

    async def fingerprint(self) -> Fingerprint:
        return Fingerprint(self.name, "1", True)

    async def launch(self, spec: LaunchSpec) -> Launched:
        if self.fail_launch:
            raise LaunchFailed("no such binary")
        self.exits[spec.container_id] = asyncio.get_running_loop().create_future()
        return Launched(handle={"fake": spec.container_id}, pid=4242)

    def finish(self, cid: str, exit_: Exit) -> None:
        self.exits[cid].set_result(exit_)

    async def wait(self, container_id: str) -> Exit:
        if container_id not in self.exits:
            return Exit(lost=True, message="unknown")
        return await self.exits[container_id]

    async def kill(self, container_id: str, signal: int) -> None:
        self.finish(container_id, Exit(signal=signal))

    async def destroy(self, container_id: str) -> None:
        self.destroyed.append(container_id)
        future = self.exits.get(container_id)
        if future is not None and not future.done():
            future.set_result(Exit(signal=9))

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
    assert termination.status == 9 and termination.message == "limit 64 MiB"


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
