"""The supervisor module's pure parts: status files, handles, handshake lines, the configuration,
locating the binary, and the start-time guard (against this test's own process)."""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import sys
from pathlib import Path

import pytest

from adapter.core.errors import FailedPrecondition, InvalidArgument, LaunchFailed
from adapter.core.model import Identity
from adapter.supervisor import client as supervisor
from adapter.supervisor import processes
from adapter.supervisor.client import ExitStatus, SpawnError, SupervisorHandle
from adapter.supervisor.launch_config import Enforcement, LaunchConfig


def write(path: Path, text: str | bytes) -> str:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("exited 0\nfinished 1764090000.123\n", ExitStatus(0, None, 1764090000.123)),
        ("exited 255\nfinished 1764090000\n", ExitStatus(255, None, 1764090000.0)),
        ("signaled 9\nfinished 1764090000.5\n", ExitStatus(None, 9, 1764090000.5)),
        ("signaled 15\nfinished 1.000", ExitStatus(None, 15, 1.0)),
    ],
)
def test_read_status_parses_what_the_supervisor_writes(
    tmp_path: Path, text: str, expected: ExitStatus
) -> None:
    assert processes.read_status(write(tmp_path / "status", text)) == expected


def test_read_status_without_a_file_is_none(tmp_path: Path) -> None:
    assert processes.read_status(str(tmp_path / "missing")) is None


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "exited\nfinished 1\n",
        "exited 3\n",
        "exited -1\nfinished 1\n",
        "stopped 3\nfinished 1\n",
        "exited 3\nfinished soon\n",
        "exited 3\nfinished 1\nextra\n",
        b"\xff\xfe\x00garbage",
    ],
)
def test_read_status_of_garbage_is_none_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, garbage: str | bytes
) -> None:
    path = write(tmp_path / "status", garbage)
    with caplog.at_level(logging.WARNING, logger=supervisor.__name__):
        assert processes.read_status(path) is None
    assert path in caplog.text


def test_read_status_of_a_directory_is_none_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=supervisor.__name__):
        assert processes.read_status(str(tmp_path)) is None
    assert "unreadable" in caplog.text


HANDLE = SupervisorHandle(
    supervisor_pid=100,
    supervisor_start_time=2000,
    child_pid=101,
    child_start_time=2001,
    status_file="/run/ctz/c1/status",
)


def test_handle_round_trips_through_json() -> None:
    data = HANDLE.to_json()
    assert data == {
        "supervisor_pid": 100,
        "supervisor_start_time": 2000,
        "child_pid": 101,
        "child_start_time": 2001,
        "status_file": "/run/ctz/c1/status",
    }
    assert data == dataclasses.asdict(HANDLE)  # written field by field: a new field is in it
    assert SupervisorHandle.from_json(data) == HANDLE


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("child_pid", "101"),
        ("child_pid", None),
        ("supervisor_start_time", True),
        ("status_file", 3),
    ],
)
def test_handle_from_bad_json_names_the_key(key: str, value: object) -> None:
    data = {**HANDLE.to_json(), key: value}
    with pytest.raises(ValueError, match=key):
        SupervisorHandle.from_json(data)


def test_handle_from_json_with_a_missing_key_names_it() -> None:
    data = HANDLE.to_json()
    del data["child_start_time"]
    with pytest.raises(ValueError, match="child_start_time"):
        SupervisorHandle.from_json(data)


def test_ok_handshake_gives_pids_and_start_times() -> None:
    assert supervisor.parse_handshake(b"ok 4242 777 770\n", "/bin/true") == (4242, 777, 770)


def test_error_handshake_gives_step_and_reason() -> None:
    with pytest.raises(SpawnError) as caught:
        supervisor.parse_handshake(b"error exec: No such file or directory\n", "/nope")
    assert caught.value.step == "exec"
    assert caught.value.reason == "No such file or directory"
    assert "'/nope'" in str(caught.value)
    assert isinstance(caught.value, LaunchFailed)


@pytest.mark.parametrize("line", [b"ok\n", b"ok 1 2\n", b"ok a b c\n", b"hello\n", b"ok -1 2 3\n"])
def test_unexpected_handshake_is_a_handshake_error(line: bytes) -> None:
    with pytest.raises(SpawnError) as caught:
        supervisor.parse_handshake(line, "/bin/true")
    assert caught.value.step == "handshake"


def test_configuration_carries_every_option(tmp_path: Path) -> None:
    enforcement = Enforcement(privileged=True)
    config = LaunchConfig(
        status_file=str(tmp_path / "status"),
        sandbox="box",
        argv=["sh", "-c", "--env"],
        enforcement=enforcement,
        env=[("A", "1"), ("B", "x=y")],
        cgroup_procs=["/cg/a/cgroup.procs", "/cg/b/cgroup.procs"],
        cwd="/srv",
        identity=Identity(65534, 65534, (5, 7), home="/nonexistent"),
        hostname="c1",
        namespaces=False,
    )
    assert config.encode().split(b"\0")[:-1] == [
        word.encode()
        for word in [
            "--env", "A=1",
            "--env", "B=x=y",
            "--env", "HOME=/nonexistent",
            "--status-file", str(tmp_path / "status"),
            "--sandbox", os.path.abspath("box"),
            "--cwd", "/srv",
            "--hostname", "c1",
            "--cgroup-procs", "/cg/a/cgroup.procs",
            "--cgroup-procs", "/cg/b/cgroup.procs",
            "--no-namespaces",
            "--uid", "65534", "--gid", "65534", "--groups", "5,7",
            "--privileged",
            "--", "sh", "-c", "--env",
        ]
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "env", "field"),
    [
        ([], [], "command"),
        (["true"], [("A=B", "1")], "environment"),
        (["true"], [("", "1")], "environment"),
        (["tr\0ue"], [], "argv"),
        (["true"], [("A", "1\0")], "environment"),
    ],
)
def test_configuration_rejects_what_the_supervisor_would_misread(
    argv: list[str], env: list[tuple[str, str]], field: str
) -> None:
    config = LaunchConfig(
        status_file="s", sandbox="o", argv=argv, env=env,
        enforcement=Enforcement(privileged=True),
    )  # fmt: skip
    with pytest.raises(InvalidArgument, match=field):
        config.encode()


def make_executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_supervisor_prefers_the_configured_path(tmp_path: Path) -> None:
    binary = make_executable(tmp_path / "sup")
    assert supervisor.find_supervisor(str(binary)) == str(binary)


def test_find_supervisor_with_a_bad_configured_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="configured"):
        supervisor.find_supervisor(str(tmp_path / "nope"))


def test_find_supervisor_looks_next_to_python_then_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv_bin, path_dir = tmp_path / "venv-bin", tmp_path / "path-dir"
    venv_bin.mkdir()
    path_dir.mkdir()
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    monkeypatch.setenv("PATH", str(path_dir))
    with pytest.raises(FailedPrecondition) as caught:
        supervisor.find_supervisor(None)
    assert str(venv_bin / supervisor.SUPERVISOR_NAME) in str(caught.value)
    assert str(path_dir) in str(caught.value)

    on_path = make_executable(path_dir / supervisor.SUPERVISOR_NAME)
    assert supervisor.find_supervisor(None) == str(on_path)
    beside = make_executable(venv_bin / supervisor.SUPERVISOR_NAME)
    assert supervisor.find_supervisor(None) == str(beside)


def test_start_time_guard_on_our_own_process() -> None:
    own_start = processes.start_time(os.getpid())
    assert own_start is not None and own_start > 0
    handle = SupervisorHandle(os.getpid(), own_start, os.getpid(), own_start, "/nonexistent")
    assert supervisor.is_alive(handle)
    assert not supervisor.is_alive(
        SupervisorHandle(os.getpid(), own_start + 1, 0, 0, "/nonexistent")
    )
    # A wrong child start time makes kill a no-op (else this test would die of SIGKILL).
    supervisor.kill(SupervisorHandle(0, 0, os.getpid(), own_start + 1, "/nonexistent"), 9)


def test_proc_stat_survives_parentheses_and_spaces_in_comm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fields = ["S", *(str(n) for n in range(4, 22)), "123456", "0"]
    line = "4242 (evil) (name x) " + " ".join(fields) + "\n"
    real_open = open

    def fake_open(path: str, mode: str = "r") -> object:
        if path == "/proc/4242/stat":
            return real_open(write(tmp_path / "stat", line), mode)
        return real_open(path, mode)

    monkeypatch.setattr("builtins.open", fake_open)
    assert processes.proc_stat(4242) == ("S", 4, 123456)
