"""The service's edge as an attacker on the node meets it: the TCP listener takes only clients
with our certificate, other users read none of the state (records hold secrets), a launch cannot
take over another container's sandbox, and one state directory has one service."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from tests.conftest import ServiceProcess, require, require_root
from tests.integration.api import destroy, launch, serve_expecting_refusal
from tests.integration.tls import Certificates, make_certificates
from tests.run_records import run_scoped_tempdir

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).parent / "containerizer")
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
SECRET = "hunter2-db-password"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *command], capture_output=True, text=True, timeout=30)


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "tls")


@pytest.fixture
def tls_service(tmp_path: Path, certificates: Certificates) -> Iterator[tuple[ServiceProcess, str]]:
    require_root()
    address = f"127.0.0.1:{free_port()}"
    (tmp_path / "node").mkdir()
    service = ServiceProcess(tmp_path / "node", extra_config=certificates.service_config(address))
    service.start()
    yield service, address
    _stop(service)


def _stop(service: ServiceProcess) -> None:
    with contextlib.suppress(Exception):
        if service.process and service.process.poll() is None:
            service.destroy_all()
    service.stop()
    service.remove_cgroup_roots()


# ---- the TCP listener ----


def test_tcp_listener_without_client_certificates_does_not_start(tmp_path: Path) -> None:
    require_root()
    service = ServiceProcess(tmp_path, extra_config=f'listen = "127.0.0.1:{free_port()}"')
    output = serve_expecting_refusal(service.config_path)
    assert "listen: a TCP listener needs mutual TLS" in output
    assert "tls_cert, tls_key, tls_client_ca" in output
    assert "Traceback" not in output
    service.remove_cgroup_roots()


def test_tcp_listener_takes_only_clients_with_our_certificate(
    tls_service: tuple[ServiceProcess, str], certificates: Certificates
) -> None:
    service, address = tls_service
    refused = [
        grpc.insecure_channel(address),  # plain TCP, as the reviewer's uid 65534 did
        certificates.channel(address, cert=None, key=None),  # TLS, but no client certificate
        certificates.channel(  # a client certificate from a CA the service does not trust
            address, cert=certificates.stranger_cert, key=certificates.stranger_key
        ),
    ]
    for channel in refused:
        with channel, pytest.raises(grpc.RpcError) as error:
            pb_grpc.ContainerizerStub(channel).Launch(
                pb.LaunchRequest(container_id="intruder", command=pb.CommandInfo(shell="true")),
                timeout=10,
            )
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError):
        service.stub().Status(pb.StatusRequest(container_id="intruder"), timeout=10)
    good = certificates.channel(address, cert=certificates.client_cert, key=certificates.client_key)
    with good:
        runtimes = pb_grpc.ContainerizerStub(good).Runtimes(pb.RuntimesRequest(), timeout=10)
    assert [r.name for r in runtimes.runtimes] == ["native"]


def test_cli_reaches_the_tcp_listener_with_its_certificate(
    tls_service: tuple[ServiceProcess, str], certificates: Certificates
) -> None:
    _, address = tls_service
    flags = [
        "--tls-cert", str(certificates.client_cert),
        "--tls-key", str(certificates.client_key),
        "--tls-ca", str(certificates.ca),
    ]  # fmt: skip
    by_flags = subprocess.run(
        [CLI, "--endpoint", address, *flags, "runtimes"], capture_output=True, text=True
    )
    assert by_flags.returncode == 0, by_flags.stderr
    assert "native" in by_flags.stdout
    environment = {
        **os.environ,
        "CONTAINERIZER_TLS_CERT": str(certificates.client_cert),
        "CONTAINERIZER_TLS_KEY": str(certificates.client_key),
        "CONTAINERIZER_TLS_CA": str(certificates.ca),
    }
    by_environment = subprocess.run(
        [CLI, "--endpoint", address, "ps"], capture_output=True, text=True, env=environment
    )
    assert by_environment.returncode == 0, by_environment.stderr
    without = subprocess.run([CLI, "--endpoint", address, "ps"], capture_output=True, text=True)
    assert without.returncode != 0
    assert "--tls-cert, --tls-key, --tls-ca" in without.stderr


# ---- file modes: what another local user can read ----


@pytest.fixture
def open_workdir() -> Iterator[Path]:
    """A work directory every user may traverse (pytest's tmp_path is 0700 and would hide the
    modes under test), removed afterwards."""
    require_root()
    require(shutil.which("setpriv") is not None, "needs setpriv (util-linux)")
    workdir = run_scoped_tempdir("ctz-edge")  # named with the run id: swept if it is killed
    workdir.chmod(0o755)
    yield workdir
    shutil.rmtree(workdir, ignore_errors=True)


def test_other_users_read_no_state(open_workdir: Path, container_id: str) -> None:
    service = ServiceProcess(open_workdir)
    service.start()
    try:
        stub = service.stub()
        stub.Launch(
            pb.LaunchRequest(
                container_id=container_id,
                command=pb.CommandInfo(
                    shell="sleep 300",
                    environment=[pb.EnvironmentVariable(name="DB_PASSWORD", value=SECRET)],
                ),
            ),
            timeout=30,
        )
        state = service.state_dir
        run_dir = state / "native" / container_id
        modes = {
            path: stat.S_IMODE(os.stat(path).st_mode)
            for path in (state, state / "state.db", state / "sandboxes", run_dir)
        }
        assert modes == {
            state: 0o711,
            state / "state.db": 0o600,
            state / "sandboxes": 0o711,
            run_dir: 0o700,
        }
        for suffix in ("-wal", "-shm"):
            assert stat.S_IMODE(os.stat(f"{state}/state.db{suffix}").st_mode) == 0o600
        for reader in (
            ["cat", f"{state}/state.db"],
            ["cat", f"{state}/state.db-wal"],
            ["ls", str(state)],
            ["ls", str(run_dir)],
            ["ls", f"{state}/sandboxes"],
        ):
            result = as_nobody(*reader)
            assert result.returncode != 0 and SECRET not in result.stdout, reader
            assert "Permission denied" in result.stderr, reader
        connect = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"
        refused = as_nobody("/usr/bin/python3", "-c", connect, str(service.socket))
        assert "PermissionError" in refused.stderr
        destroy(stub, container_id)
    finally:
        _stop(service)


def test_loose_modes_of_an_older_store_are_tightened(open_workdir: Path) -> None:
    service = ServiceProcess(open_workdir)
    service.state_dir.mkdir(mode=0o755)
    service.state_dir.chmod(0o755)
    old_umask = os.umask(0o022)
    try:
        import sqlite3

        with contextlib.closing(sqlite3.connect(service.state_dir / "state.db")) as db:
            db.execute("CREATE TABLE containers (container_id TEXT PRIMARY KEY, record TEXT)")
            db.commit()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(service.state_dir / "state.db").st_mode) == 0o644
    service.start()
    try:
        assert stat.S_IMODE(os.stat(service.state_dir).st_mode) == 0o711
        assert stat.S_IMODE(os.stat(service.state_dir / "state.db").st_mode) == 0o600
        assert as_nobody("cat", f"{service.state_dir}/state.db").returncode != 0
    finally:
        _stop(service)


# ---- sandboxes ----


def test_a_launch_cannot_take_another_containers_sandbox(
    service: ServiceProcess, container_id: str, tmp_path: Path
) -> None:
    stub = service.stub()
    first = launch(stub, container_id, "sleep 300")
    sandbox = Path(first.status.sandbox)
    (tmp_path / "link").symlink_to(sandbox)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    launch_with = _launcher(stub, f"{container_id}-b")
    stub.Launch(launch_with(str(theirs)), timeout=30)  # a directory of the caller's: fine
    for taken in (
        sandbox,  # the reviewer's attack: run --sandbox <state>/sandboxes/A, then destroy
        sandbox.parent,  # holds every default sandbox
        service.state_dir,
        tmp_path / "link",  # the same, through a symlink
        theirs,  # a running container's caller-named sandbox
        theirs / "inner",
    ):
        with pytest.raises(grpc.RpcError) as error:
            stub.Launch(launch_with(str(taken), suffix="-c"), timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, taken
        assert error.value.details().startswith("sandbox: "), taken
    destroy(stub, f"{container_id}-b")
    destroy(stub, f"{container_id}-b")  # acknowledged: the record goes, the directory stays
    assert theirs.is_dir()
    assert sandbox.is_dir() and (sandbox / "stdout").exists()
    destroy(stub, container_id)


def _launcher(stub: pb_grpc.ContainerizerStub, container_id: str):  # type: ignore[no-untyped-def]
    def request(sandbox: str, suffix: str = "") -> pb.LaunchRequest:
        return pb.LaunchRequest(
            container_id=container_id + suffix,
            command=pb.CommandInfo(shell="sleep 300"),
            sandbox=sandbox,
        )

    return request


# ---- one service per state directory ----


def test_a_second_service_on_the_same_state_is_refused(fresh_service: ServiceProcess) -> None:
    assert fresh_service.process is not None
    output = serve_expecting_refusal(fresh_service.config_path)
    assert f"in use by another containerizer service (pid {fresh_service.process.pid}" in output
    assert "Traceback" not in output
    assert fresh_service.socket.exists()  # the first one's socket was left alone
    fresh_service.stub().Containers(pb.ContainersRequest(), timeout=10)
