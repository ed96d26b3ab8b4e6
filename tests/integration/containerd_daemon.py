"""A private containerd for the tests and the benchmark: own root, state, config and socket under
a temporary directory, started and stopped by its owner (a session fixture, or the benchmark).

The config is `containerd config default` with the paths that would touch the system's
containerd (root, state, grpc address, the opt plugin's path) moved under the temporary
directory, and the CRI plugin (and the snapshotters this host cannot use) disabled so it starts
fast. Values are written as JSON strings, which TOML reads as the same basic strings.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from tests.cgroup_roots import remove_cgroup_trees
from tests.run_records import run_scoped_tempdir, unmount_below

DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.internal.v1.tracing",
)


def containerd_available() -> str | None:
    """Why a private containerd cannot run here, or None when it can."""
    for binary in ("containerd", "ctr", "containerd-shim-runc-v2", "runc"):
        if shutil.which(binary) is None:
            return f"{binary} is not installed (Debian packages containerd, runc)"
    if os.geteuid() != 0:
        return "containerd needs root"
    return None


def private_config(default: str, workdir: Path) -> str:
    """`containerd config default` with every system path replaced by one under `workdir`."""
    replacements = {
        r"^disabled_plugins = .*$": f"disabled_plugins = {json.dumps(list(DISABLED_PLUGINS))}",
        r"^root = .*$": f"root = {json.dumps(str(workdir / 'root'))}",
        r"^state = .*$": f"state = {json.dumps(str(workdir / 'state'))}",
        r'^(\s*)address = "/run/containerd/containerd.sock"$': (
            rf"\1address = {json.dumps(str(workdir / 'containerd.sock'))}"
        ),
        r'^(\s*)path = "/opt/containerd"$': rf"\1path = {json.dumps(str(workdir / 'opt'))}",
    }
    text = default
    for pattern, replacement in replacements.items():
        text, count = re.subn(pattern, replacement, text, count=1, flags=re.MULTILINE)
        if count != 1:
            raise RuntimeError(f"containerd config default has no line matching {pattern!r}")
    return text


class ContainerdDaemon:
    def __init__(self, workdir: Path, launcher: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        # A command that runs containerd (its last arguments) in a changed view of the host.
        self.launcher = launcher
        self.socket = workdir / "containerd.sock"
        self.address = str(self.socket)
        self.log_path = workdir / "containerd.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        default = subprocess.run(
            ["containerd", "config", "default"], check=True, capture_output=True, text=True
        ).stdout
        config = self.workdir / "config.toml"
        config.write_text(private_config(default, self.workdir))
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*self.launcher, "containerd", "--config", str(config)],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"containerd exited at start:\n{self.log_path.read_text()}")
            if self.socket.exists() and self.ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"containerd did not come up:\n{self.log_path.read_text()}")

    def ctr(
        self, *args: str, namespace: str = "default", check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", "--address", self.address, "--namespace", namespace, *args],
            check=check,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def lines(self, *args: str, namespace: str) -> list[str]:
        """`ctr ... ls -q`-style output as a list of names."""
        return self.ctr(*args, namespace=namespace).stdout.split()

    def remove_namespace(self, namespace: str) -> None:
        """Whatever a test left in `namespace`: tasks, containers, images, leases; then the
        namespace itself (snapshots and content go with the garbage collector)."""
        for container in self.lines("containers", "ls", "-q", namespace=namespace):
            self.ctr(
                "tasks", "kill", "-a", "-s", "KILL", container, namespace=namespace, check=False
            )
            self.ctr("tasks", "delete", "-f", container, namespace=namespace, check=False)
            self.ctr("containers", "delete", container, namespace=namespace, check=False)
        for image in self.lines("images", "ls", "-q", namespace=namespace):
            self.ctr("images", "rm", "--sync", image, namespace=namespace, check=False)
        for lease in self.lines("leases", "ls", "-q", namespace=namespace):
            self.ctr("leases", "rm", "--sync", lease, namespace=namespace, check=False)
        self.ctr("namespaces", "remove", namespace, check=False)
        # `ctr run` puts a task at runc's default /<namespace>/<id>: the parent stays behind.
        remove_cgroup_trees(namespace)

    def stop(self) -> None:
        """Terminate, then kill; then kill the shims it left and undo its mounts."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._kill_shims()
        unmount_below(self.workdir)

    def _kill_shims(self) -> None:
        """Shims of this daemon carry its socket path in their command line."""
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if (
                    argv
                    and argv[0].endswith(b"containerd-shim-runc-v2")
                    and (self.address.encode() in argv)
                ):
                    os.kill(int(proc.name), signal.SIGKILL)


class SharedDaemon:
    """One private containerd per test process (xdist worker), shared by the session fixtures
    of every containerd test module: the first acquire starts it, the last release stops it."""

    def __init__(self) -> None:
        self.daemon: ContainerdDaemon | None = None
        self.users = 0

    def acquire(self, workdir_factory: Callable[[], Path]) -> ContainerdDaemon:
        if self.daemon is None:
            daemon = ContainerdDaemon(_searchable_workdir() or workdir_factory())
            try:
                daemon.start()
            except BaseException:
                daemon.stop()
                raise
            self.daemon = daemon
        self.users += 1
        return self.daemon

    def release(self) -> None:
        self.users -= 1
        if self.users == 0 and self.daemon is not None:
            self.daemon.stop()
            if user_namespace_mode():
                shutil.rmtree(self.daemon.workdir, ignore_errors=True)
            self.daemon = None


def user_namespace_mode() -> bool:
    """CTZ_TEST_USER_NAMESPACE=1 runs the suites with user namespaces as the services'
    default (tests/conftest.py's ServiceProcess)."""
    return os.environ.get("CTZ_TEST_USER_NAMESPACE") == "1"


def _searchable_workdir() -> Path | None:
    """In user namespace mode, a run-scoped directory every user may search (0711, swept by a
    later run if this one is killed): runc mounts the rootfs from inside the container's user
    namespace, as an unprivileged host uid, through the path to containerd's state, and
    pytest's temporary directories are 0700."""
    if not user_namespace_mode():
        return None
    workdir = run_scoped_tempdir("ctz-containerd")
    workdir.chmod(0o711)
    return workdir


SHARED = SharedDaemon()


def containerd_config(daemon: ContainerdDaemon, namespace: str, runtime_binary: str = "") -> str:
    """The TOML a ServiceProcess needs to run the containerd runtime against `daemon`."""
    table = {"address": daemon.address, "namespace": namespace}
    if runtime_binary:
        table["runtime_binary"] = runtime_binary
    lines = [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    return "[runtimes.native]\n[runtimes.containerd]\n" + "\n".join(lines) + "\n"


def import_image(endpoint: str, tarball: Path) -> list[str]:
    """Import a tarball through the service's Images API; the references it held."""
    from adapter.api.containerizer.v1 import images_pb2, images_pb2_grpc

    with grpc.insecure_channel(endpoint) as channel:
        images = images_pb2_grpc.ImagesStub(channel)
        replies = images.Import(images_pb2.ImportRequest(path=str(tarball)), timeout=120)
        return [reply.image.reference for reply in replies if reply.HasField("image")]
