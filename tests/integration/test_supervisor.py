"""containerizer-supervisor for real: built from source once per session (per xdist worker), run
as root with namespaces and cgroup v1, driven through adapter.supervisor.client."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from adapter.core.confinement import Confinement
from adapter.core.model import Identity
from adapter.supervisor import client as supervisor
from adapter.supervisor import processes
from adapter.supervisor.client import ExitStatus, SpawnError, SupervisorHandle
from adapter.supervisor.launch_config import Enforcement, LaunchConfig
from adapter.supervisor.seccomp import build_program
from tests.cgroup_roots import run_scoped_name

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SUPERVISOR_DIR = REPO / "supervisor"  # its source and the Makefile that builds it
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PIDS_CGROUP = Path("/sys/fs/cgroup/pids")


@pytest.fixture(scope="session")
def binary(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The supervisor built from this checkout's source as `make -C supervisor` builds the one
    installed (musl-gcc, static, when there is one; else cc), so the tests never run a stale
    build nor another libc's. Only BIN is made, in a directory of this session's."""
    if os.geteuid() != 0:
        pytest.skip("needs root (pid/mount/uts namespaces, cgroups, setuid)")
    if shutil.which("make") is None or not (shutil.which("musl-gcc") or shutil.which("cc")):
        pytest.skip("needs make and a C compiler (musl-gcc or cc) to build the supervisor")
    build = tmp_path_factory.mktemp("supervisor")
    out = build / supervisor.SUPERVISOR_NAME
    subprocess.run(
        ["make", "-C", str(SUPERVISOR_DIR), "--no-print-directory", "--silent",
         f"BIN={out}", f"BUILD={build / 'build'}", str(out)],
        check=True,
    )  # fmt: skip
    return str(out)


@pytest.fixture(scope="session")
def enforcement() -> Enforcement:
    """The default confinement, as the native runtime gives a launch without an image."""
    return Enforcement.of(Confinement(), build_program().bpf, own_root=False)


@dataclasses.dataclass
class Box:
    """Where one supervised workload keeps its files."""

    binary: str
    root: Path
    enforcement: Enforcement
    # The registry a service keeps of the supervisors it spawned (and must reap).
    supervisors: supervisor.Supervisors = dataclasses.field(default_factory=supervisor.Supervisors)

    @property
    def status_file(self) -> Path:
        return self.root / "status"

    @property
    def stdout(self) -> Path:
        return self.root / "stdout"

    @property
    def stderr(self) -> Path:
        return self.root / "stderr"

    def config(self, argv: list[str], **options: object) -> LaunchConfig:
        return LaunchConfig(
            status_file=str(self.status_file),
            sandbox=str(self.root),
            argv=argv,
            enforcement=self.enforcement,
            **options,  # type: ignore[arg-type]
        )

    async def spawn(self, argv: list[str], **options: object) -> SupervisorHandle:
        timeout = options.pop("handshake_timeout", supervisor.HANDSHAKE_TIMEOUT_S)
        return await self.supervisors.spawn(
            self.binary,
            self.config(argv, **options),
            handshake_timeout=timeout,  # type: ignore[arg-type]
        )

    async def run(self, argv: list[str], **options: object) -> ExitStatus | None:
        handle = await self.spawn(argv, **options)
        return await self.supervisors.wait_exit(handle)


@pytest.fixture
def box(binary: str, tmp_path: Path, enforcement: Enforcement) -> Box:
    return Box(binary, tmp_path, enforcement)


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- exit statuses ------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 3, 255])
async def test_exit_code_is_recorded(box: Box, code: int) -> None:
    before = time.time()
    status = await box.run(["sh", "-c", f"exit {code}"])
    assert status is not None
    assert (status.exit_code, status.signal) == (code, None)
    assert before - 1 <= status.finished_at <= time.time() + 1


async def test_kill_through_the_handle_is_recorded_as_signal_9(box: Box) -> None:
    handle = await box.spawn(["sleep", "30"])
    assert supervisor.is_alive(handle)
    supervisor.kill(handle, signal.SIGKILL)
    status = await box.supervisors.wait_exit(handle)
    assert status is not None and (status.exit_code, status.signal) == (None, 9)
    assert not supervisor.is_alive(handle)


@pytest.mark.parametrize("signo", [signal.SIGKILL, signal.SIGTERM])
async def test_workload_killing_itself_is_recorded_as_its_signal(box: Box, signo: int) -> None:
    # Without a pid namespace: pid 1 of a namespace cannot kill itself (see the next test).
    status = await box.run(["sh", "-c", f"kill -{signo} $$; sleep 5"], namespaces=False)
    assert status is not None and (status.exit_code, status.signal) == (None, signo)


async def test_namespace_init_receives_only_signals_it_handles(box: Box) -> None:
    """Kernel rule for any container init: from outside, SIGTERM reaches pid 1 only if it has a
    handler. A workload that traps it shuts down gracefully; the service needs SIGKILL else."""
    handle = await box.spawn(
        ["sh", "-c", "trap 'exit 42' TERM; echo ready; while :; do sleep 0.02; done"]
    )
    await wait_until(lambda: box.stdout.exists() and "ready" in box.stdout.read_text())
    supervisor.kill(handle, signal.SIGTERM)
    status = await box.supervisors.wait_exit(handle)
    assert status is not None and status.exit_code == 42


# --- launch errors ------------------------------------------------------------------------------


async def test_missing_binary_is_an_exec_error_without_status(box: Box) -> None:
    with pytest.raises(SpawnError) as caught:
        await box.spawn(["/nonexistent/workload"])
    assert (caught.value.step, caught.value.reason) == ("exec", "No such file or directory")
    assert "/nonexistent/workload" in str(caught.value)
    assert not box.status_file.exists()


def test_missing_binary_handshake_line(box: Box) -> None:
    result = subprocess.run(
        [box.binary, *supervisor.CONFIG_ARGUMENTS],
        input=box.config(["/nonexistent/workload"]).encode(), capture_output=True, check=False,
    )  # fmt: skip
    assert result.stdout == b"error exec: No such file or directory\n"
    assert result.returncode != 0
    assert not box.status_file.exists()


@pytest.mark.parametrize(
    ("options", "step"),
    [
        ({"cwd": "/nonexistent/dir"}, "cwd"),
        ({"cgroup_procs": ["/sys/fs/cgroup/pids/ctz-no-such/cgroup.procs"]}, "cgroup"),
    ],
)
async def test_other_launch_errors_name_their_step(
    box: Box, options: dict[str, object], step: str
) -> None:
    with pytest.raises(SpawnError) as caught:
        await box.spawn(["true"], **options)
    assert caught.value.step == step
    assert "No such file or directory" in caught.value.reason


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("loop", "Too many levels of symbolic links"),  # musl: "Symbolic link loop"
        ("x" * 300, "File name too long"),  # musl: "Filename too long"
    ],
)
async def test_reasons_are_worded_as_glibc_words_them_in_any_build(
    box: Box, name: str, reason: str
) -> None:
    (box.root / "loop").symlink_to("loop")
    with pytest.raises(SpawnError) as caught:
        await box.spawn([str(box.root / name)])
    assert (caught.value.step, caught.value.reason) == ("exec", reason)


async def test_status_directory_that_does_not_exist_fails_before_launch(box: Box) -> None:
    marker = box.root / "ran"
    with pytest.raises(SpawnError) as caught:
        config = dataclasses.replace(
            box.config(["touch", str(marker)]), status_file=str(box.root / "missing" / "status")
        )
        await box.supervisors.spawn(box.binary, config)
    assert caught.value.step == "status-file"
    assert not marker.exists()


async def test_supervisor_binary_that_cannot_run_is_a_spawn_error(box: Box) -> None:
    with pytest.raises(SpawnError, match="cannot run"):
        await box.supervisors.spawn(str(box.root / "nope"), box.config(["true"]))


async def test_silent_supervisor_is_killed_after_the_handshake_timeout(box: Box) -> None:
    fake = box.root / "silent-supervisor"
    fake.write_text("#!/bin/sh\nsleep 30\n")
    fake.chmod(0o755)
    with pytest.raises(SpawnError) as caught:
        await box.supervisors.spawn(str(fake), box.config(["true"]), handshake_timeout=0.3)
    assert caught.value.step == "handshake"
    leftovers = [
        p for p in psutil.process_iter(["cmdline"]) if str(fake) in (p.info["cmdline"] or [])
    ]
    assert leftovers == []


# --- what the workload gets ---------------------------------------------------------------------


async def test_workload_joins_cgroups_before_exec(box: Box) -> None:
    if not (PIDS_CGROUP / "cgroup.procs").exists():
        pytest.skip("needs the cgroup v1 pids controller at /sys/fs/cgroup/pids")
    cgroup = PIDS_CGROUP / run_scoped_name()
    cgroup.mkdir()
    try:
        status = await box.run(
            ["cat", "/proc/self/cgroup"], cgroup_procs=[str(cgroup / "cgroup.procs")]
        )
        assert status is not None and status.exit_code == 0
        assert f"pids:/{cgroup.name}\n" in box.stdout.read_text()
    finally:
        remove_cgroup(cgroup)


def remove_cgroup(cgroup: Path) -> None:
    deadline = time.monotonic() + 2
    while True:
        try:
            cgroup.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


async def test_workload_runs_under_our_init_in_its_own_pid_namespace(box: Box) -> None:
    script = "echo $$; cat /proc/1/comm; ls /proc | grep -c '^[0-9]'; hostname"
    status = await box.run(["sh", "-c", script], hostname="c" * 70)
    assert status is not None and status.exit_code == 0
    pid, init, visible, hostname = box.stdout.read_text().split()
    assert (pid, init) == ("2", "containerizer-s")  # pid 1 is our init, a supervisor fork
    assert int(visible) <= 5  # init, sh, ls, grep: nothing of the host
    assert hostname == "c" * 63


async def test_init_forwards_sigterm_to_a_workload_without_handlers(box: Box) -> None:
    handle = await box.spawn(["sleep", "100"])
    supervisor.kill(handle, signal.SIGTERM)
    status = await box.supervisors.wait_exit(handle)
    assert status is not None and (status.exit_code, status.signal) == (None, signal.SIGTERM)


async def test_workload_killing_itself_reports_its_signal(box: Box) -> None:
    status = await box.run(["sh", "-c", "kill -TERM $$; sleep 5"])
    assert status is not None and status.signal == signal.SIGTERM


async def test_namespaces_leave_the_host_mounts_alone(box: Box) -> None:
    def proc_mounts() -> int:
        return Path("/proc/self/mountinfo").read_text().count(" - proc ")

    before = proc_mounts()
    status = await box.run(["true"])
    assert status is not None and status.exit_code == 0
    assert proc_mounts() == before


async def test_double_forked_daemon_dies_with_the_init(box: Box) -> None:
    marker = f"1000.{uuid.uuid4().int % 10**9}"

    def daemons() -> list[psutil.Process]:
        return [
            p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", marker]
        ]

    handle = await box.spawn(["sh", "-c", f"(setsid sleep {marker} &) ; sleep 0.3"])
    await wait_until(lambda: len(daemons()) == 1)
    status = await box.supervisors.wait_exit(handle)
    assert status is not None and status.exit_code == 0
    assert daemons() == []


async def test_env_is_only_what_was_given_plus_a_default_path(box: Box) -> None:
    status = await box.run(["/usr/bin/env"], env=[("FOO", "bar baz"), ("EMPTY", "")])
    assert status is not None and status.exit_code == 0
    assert sorted(box.stdout.read_text().splitlines()) == sorted(
        ["FOO=bar baz", "EMPTY=", f"PATH={DEFAULT_PATH}"]
    )


async def test_given_path_replaces_the_default_and_is_searched(box: Box) -> None:
    status = await box.run(["env"], env=[("PATH", "/bin")])
    assert status is not None and status.exit_code == 0
    assert box.stdout.read_text() == "PATH=/bin\n"


async def test_cwd_is_used(box: Box) -> None:
    work = box.root / "work dir"
    work.mkdir()
    status = await box.run(["/bin/pwd"], cwd=str(work))
    assert status is not None and status.exit_code == 0
    assert box.stdout.read_text() == f"{work}\n"


async def test_stdout_and_stderr_are_appended(box: Box) -> None:
    box.stdout.write_text("earlier\n")
    for word in ("one", "two"):
        status = await box.run(["sh", "-c", f"echo out-{word}; echo err-{word} >&2"])
        assert status is not None and status.exit_code == 0
    assert box.stdout.read_text() == "earlier\nout-one\nout-two\n"
    assert box.stderr.read_text() == "err-one\nerr-two\n"


async def test_workload_inherits_no_stray_fds(box: Box) -> None:
    status = await box.run(["ls", "/proc/self/fd"])
    assert status is not None and status.exit_code == 0
    assert sorted(box.stdout.read_text().split()) == ["0", "1", "2", "3"]  # 3: ls's own dir fd


# --- the command, found as POSIX's execvp finds it (in either libc's build) ----------------------


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(
    ("command", "shown_as"), [("./bin/script", None), ("script", "bin/script")]
)
async def test_a_file_without_a_shebang_line_is_run_by_bin_sh(
    box: Box, command: str, shown_as: str | None
) -> None:
    # The kernel refuses it (ENOEXEC); POSIX's execvp hands it to /bin/sh, and musl's does not.
    executable(box.root / "bin" / "script", 'printf "[%s]" "$0" "$@"\n')
    status = await box.run([command, "a", "b c"], cwd=str(box.root), env=[("PATH", "bin")])
    assert status is not None and status.exit_code == 0, box.stderr.read_text()
    assert box.stdout.read_text() == f"[{shown_as or command}][a][b c]"


async def test_the_search_passes_over_missing_non_directory_and_unsearchable_entries(
    box: Box,
) -> None:
    (box.root / "a-file").write_text("")
    locked = box.root / "locked"  # root's, 0700: the workload (no capability) may not search it
    executable(locked / "tool", "#!/bin/sh\necho from-locked\n")
    locked.chmod(0o700)
    executable(box.root / "bin" / "tool", "#!/bin/sh\necho from-bin\n")
    status = await box.run(
        ["tool"],
        cwd=str(box.root),  # relative entries: the sandbox's host parents are root's, 0700
        env=[("PATH", "missing:a-file:locked:bin")],
        identity=Identity(1234, 1234),
    )
    assert status is not None and status.exit_code == 0, box.stderr.read_text()
    assert box.stdout.read_text() == "from-bin\n"


async def test_a_command_found_but_refused_is_permission_denied_naming_it(box: Box) -> None:
    data = box.root / "refused" / "ctz-data"
    executable(data, "not a program\n").chmod(0o644)
    with pytest.raises(SpawnError) as caught:  # though the last entry's error is ENOENT
        await box.spawn(["ctz-data"], cwd=str(box.root), env=[("PATH", "refused:missing")])
    assert (caught.value.step, caught.value.reason) == ("exec", "Permission denied")
    assert "'ctz-data'" in str(caught.value)


async def test_a_command_in_no_entry_is_not_found_though_an_entry_is_no_directory(
    box: Box,
) -> None:
    (box.root / "a-file").write_text("")  # its ENOTDIR, the last, is what execvp would report
    with pytest.raises(SpawnError) as caught:
        await box.spawn(["ctz-no-such-command"], env=[("PATH", f"/bin:{box.root / 'a-file'}")])
    assert (caught.value.step, caught.value.reason) == ("exec", "No such file or directory")


@pytest.mark.parametrize("path", [":/nonexistent", "/nonexistent:", "/nonexistent::/bin"])
async def test_an_empty_path_entry_is_the_cwd(box: Box, path: str) -> None:
    # as both libcs' execvp do: an entry joined to the name with a "/" would look at /ctz-in-cwd
    executable(box.root / "ctz-in-cwd", "#!/bin/sh\necho from-cwd\n")
    status = await box.run(["ctz-in-cwd"], cwd=str(box.root), env=[("PATH", path)])
    assert status is not None and status.exit_code == 0, box.stderr.read_text()
    assert box.stdout.read_text() == "from-cwd\n"


# --- the supervisor itself ------------------------------------------------------------------------


async def test_status_survives_the_process_that_spawned_it(box: Box) -> None:
    helper = box.root / "spawner.py"
    helper.write_text(
        textwrap.dedent(
            """
            import asyncio, json, os, sys
            from adapter.core.confinement import Confinement
            from adapter.supervisor import client as supervisor
            from adapter.supervisor.launch_config import Enforcement, LaunchConfig
            from adapter.supervisor.seccomp import build_program

            async def main() -> None:
                binary, status_file, log = sys.argv[1:]
                enforcement = Enforcement.of(
                    Confinement(), build_program().bpf, own_root=False
                )
                config = LaunchConfig(
                    status_file=status_file, sandbox=os.path.dirname(log),
                    argv=["sh", "-c", "sleep 0.5; exit 7"], enforcement=enforcement,
                )
                handle = await supervisor.Supervisors().spawn(binary, config)
                print(json.dumps(handle.to_json()), flush=True)
                await asyncio.sleep(3600)

            asyncio.run(main())
            """
        )
    )
    spawner = subprocess.Popen(
        [sys.executable, str(helper), box.binary, str(box.status_file), str(box.stdout)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert spawner.stdout is not None
        line = spawner.stdout.readline()
    finally:
        spawner.kill()
        spawner.wait()
        if spawner.stdout is not None:
            spawner.stdout.close()
    handle = SupervisorHandle.from_json(json.loads(line))
    assert supervisor.is_alive(handle), "the supervisor died with its spawner"
    status = await asyncio.wait_for(box.supervisors.wait_exit(handle), 10)
    assert status is not None and status.exit_code == 7


async def test_supervisor_ignores_term_int_and_hup(box: Box) -> None:
    handle = await box.spawn(["sleep", "30"])
    for signo in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        os.kill(handle.supervisor_pid, signo)
    await asyncio.sleep(0.1)
    assert supervisor.is_alive(handle)
    supervisor.kill(handle, signal.SIGKILL)
    status = await box.supervisors.wait_exit(handle)
    assert status is not None and status.signal == 9


async def test_supervisor_killed_records_nothing(box: Box) -> None:
    handle = await box.spawn(["sleep", "30"])
    os.kill(handle.supervisor_pid, signal.SIGKILL)
    assert await box.supervisors.wait_exit(handle) is None  # the caller reports LOST
    supervisor.kill(handle, signal.SIGKILL)  # the orphaned workload is still ours to end

    def workload_gone() -> bool:
        stat = processes.proc_stat(handle.child_pid)
        return stat is None or stat[0] == "Z" or stat[2] != handle.child_start_time

    await wait_until(workload_gone)


async def test_pid_reuse_guard(box: Box) -> None:
    handle = await box.spawn(["sleep", "30"])
    stale = dataclasses.replace(
        handle,
        supervisor_start_time=handle.supervisor_start_time + 1,
        child_start_time=handle.child_start_time + 1,
    )
    assert not supervisor.is_alive(stale)
    supervisor.kill(stale, signal.SIGKILL)  # must not hit the live workload
    assert await asyncio.wait_for(box.supervisors.wait_exit(stale), 2) is None
    assert supervisor.is_alive(handle)
    assert processes.start_time(handle.child_pid) == handle.child_start_time
    supervisor.kill(handle, signal.SIGKILL)
    status = await box.supervisors.wait_exit(handle)
    assert status is not None and status.signal == 9


async def test_waited_supervisor_leaves_no_zombie(box: Box) -> None:
    handle = await box.spawn(["true"])
    await box.supervisors.wait_exit(handle)
    assert processes.start_time(handle.supervisor_pid) != handle.supervisor_start_time


async def test_supervisor_rss_is_under_3_mib(box: Box) -> None:
    handle = await box.spawn(["sleep", "30"])
    try:
        status = Path(f"/proc/{handle.supervisor_pid}/status").read_text()
        rss_kib = int(
            next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]
        )
        print(f"supervisor VmRSS: {rss_kib} KiB")
        assert rss_kib < 3 * 1024
    finally:
        supervisor.kill(handle, signal.SIGKILL)
        await box.supervisors.wait_exit(handle)
