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
and their QEMUs run on (they have a session of their own), and so do the services. So `start()`
first sweeps what dead runs left, then records this daemon's work directory as its run's
(tests/run_records.py, the mechanism every test session uses): libvirtd and virtlogd name that
directory on their command lines, QEMU runs below them, and the services' cgroups carry the run
id. A benchmark, which is no pytest session, is covered the same way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.cgroup_roots import remove_cgroup_trees
from tests.conftest import ServiceProcess, require, require_root
from tests.run_records import RunRecord, sweep_dead_runs

KERNEL = Path(
    os.environ.get("CONTAINERIZER_VM_KERNEL", "/var/lib/containerizer/libvirt/kernel/vmlinuz")
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


class PrivateLibvirtd:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.socket = workdir / "sock" / "libvirt-sock"
        self.uri = f"qemu+unix:///system?socket={self.socket}"
        self.log_path = workdir / "libvirtd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.record: RunRecord | None = None
        self.cgroups_roots: list[str] = []

    def register(self, service: ServiceProcess) -> ServiceProcess:
        """Note a service that uses this daemon, so its cgroups (libvirt's partitions among
        them) go when the daemon stops."""
        self.cgroups_roots.append(service.cgroups_root)
        return service

    def start(self, timeout: float = 60.0) -> None:
        sweep_dead_runs()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.record = RunRecord([self.workdir])
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
        for root in self.cgroups_roots:
            remove_cgroup_trees(root, f"{root}.*")  # libvirt's <root>.partition groups
        self.cgroups_roots.clear()
        if self.record is not None:
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
