"""Attacks on the CNI plugin runner (isolators/network/cni.py), with real plugin processes: a
config naming a plugin by a path, a plugin that hangs (and leaves a child behind), a plugin
that floods its output. A symlink in bin_dir is followed on purpose: the operator owns bin_dir
and chooses what is in it, as with any CNI runtime."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from isolators.network import cni
from isolators.network.model import NetworkConfigError

pytestmark = pytest.mark.integration

INVOCATION = cni.Invocation(container_id="attack", netns=Path("/proc/self/ns/net"))


def plugin(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)


def run(bin_dir: Path, kind: str, timeout: float = 30.0) -> dict[str, object] | None:
    conf = {"cniVersion": "1.0.0", "name": "attack", "type": kind}
    return asyncio.run(cni.run_plugin((bin_dir,), "ADD", conf, INVOCATION, timeout))


@pytest.mark.parametrize("kind", ["../../bin/sh", "/bin/sh", "..", "sub/plugin", ".hidden"])
def test_a_plugin_type_that_is_a_path_is_refused(tmp_path: Path, kind: str) -> None:
    (tmp_path / "sub").mkdir()
    plugin(tmp_path / "sub", "plugin", "echo '{}'")
    config = {"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": kind}]}
    with pytest.raises(NetworkConfigError, match=r"plugins\[0\]\.type"):
        cni.NetworkList.from_json(config, "attack.conflist")
    with pytest.raises(NetworkConfigError, match="not a file name"):
        run(tmp_path, kind)


def test_a_hanging_plugin_is_killed_with_what_it_started(tmp_path: Path) -> None:
    """The plugin's shell waits on a child; at the timeout both are gone (the child, which
    holds the output pipe, would otherwise outlive the launch)."""
    pid_file = tmp_path / "child.pid"
    plugin(tmp_path, "hang", f"sleep 300 & echo $! > {pid_file}; wait")
    started = time.monotonic()
    with pytest.raises(cni.CniError, match="no answer within 1 s"):
        run(tmp_path, "hang", timeout=1)
    assert time.monotonic() - started < 10
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while alive(child):
        assert time.monotonic() < deadline, f"the plugin's child {child} outlived the timeout"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_plugin_flooding_its_output_is_stopped_at_the_bound(tmp_path: Path) -> None:
    """An endless stdout ends the call at MAX_OUTPUT_BYTES, long before the timeout, with the
    service's memory untouched by the rest."""
    plugin(tmp_path, "flood", "exec cat /dev/zero")
    started = time.monotonic()
    with pytest.raises(cni.CniError, match=f"more than {cni.MAX_OUTPUT_BYTES} bytes"):
        run(tmp_path, "flood", timeout=20)
    assert time.monotonic() - started < 5


def test_a_plugin_flooding_stderr_is_stopped_at_the_bound(tmp_path: Path) -> None:
    plugin(tmp_path, "flood-err", "exec cat /dev/zero >&2")
    with pytest.raises(cni.CniError, match=f"more than {cni.MAX_OUTPUT_BYTES} bytes"):
        run(tmp_path, "flood-err", timeout=20)


def test_a_plugin_within_the_bound_still_answers(tmp_path: Path) -> None:
    plugin(tmp_path, "fine", """cat > /dev/null; echo '{"cniVersion": "1.0.0", "ips": []}'""")
    assert run(tmp_path, "fine") == {"cniVersion": "1.0.0", "ips": []}


def test_a_symlink_in_bin_dir_is_the_operators_choice(tmp_path: Path) -> None:
    """Followed: bin_dir is the operator's, like /opt/cni/bin (documented, not an attack)."""
    real = tmp_path / "elsewhere"
    real.mkdir()
    plugin(real, "target", """echo '{"cniVersion": "1.0.0"}'""")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(real / "target", bin_dir / "linked")
    assert run(bin_dir, "linked") == {"cniVersion": "1.0.0"}
