"""Shared fixtures: a real `containerizer serve` process per test session (per xdist worker),
capability probes, and the CI rule that a skip for a missing capability fails the run."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from tests.cgroup_roots import (
    RUN_ID,
    remove_cgroup_trees,
    run_cgroup_roots,
    run_scoped_name,
)
from tests.integration.containerd_daemon import user_namespace_mode
from tests.run_records import (
    RunRecord,
    bridge_prefix,
    remove_network,
    sweep_dead_runs,
    unmount_below,
)

# Fixtures several test modules share, registered once here rather than imported by each.
pytest_plugins = ["tests.integration.cgroup_helpers", "tests.integration.cri"]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
IN_CI = os.environ.get("CI") == "true"
CGROUP_MOUNT = Path("/sys/fs/cgroup")
# CTZ_TEST_USER_NAMESPACE=1: every service runs its containers in user namespaces by default
# (the suites once more in that mode); ranges far above any /etc/subuid user's.
USER_NAMESPACE_DEFAULT = '[user_namespace]\ndefault = true\nrange = "2000000000:2000000000"\n'
RUN_RECORD = pytest.StashKey[RunRecord]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """In CI every runtime is installed: a skip means a broken install, so it fails the run."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where nothing may be missing: {report.longrepr}"


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """The session (the xdist controller, before it starts any worker) first ends and removes
    what runs killed halfway left, then records itself with a lock held while it lives, so that
    the next run does the same for it (tests/run_records.py)."""
    if hasattr(session.config, "workerinput") or os.geteuid() != 0:
        return  # without root a run can leave no daemon, mount or cgroup
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for swept in sweep_dead_runs():
        if reporter is not None:
            reporter.write_line(f"swept {swept.summary()}", yellow=True)
    basetemp = session.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    session.config.stash[RUN_RECORD] = RunRecord([basetemp])


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Every fixture removes the cgroups it made: a cgroup root this run left fails the run.
    Only this run's roots count (their names carry RUN_ID), so a concurrent run's are not ours
    to judge. The xdist controller checks once every worker has finished, then drops the
    run's record."""
    if hasattr(session.config, "workerinput"):
        return
    left = run_cgroup_roots()
    if left:
        names = sorted({root.name for root in left})
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"\nFAILED: this run (id {RUN_ID}) left cgroup roots behind, now removed:"
                f" {', '.join(names)}",
                red=True,
            )
        remove_cgroup_trees(*names)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    # Likewise its bridges, veths and network namespaces (named with the run's id).
    removed, _ = remove_network(bridge_prefix(RUN_ID))
    if removed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"\nFAILED: this run (id {RUN_ID}) left network names behind, now removed:"
                f" {', '.join(removed)}",
                red=True,
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    # A stopped service keeps its sandboxes' nosuid mount while a sandbox is there (state_dir.py);
    # the run's directories are its own, so that mount goes with them.
    if os.geteuid() == 0:
        unmount_below(session.config._tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
    with contextlib.suppress(KeyError):
        session.config.stash[RUN_RECORD].release()


def require(condition: bool, reason: str) -> None:
    if not condition:
        pytest.skip(reason)


@contextlib.contextmanager
def traversable_by_all(directory: Path) -> Iterator[None]:
    """`directory` and its parents passable by every user, as /var/lib is (pytest makes its
    temporary directories 0700, which would hide what lies below whatever its own mode)."""
    changed = []
    for path in (directory, *directory.parents):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o001 == 0:
            os.chmod(path, mode | 0o011)
            changed.append((path, mode))
    try:
        yield
    finally:
        for path, mode in changed:
            os.chmod(path, mode)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root (cgroups, namespaces)")


class ServiceProcess:
    """A real `containerizer serve` with private state, socket and cgroup root."""

    def __init__(self, workdir: Path, extra_config: str = "") -> None:
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.socket = workdir / "containerizer.sock"
        self.endpoint = f"unix:{self.socket}"
        self.cgroups_root = run_scoped_name()
        self.config_path = workdir / "containerizer.toml"
        self.log_path = workdir / "service.log"
        self.config_path.write_text(
            f'version = 1\nstate_dir = "{self.state_dir}"\nsocket = "{self.socket}"\n'
            f'cgroups_root = "{self.cgroups_root}"\ntermination_retention = 600\n'
            f"{extra_config}\n{_user_namespace_default(extra_config)}"
        )
        self.process: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None
        if user_namespace_mode():
            searchable_by_all(workdir)

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(BIN / "containerizer"), "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited at start:\n{self.log_path.read_text()}")
            if self.socket.exists():
                with contextlib.suppress(grpc.RpcError):
                    self.stub().Containers(pb.ContainersRequest(), timeout=2)
                    return
            time.sleep(0.02)
        raise RuntimeError(f"service did not come up:\n{self.log_path.read_text()}")

    def stub(self) -> pb_grpc.ContainerizerStub:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.endpoint)
        return pb_grpc.ContainerizerStub(self._channel)

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def stop(self) -> None:
        """SIGTERM, and the sandboxes' nosuid mount undone: a service keeps it while sandboxes
        remain (adapter/core/state_dir.py), and this state directory is the test's."""
        self._close_channel()
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        unmount_below(self.state_dir / "sandboxes")

    def kill(self) -> None:
        """kill -9: what a crash looks like."""
        self._close_channel()
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def destroy_all(self) -> None:
        stub = self.stub()
        for status in stub.Containers(pb.ContainersRequest(), timeout=10).containers:
            with contextlib.suppress(grpc.RpcError):
                stub.Destroy(pb.DestroyRequest(container_id=status.container_id), timeout=30)

    def leftover_cgroups(self) -> list[Path]:
        return [p for p in CGROUP_MOUNT.glob(f"*/{self.cgroups_root}/*") if p.is_dir()]

    def remove_cgroup_roots(self) -> list[Path]:
        """Once the service is stopped: its cgroup root and the roots named after it (libvirt's
        `<root>.partition`, LXC's `<root>.lxc-monitor.<id>`), with all below them, in every
        hierarchy. Returns what could not be removed (the end-of-run check reports it too)."""
        return remove_cgroup_trees(self.cgroups_root, f"{self.cgroups_root}.*")


def searchable_by_all(path: Path) -> None:
    """User namespace mode: a container's root (an unprivileged host uid) runs in the host's
    filesystem without an image, so it must be able to walk to its sandbox, as under the
    default state directory (0711); pytest makes its temporary directories 0700 (and its root
    0700 again at the next session). Search, not read, is added, up to /tmp."""
    for directory in (path, *path.parents):
        if directory == Path("/tmp") or not directory.is_relative_to("/tmp"):
            break
        directory.chmod(directory.stat().st_mode & 0o7777 | 0o111)


def _user_namespace_default(extra_config: str) -> str:
    """The user namespace mode's table, unless the test configures user namespaces itself."""
    wanted = user_namespace_mode() and "[user_namespace]" not in extra_config
    return USER_NAMESPACE_DEFAULT if wanted else ""


def serving(process: ServiceProcess) -> Iterator[ServiceProcess]:
    """A fixture's service: started, yielded, then whatever it still runs destroyed, stopped,
    and its cgroup roots removed (`yield from serving(...)`)."""
    process.start()
    yield process
    with contextlib.suppress(Exception):
        process.destroy_all()
    process.stop()
    process.remove_cgroup_roots()


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One service per xdist worker; tests share it and use unique container ids."""
    require_root()
    require(shutil.which("containerizer", path=str(BIN)) is not None, "containerizer not installed")
    process = ServiceProcess(tmp_path_factory.mktemp("service"))
    yield from serving(process)


@pytest.fixture
def fresh_service(tmp_path: Path) -> Iterator[ServiceProcess]:
    """A service of the test's own, for tests that crash or inspect the whole node."""
    require_root()
    process = ServiceProcess(tmp_path)
    process.start()
    yield process
    with contextlib.suppress(Exception):
        if process.process and process.process.poll() is None:
            process.destroy_all()
    process.stop()
    process.remove_cgroup_roots()


@pytest.fixture
def container_id(request: pytest.FixtureRequest) -> str:
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40].strip("-")
    return f"{name}-{uuid.uuid4().hex[:8]}"
