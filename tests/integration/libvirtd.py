"""A private libvirtd (and its virtlogd) for tests and benchmarks, isolated from any system one.

Both run as root in a mount namespace of their own, where
- /dev/kvm is masked by an empty file on a read-only bind mount: on this host KVM guests hang,
  and libvirtd re-probes QEMU on every domain start (~30-45 s) for as long as it finds /dev/kvm
  accessible while its cached capabilities say KVM does not work. /dev/null over it is not
  enough when QEMU runs as root: root may always open a device node, but access(W_OK) on a
  regular file of a read-only mount fails (EROFS) even for root, which is what libvirt checks;
- /run/libvirt, /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt are private
  directories under the daemon's work directory, so two daemons (two xdist workers) never share
  state, sockets or pid files;
- /etc/libvirt/qemu.conf is a private file: QEMU runs as root, because the pytest temporary
  directories that hold kernels, initrds and serial files are not traversable by libvirt-qemu;
  and without a private /dev per QEMU (`namespaces = []`), which libvirt cannot build around
  the /dev/kvm mount above.

libvirtd runs under a child subreaper (REAPER): QEMU daemonizes, so when it exits it is reaped
by the nearest subreaper, else by PID 1. This machine's PID 1 reaps orphans only every ~2 s, and
libvirt's destroy polls kill(pid, 0) until the zombie is gone, so every stop of a domain took
~2 s longer here than under systemd, which reaps at once.

The client socket lives in the work directory (visible outside the namespace); `uri` points at
it. `stop()` destroys what is left of our domains, then terminates the process group (libvirtd
and virtlogd), then kills it, then removes the cgroups of the services that used it (libvirt's
`<cgroups_root>.partition` groups).

A run killed halfway (kill -9 of pytest or a benchmark) leaves all of that behind: the daemons
and their QEMUs run on (they have a session of their own), and so do the services. So each run
keeps a record in REGISTRY: a lock file it holds (flock) for as long as it lives, beside a JSON
file naming its work directory and its services' configs and cgroup roots. `start()` first
sweeps the records whose lock nobody holds: their runs are dead, and what they name is ended and
removed. A concurrent run holds its lock, so its daemon and guests are never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.cgroup_roots import remove_cgroup_trees
from tests.conftest import ServiceProcess, require, require_root

KERNEL = Path(
    os.environ.get("CONTAINERIZER_VM_KERNEL", "/var/lib/containerizer/libvirt/kernel/vmlinuz")
)
# Where runs record their daemons and services; /run is emptied by a reboot, as are cgroups.
REGISTRY = Path(
    os.environ.get("CONTAINERIZER_TEST_LIBVIRT_REGISTRY", "/run/containerizer-tests/libvirt")
)

# PR_SET_CHILD_SUBREAPER, then run argv and reap every child (ours and orphans) as it exits.
REAPER = r"""
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
child = os.fork()
if child == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
while True:
    pid, status = os.wait()
    if pid == child:
        sys.exit(os.waitstatus_to_exitcode(status))
"""

# The namespace setup, run by `unshare -m`; paths arrive as arguments, never pasted in.
NAMESPACE_SCRIPT = r"""
set -eu
work=$1
python=$2
reaper=$3
mount --make-rprivate /
if [ -e /dev/kvm ]; then
    : > "$work/kvm-masked"
    mount --bind "$work/kvm-masked" /dev/kvm
    mount -o remount,bind,ro /dev/kvm
fi
mkdir -p /run/libvirt
for dir in run lib log cache; do mkdir -p "$work/$dir"; done
mount --bind "$work/run" /run/libvirt
mount --bind "$work/lib" /var/lib/libvirt
mount --bind "$work/log" /var/log/libvirt
mount --bind "$work/cache" /var/cache/libvirt
mount --bind "$work/qemu.conf" /etc/libvirt/qemu.conf
virtlogd -p "$work/virtlogd.pid" &
exec "$python" -c "$reaper" libvirtd -f "$work/libvirtd.conf" -p "$work/libvirtd.pid"
"""

LIBVIRTD_CONF = """\
unix_sock_dir = "{sock_dir}"
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:{log}"
"""

QEMU_CONF = """\
user = "root"
group = "root"
namespaces = []
"""


def missing_components() -> list[str]:
    """What this host lacks to run a private libvirtd with QEMU guests."""
    missing = [
        tool
        for tool in ("libvirtd", "virtlogd", "qemu-system-x86_64", "unshare")
        if shutil.which(tool) is None
    ]
    with contextlib.suppress(ImportError):
        import libvirt  # noqa: F401

        return missing
    return [*missing, "libvirt-python"]


class RunRecord:
    """This run's entry in REGISTRY: `<id>.lock`, flocked while the run lives, and `<id>.json`
    with the daemon's work directory and the services using it."""

    def __init__(self, workdir: Path, registry: Path = REGISTRY) -> None:
        registry.mkdir(parents=True, exist_ok=True)
        name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = registry / f"{name}.json"
        self.lock_path = registry / f"{name}.lock"
        self._data: dict[str, Any] = {"workdir": str(workdir), "services": []}
        self._write()
        # Locked under a temporary name, then renamed: a sweeper never sees it unlocked.
        partial = registry / f".{name}.lock"
        self._lock = os.open(partial, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        partial.rename(self.lock_path)

    def add_service(self, service: ServiceProcess) -> None:
        entry = {"config": str(service.config_path), "cgroups_root": service.cgroups_root}
        self._data["services"].append(entry)
        self._write()

    def cgroups_roots(self) -> list[str]:
        return [entry["cgroups_root"] for entry in self._data["services"]]

    def _write(self) -> None:
        partial = self.path.with_suffix(".tmp")
        partial.write_text(json.dumps(self._data))
        partial.replace(self.path)

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        self.lock_path.unlink(missing_ok=True)
        os.close(self._lock)


def sweep_stale_runs(registry: Path = REGISTRY) -> list[str]:
    """End and remove what runs that died halfway left (their locks are free): their services,
    their daemons with every QEMU below them, and their services' cgroups. Returns the records
    swept."""
    swept: list[str] = []
    for lock_path in sorted(registry.glob("*.lock")):
        try:
            descriptor = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # swept by a concurrent sweeper
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its run is alive
            record = lock_path.with_suffix(".json")
            try:
                data = json.loads(record.read_text())
            except (OSError, ValueError):
                data = {}
            _end_run(data)
            record.unlink(missing_ok=True)
            lock_path.unlink(missing_ok=True)
            swept.append(record.name)
        finally:
            os.close(descriptor)
    return swept


def _end_run(data: dict[str, Any]) -> None:
    services = [entry for entry in data.get("services", []) if isinstance(entry, dict)]
    marks = [["--config", str(entry.get("config"))] for entry in services]
    workdir = data.get("workdir")
    if workdir:
        marks += [["-f", f"{workdir}/libvirtd.conf"], ["-p", f"{workdir}/virtlogd.pid"]]
    doomed: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any(_has_pair(cmdline, mark) for mark in marks):
            with contextlib.suppress(psutil.Error):
                for member in [process, *process.children(recursive=True)]:
                    doomed[member.pid] = member  # QEMU is below the daemon's child reaper
    for process in doomed.values():
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(list(doomed.values()), timeout=10)
    for entry in services:
        root = str(entry.get("cgroups_root", ""))
        if root.startswith("ctz-"):  # never a glob that could match someone else's
            remove_cgroup_trees(root, f"{root}.*")


def _has_pair(cmdline: list[str], pair: list[str]) -> bool:
    return any(cmdline[i : i + 2] == pair for i in range(len(cmdline) - 1))


class PrivateLibvirtd:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.socket = workdir / "sock" / "libvirt-sock"
        self.uri = f"qemu+unix:///system?socket={self.socket}"
        self.log_path = workdir / "libvirtd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.record: RunRecord | None = None

    def register(self, service: ServiceProcess) -> ServiceProcess:
        """Note a service that uses this daemon, so its cgroups go when the daemon stops, or
        when the next run sweeps after this one was killed."""
        assert self.record is not None, "start the daemon before its services"
        self.record.add_service(service)
        return service

    def start(self, timeout: float = 60.0) -> None:
        sweep_stale_runs()
        self.record = RunRecord(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "sock").mkdir(exist_ok=True)
        (self.workdir / "libvirtd.conf").write_text(
            LIBVIRTD_CONF.format(sock_dir=self.socket.parent, log=self.log_path)
        )
        (self.workdir / "qemu.conf").write_text(QEMU_CONF)
        self.socket.unlink(missing_ok=True)  # never mistake a stale daemon for ours
        with (self.workdir / "daemon.out").open("ab") as out:
            self.process = subprocess.Popen(
                [
                    *("unshare", "-m", "--", "sh", "-c", NAMESPACE_SCRIPT, "sh"),
                    *(str(self.workdir), sys.executable, REAPER),
                ],
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self._output()
                self.stop()
                raise RuntimeError(f"libvirtd exited at start: {output}")
            if self.socket.exists() and self._answers() and self.process.poll() is None:
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"libvirtd did not come up: {self._output()}")

    def _answers(self) -> bool:
        import libvirt

        try:
            connection = libvirt.open(self.uri)
        except libvirt.libvirtError:
            return False
        connection.close()
        return True

    def _output(self) -> str:
        return (self.workdir / "daemon.out").read_text(errors="replace")[-4000:]

    def destroy_domains(self, prefix: str = "containerizer-") -> None:
        import libvirt

        with contextlib.suppress(libvirt.libvirtError):
            connection = libvirt.open(self.uri)
            try:
                for domain in connection.listAllDomains():
                    if domain.name().startswith(prefix):
                        with contextlib.suppress(libvirt.libvirtError):
                            domain.destroy()
            finally:
                connection.close()

    def stop(self) -> None:
        if self.process is None:
            return
        self.destroy_domains()
        below: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):  # QEMUs of other domains: below the reaper
            below = psutil.Process(self.process.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        virtlogd = self.workdir / "virtlogd.pid"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _running(virtlogd):
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever is left of the group
        for process in below:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(below, timeout=10)
        self.process = None
        if self.record is not None:
            for root in self.record.cgroups_roots():
                remove_cgroup_trees(root, f"{root}.*")  # libvirt's <root>.partition groups
            self.record.release()
            self.record = None


def _running(pid_file: Path) -> bool:
    """Whether the process named by the pid file still runs (a zombie has ended)."""
    try:
        pid = int(pid_file.read_text().strip() or 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return False
    return pid > 0 and state != "Z"


_shared: dict[str, PrivateLibvirtd | int | None] = {"daemon": None, "users": 0}


@pytest.fixture(scope="session")
def libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateLibvirtd]:
    """One private libvirtd (with its virtlogd) per xdist worker. Each test module that imports
    this fixture gets a definition of its own; the count makes them share one daemon, stopped
    when the last of them is torn down."""
    require_root()
    missing = missing_components()
    require(not missing, f"libvirt runtime needs {', '.join(missing)}")
    require(
        KERNEL.is_file(), f"no guest kernel at {KERNEL}: run deploy/vm-kernel.sh {KERNEL.parent}"
    )
    if _shared["daemon"] is None:
        daemon = PrivateLibvirtd(tmp_path_factory.mktemp("libvirtd"))
        daemon.start()
        _shared["daemon"] = daemon
    daemon = _shared["daemon"]
    assert isinstance(daemon, PrivateLibvirtd)
    _shared["users"] = int(_shared["users"] or 0) + 1
    try:
        yield daemon
    finally:
        _shared["users"] = int(_shared["users"] or 0) - 1
        if _shared["users"] == 0:
            _shared["daemon"] = None
            daemon.stop()


def libvirt_service(
    daemon: PrivateLibvirtd,
    workdir: Path,
    virt_type: str = "qemu",
    extra_config: str = "",
    kernel: Path = KERNEL,
) -> ServiceProcess:
    """A service (not started) whose default runtime is libvirt on `daemon`, registered with
    it; `extra_config` may add `[runtimes.libvirt]` keys and more tables."""
    config = libvirt_config(daemon, virt_type, kernel) + extra_config
    workdir.mkdir(parents=True, exist_ok=True)
    return daemon.register(ServiceProcess(workdir, extra_config=config))


def libvirt_config(daemon: PrivateLibvirtd, virt_type: str = "qemu", kernel: Path = KERNEL) -> str:
    """The service config lines that make libvirt (on `daemon`) the default runtime; more
    `[runtimes.libvirt]` keys may follow."""
    return (
        'default_runtime = "libvirt"\n'
        "[runtimes.libvirt]\n"
        f'uri = "{daemon.uri}"\n'
        f'kernel = "{kernel}"\n'
        f'virt_type = "{virt_type}"\n'
    )
