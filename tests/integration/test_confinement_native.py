"""The default confinement, attacked from inside an image container of the native runtime.

Each check reproduces an attack a review found working (a cgroup v1 release_agent run as host
root, a setuid binary giving uid 0 back to `--user nobody`, secrets on a command line, the
sandbox's stdout swapped for a symlink to a host file) or checks one part of the default
(capabilities, masked and read-only paths, the cgroup namespace, /dev, file ownership). The
checks are written once (ConfinementChecks) and run here against the native runtime and in
test_confinement_lxc.py against LXC, each through a real service.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import images_pb2, images_pb2_grpc
from adapter.core.confinement import (
    DEFAULT_CAPABILITIES,
    MASKED_PATHS,
    Confinement,
    capability_mask,
)
from adapter.supervisor import client as supervisor
from adapter.supervisor.launch_config import Enforcement, LaunchConfig
from adapter.supervisor.seccomp import build_program
from tests.conftest import ServiceProcess, require_root
from tests.images import (
    REFERENCE,
    ROOT_SHELL_BUSYBOX,
    ROOT_SHELL_REFERENCE,
    SETTINGS_REFERENCE,
    busybox_oci_layout,
    root_shell_layout,
    settings_image_layout,
)
from tests.integration.api import destroy, wait

pytestmark = pytest.mark.integration

DEFAULT_MASK = f"{capability_mask(DEFAULT_CAPABILITIES):016x}"
HARMLESS_DEVICES = {"null", "zero", "full", "random", "urandom", "tty"}
ALLOW_PRIVILEGED = "allow_privileged = true\n"
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID = grpc.StatusCode.INVALID_ARGUMENT
IMAGE_SETTINGS = {
    "Env": ["PATH=/bin", "GREETING=from-image"],
    "Entrypoint": ["sh", "-c"],
    "Cmd": ["echo $GREETING; pwd; id -u"],
    "WorkingDir": "/srv",
    "User": "nobody",
}


@dataclass
class Node:
    """A service of one runtime with the test images imported: busybox, busybox with a
    setuid-root shell, busybox with settings of its own (IMAGE_SETTINGS)."""

    service: ServiceProcess
    runtime: str

    def import_images(self, workdir: Path) -> None:
        channel = grpc.insecure_channel(self.service.endpoint)
        try:
            stub = images_pb2_grpc.ImagesStub(channel)
            tarballs = (
                busybox_oci_layout(workdir),
                root_shell_layout(workdir),
                settings_image_layout(workdir, IMAGE_SETTINGS),
            )
            for tarball in tarballs:
                list(stub.Import(images_pb2.ImportRequest(path=str(tarball)), timeout=120))
        finally:
            channel.close()

    def launch(
        self,
        container_id: str,
        shell: str = "",
        *,
        argv: tuple[str, ...] = (),
        image: str = REFERENCE,
        user: str = "",
        workdir: str = "",
        env: dict[str, str] | None = None,
        sandbox: str = "",
        privileged: bool = False,
        no_new_privileges: bool = False,
    ) -> pb.LaunchResponse:
        command = pb.CommandInfo(
            shell=shell,
            argv=list(argv),
            user=user,
            working_dir=workdir,
            environment=[pb.EnvironmentVariable(name=k, value=v) for k, v in (env or {}).items()],
        )
        request = pb.LaunchRequest(
            container_id=container_id,
            command=command,
            container=pb.ContainerInfo(runtime=self.runtime, image=image),
            sandbox=sandbox,
            privileged=privileged,
            no_new_privileges=no_new_privileges,
        )
        return self.service.stub().Launch(request, timeout=60)

    def run(self, container_id: str, shell: str, **options: object) -> tuple[int, str]:
        """Launch, wait; (exit code, stdout + stderr)."""
        reply = self.launch(container_id, shell, **options)  # type: ignore[arg-type]
        termination = wait(self.service.stub(), container_id)
        sandbox = Path(reply.status.sandbox)
        output = (sandbox / "stdout").read_text() + (sandbox / "stderr").read_text()
        destroy(self.service.stub(), container_id)
        return termination.exit_code, output


def start_node(workdir: Path, extra_config: str = "") -> ServiceProcess:
    service = ServiceProcess(workdir, extra_config=extra_config)
    service.start()
    return service


def stop_node(service: ServiceProcess) -> None:
    with contextlib.suppress(Exception):
        service.destroy_all()
    service.stop()
    service.remove_cgroup_roots()


def masked_paths_script() -> str:
    """Shell lines printing `masked: PATH` for each masked path of this host's kernel that the
    container sees masked: a file as a character device (/dev/null), a directory empty."""
    lines = []
    for path in MASKED_PATHS:
        if Path(path).is_dir():
            lines.append(f'[ -z "$(ls -A {path})" ] && echo masked: {path}')
        elif Path(path).exists():
            lines.append(f"[ -c {path} ] && echo masked: {path}")
    return "\n".join(lines)


def lines_with(prefix: str, output: str) -> list[str]:
    return [
        line.split(":", 1)[1].strip()
        for line in output.splitlines()
        if line.startswith(f"{prefix}:")
    ]


class ConfinementChecks:
    """The attacks and checks; a subclass provides the `node` fixture of its runtime."""

    def test_release_agent_escape_fails(
        self, node: Node, container_id: str, tmp_path: Path
    ) -> None:
        marker = tmp_path / "escaped"
        hierarchy = f"ctz{uuid.uuid4().hex[:8]}"
        script = f"""
            mkdir -p /tmp/c
            mount -t cgroup -o none,name={hierarchy} cgroup /tmp/c || echo mount-refused
            mkdir /tmp/c/x
            upper=$(sed -n 's/.* - overlay .*upperdir=\\([^,]*\\).*/\\1/p' /proc/self/mountinfo)
            printf '#!/bin/sh\\necho escaped > {marker}\\n' > /agent; chmod 755 /agent
            echo "$upper/agent" > /tmp/c/release_agent
            echo 1 > /tmp/c/x/notify_on_release
            sh -c 'echo $$ > /tmp/c/x/cgroup.procs'
            sleep 1
        """
        _, output = node.run(container_id, script)
        time.sleep(1)  # the kernel runs a release agent asynchronously
        assert "mount-refused" in output
        assert not marker.exists(), output

    def test_setuid_binary_gives_nothing_back_to_nobody(
        self, node: Node, container_id: str
    ) -> None:
        """busybox.conf grants its setuid copy's ash root: with no_new_privs that shell
        cannot become root (busybox then refuses to run it at all)."""
        setuid = ROOT_SHELL_BUSYBOX
        script = f"""
            [ -u {setuid} ] && echo setuid-bit
            {setuid} ash -c 'echo uid:$(id -u); grep CapEff /proc/self/status'
            {setuid} cat /proc/self/status | grep -e CapEff -e NoNewPrivs
        """
        _, output = node.run(container_id, script, image=ROOT_SHELL_REFERENCE, user="nobody")
        assert "setuid-bit" in output  # the image did bring a setuid-root binary
        assert "0" not in lines_with("uid", output), output
        capabilities = lines_with("CapEff", output)
        assert capabilities and set(capabilities) == {"0000000000000000"}
        assert lines_with("NoNewPrivs", output) == ["1"]

    def test_the_images_settings_apply_and_its_command_runs_without_one(
        self, node: Node, container_id: str
    ) -> None:
        code, output = node.run(container_id, "", image=SETTINGS_REFERENCE)
        assert (code, output) == (0, "from-image\n/srv\n65534\n")
        code, output = node.run(f"{container_id}-2", "echo $PATH; pwd", image=SETTINGS_REFERENCE)
        assert (code, output) == (0, "/bin\n/srv\n")

    def test_root_gets_the_default_capabilities_and_no_namespaces_or_mounts(
        self, node: Node, container_id: str
    ) -> None:
        script = (
            "grep -e CapEff -e CapBnd -e Seccomp: /proc/self/status;"
            " busybox unshare -U true || echo no-userns;"
            " busybox unshare -m true || echo no-mountns;"
            " mount -t tmpfs none /mnt || echo no-mount"
        )
        _, output = node.run(container_id, script)
        assert lines_with("CapEff", output) == [DEFAULT_MASK], output
        assert lines_with("CapBnd", output) == [DEFAULT_MASK]
        assert lines_with("Seccomp", output) == ["2"]  # a filter is loaded
        for refused in ("no-userns", "no-mountns", "no-mount"):
            assert refused in output

    def test_root_gets_no_new_privs_on_request(self, node: Node, container_id: str) -> None:
        script = "grep NoNewPrivs /proc/self/status"
        _, by_default = node.run(container_id, script)
        _, requested = node.run(f"{container_id}-2", script, no_new_privileges=True)
        assert (lines_with("NoNewPrivs", by_default), lines_with("NoNewPrivs", requested)) == (
            ["0"],
            ["1"],
        )

    def test_kernel_paths_are_masked_or_read_only(self, node: Node, container_id: str) -> None:
        script = f"""
            {masked_paths_script()}
            [ -e /proc/kcore ] && [ ! -c /proc/kcore ] && echo kcore-readable
            (cat /proc/sys/kernel/domainname > /proc/sys/kernel/domainname) 2>/dev/null \\
                || echo proc-sys-read-only
            awk '$5 == "/sys" {{print "sys:" substr($6, 1, 2)}}' /proc/self/mountinfo
            awk '$5 ~ "^/sys/fs/cgroup" {{top[$5] = substr($6, 1, 2)}}
                 END {{for (point in top) print "cgroupfs:" top[point]}}' /proc/self/mountinfo
            mkdir /sys/fs/cgroup/memory/escape 2>/dev/null || echo cgroupfs-read-only
            touch /sys/fs/cgroup/file 2>/dev/null || echo cgroup-tmpfs-read-only
            echo cgroup:$(cut -d: -f3 /proc/self/cgroup | sort -u)
            for f in /dev/* /dev/*/*; do
                [ ! -L $f ] && [ -c $f -o -b $f ] && echo device:${{f#/dev/}}
            done
        """
        _, output = node.run(container_id, script)
        assert "kcore-readable" not in output and "proc-sys-read-only" in output, output
        assert lines_with("masked", output) == [
            path for path in MASKED_PATHS if Path(path).exists()
        ]
        assert lines_with("sys", output) == ["ro"]
        cgroupfs = lines_with("cgroupfs", output)
        assert len(cgroupfs) > 1 and set(cgroupfs) == {"ro"}  # the hierarchies and their tmpfs
        assert "cgroupfs-read-only" in output and "cgroup-tmpfs-read-only" in output
        assert lines_with("cgroup", output) == ["/"]  # the namespace's root: its own cgroups
        devices = set(lines_with("device", output)) - {"pts/ptmx"}
        assert devices <= HARMLESS_DEVICES, devices

    def test_secrets_are_on_no_command_line(self, node: Node, container_id: str) -> None:
        secret = f"s3cret-{uuid.uuid4().hex}"
        node.launch(container_id, "sleep 60", env={"DB_PASSWORD": secret})
        try:
            found = []
            for entry in Path("/proc").iterdir():
                with contextlib.suppress(OSError):
                    if entry.name.isdigit() and secret.encode() in (entry / "cmdline").read_bytes():
                        found.append(entry.name)
            assert found == []
        finally:
            destroy(node.service.stub(), container_id)

    def test_a_symlinked_stdout_never_leads_a_later_launch_out(
        self, node: Node, container_id: str, tmp_path: Path
    ) -> None:
        victim = tmp_path / "victim"
        victim.write_text("host data\n")
        victim.chmod(0o600)
        sandbox = tmp_path / "sandbox"
        sandbox.mkdir()
        swap = f"rm $MESOS_SANDBOX/stdout; ln -s {victim} $MESOS_SANDBOX/stdout"
        node.launch(container_id, swap, sandbox=str(sandbox))
        assert wait(node.service.stub(), container_id).exit_code == 0
        destroy(node.service.stub(), container_id)
        assert (sandbox / "stdout").is_symlink()
        second = f"{container_id}-2"
        with pytest.raises(grpc.RpcError) as refused:
            node.launch(second, "echo overwritten", sandbox=str(sandbox))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "stdout" in (refused.value.details() or "")
        assert victim.read_text() == "host data\n"
        assert victim.stat().st_mode & 0o7777 == 0o600

    def test_the_containers_user_owns_its_sandbox(self, node: Node, container_id: str) -> None:
        reply = node.launch(container_id, "echo out; echo err >&2", user="65534")
        assert wait(node.service.stub(), container_id).exit_code == 0
        sandbox = Path(reply.status.sandbox)
        try:
            owned = [
                (path.name, path.stat().st_uid, path.stat().st_gid, path.stat().st_mode & 0o7777)
                for path in (sandbox, sandbox / "stdout", sandbox / "stderr")
            ]
            assert owned == [
                (sandbox.name, 65534, 65534, 0o750),
                ("stdout", 65534, 65534, 0o640),
                ("stderr", 65534, 65534, 0o640),
            ]
        finally:
            destroy(node.service.stub(), container_id)

    @pytest.mark.parametrize(
        ("options", "step", "reason", "code"),
        [
            ({"argv": ("/no/such/binary",)}, "exec", "No such file or directory", PRECONDITION),
            # resolved by the service from the image's /etc/passwd, before anything starts
            ({"shell": "true", "user": "no-such-user"}, "command.user", "no such user", INVALID),
            ({"shell": "true", "workdir": "/no/such/dir"}, "cwd", "No such file", PRECONDITION),
        ],
    )
    def test_a_requests_mistake_is_a_failed_precondition(
        self,
        node: Node,
        container_id: str,
        options: dict[str, object],
        step: str,
        reason: str,
        code: grpc.StatusCode,
    ) -> None:
        with pytest.raises(grpc.RpcError) as error:
            node.launch(container_id, **options)  # type: ignore[arg-type]
        assert error.value.code() == code
        assert f"{step}: " in (error.value.details() or "") and reason in error.value.details()
        status = node.service.stub().Status(pb.StatusRequest(container_id=container_id))
        assert status.termination.reason == pb.LAUNCH_FAILED

    def test_200000_arguments_do_not_crash_the_supervisor(
        self, node: Node, container_id: str
    ) -> None:
        try:
            node.launch(container_id, argv=("true", *["x"] * 200_000))
        except grpc.RpcError as error:  # refused with a reason, never an internal crash
            assert error.code() != grpc.StatusCode.INTERNAL, error.details()
            return
        assert wait(node.service.stub(), container_id).exit_code == 0
        destroy(node.service.stub(), container_id)

    def test_runtimes_shows_what_is_enforced(self, node: Node) -> None:
        runtimes = node.service.stub().Runtimes(pb.RuntimesRequest(), timeout=30).runtimes
        ours = next(runtime for runtime in runtimes if runtime.name == node.runtime)
        assert ours.healthy and ours.confinement == Confinement().summary()

    def test_privileged_needs_the_node_to_allow_it(self, node: Node, container_id: str) -> None:
        with pytest.raises(grpc.RpcError) as refused:
            node.launch(container_id, "true", privileged=True)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    def test_a_privileged_container_has_every_capability_and_may_mount(
        self, privileged_node: Node, container_id: str
    ) -> None:
        script = "grep CapEff /proc/self/status; mount -t tmpfs none /mnt && echo mounted"
        code, output = privileged_node.run(container_id, script, privileged=True)
        ours = lines_with("CapEff", Path("/proc/self/status").read_text())
        assert code == 0, output
        assert lines_with("CapEff", output) == ours
        assert "mounted" in output


@pytest.fixture(scope="module")
def native_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    require_root()
    workdir = tmp_path_factory.mktemp("confinement-native")
    service = start_node(workdir)
    try:
        node = Node(service, "native")
        node.import_images(workdir)
        yield node
    finally:
        stop_node(service)


@pytest.fixture
def native_privileged_node(tmp_path: Path) -> Iterator[Node]:
    require_root()
    service = start_node(tmp_path, ALLOW_PRIVILEGED)
    try:
        node = Node(service, "native")
        node.import_images(tmp_path)
        yield node
    finally:
        stop_node(service)


class TestNativeConfinement(ConfinementChecks):
    @pytest.fixture
    def node(self, native_node: Node) -> Node:
        return native_node

    @pytest.fixture
    def privileged_node(self, native_privileged_node: Node) -> Node:
        return native_privileged_node

    def test_a_launch_without_an_image_is_confined_too(self, node: Node, container_id: str) -> None:
        script = "grep -e CapEff -e Seccomp: /proc/self/status; mount -t tmpfs none /mnt || echo no"
        _, output = node.run(container_id, script, image="")
        assert lines_with("CapEff", output) == [DEFAULT_MASK], output
        assert lines_with("Seccomp", output) == ["2"]
        assert "no" in output.splitlines()


# --- the supervisor itself, past the service's edge (which refuses an argv over ARG_MAX) ---


def direct_config(tmp_path: Path, argv: list[str]) -> LaunchConfig:
    enforcement = Enforcement.of(Confinement(), build_program().bpf, own_root=False)
    status_file = str(tmp_path / "status")
    return LaunchConfig(status_file, str(tmp_path), argv, enforcement)


async def test_200000_arguments_reach_the_supervisor_without_crashing_it(tmp_path: Path) -> None:
    """Its arrays are on the heap, sized by what came (on its stack they overflowed it)."""
    require_root()
    binary = supervisor.find_supervisor(None)
    config = direct_config(tmp_path, ["true", *["x"] * 200_000])
    supervisors = supervisor.Supervisors()
    try:
        handle = await supervisors.spawn(binary, config)
    except supervisor.SpawnError as error:  # execve's own limit: a clear error, not SIGSEGV
        assert (error.step, error.reason) == ("exec", "Argument list too long"), error
        return
    status = await supervisors.wait_exit(handle)
    assert status is not None and status.exit_code == 0


async def test_a_configuration_past_the_bound_is_refused(tmp_path: Path) -> None:
    require_root()
    binary = supervisor.find_supervisor(None)
    config = direct_config(tmp_path, ["true", "x" * (17 << 20)])
    with pytest.raises(supervisor.SpawnError) as refused:
        await supervisor.Supervisors().spawn(binary, config)
    assert refused.value.step == "args" and "larger than 16 MiB" in refused.value.reason
