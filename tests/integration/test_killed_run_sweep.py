"""A test run killed halfway leaves nothing the next run does not sweep (tests/run_records.py).

A child process plays a test session: it records itself as a run, then makes what a run makes -
cgroups with a process in them, processes that name its basetemp on their command line or work
in it or inherit its run id, a process started by one of those, mounts under its basetemp and
under a run-named temporary directory (a private dockerd's), a bridge with a veth into a network
namespace, an nft table - and is killed with SIGKILL, so none of its teardown runs. A second
child, alive, is the decoy: a developer's concurrent run, whose things must all stay.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import REPO, require, require_root
from tests.run_records import ended, mounts_below, run_scoped_bridge, sweep_dead_runs

pytestmark = pytest.mark.integration

# What one run makes; prints it as JSON, then waits on stdin (it never returns by itself).
PRETEND_RUN = r"""
import json, os, subprocess, sys, time
from pathlib import Path
import psutil
from tests.cgroup_roots import RUN_ID, hierarchy_mounts, run_scoped_name
from tests.run_records import RunRecord, run_scoped_bridge, run_scoped_tempdir

registry, basetemp = Path(sys.argv[1]), Path(sys.argv[2])
basetemp.mkdir(parents=True)
record = RunRecord([basetemp], registry=registry)
bare = {"env": {"PATH": os.environ["PATH"]}, "cwd": "/", "start_new_session": True}

def sleeper(*argv, **options):
    return subprocess.Popen(argv or ["sleep", "1000"], **{**bare, **options}).pid

made = {"run_id": RUN_ID, "dirs": [str(basetemp)], "cgroups": [], "mounts": []}
inner = basetemp / "mnt" / "inner"
for point in (basetemp / "mnt", inner):
    point.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "ctz-sweep-test", str(point)], check=True)
    made["mounts"].append(str(point))
dockerd = run_scoped_tempdir("ctz-dockerd")
(dockerd / "overlay").mkdir()
subprocess.run(["mount", "-t", "tmpfs", "ctz-sweep-test", str(dockerd / "overlay")], check=True)
made["dirs"].append(str(dockerd))
made["mounts"].append(str(dockerd / "overlay"))
(inner / "work").mkdir()
shell = sleeper("sh", "-c", "sleep 1000; :", "sh", str(basetemp / "config.toml"))
while not psutil.Process(shell).children():
    time.sleep(0.01)
made["pids"] = {
    "in_cgroup_only": sleeper(),
    "names_basetemp": shell,
    "started_by_one": psutil.Process(shell).children()[0].pid,
    "works_in_basetemp": sleeper(cwd=str(inner / "work")),
    "inherits_run_id": sleeper(env={**bare["env"], "CTZ_TEST_RUN_ID": RUN_ID}),
    "names_namespace": sleeper("sh", "-c", "sleep 1000; :", "-namespace", run_scoped_name("ctz")),
}
name = run_scoped_name()
for mount in hierarchy_mounts():
    (mount / name / "inner").mkdir(parents=True)
    made["cgroups"] += [str(mount / name / "inner"), str(mount / name)]
    try:
        (mount / name / "inner" / "cgroup.procs").write_text(str(made["pids"]["in_cgroup_only"]))
    except OSError:
        pass  # a v1 cpuset group starts with no cpus: nothing can join it
bridge = run_scoped_bridge()
netns, veth = f"{bridge}.owner.c1", "vz" + os.urandom(6).hex()
for argv in (
    ["ip", "link", "add", bridge, "type", "bridge"],
    ["ip", "netns", "add", netns],
    ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns],
    ["ip", "link", "set", veth, "master", bridge],
    ["nft", "add", "table", "inet", "containerizer_" + bridge.replace("-", "_")],
):
    subprocess.run(argv, check=True)
made["links"], made["netns"] = [veth, bridge], [netns]
made["nft"] = ["containerizer_" + bridge.replace("-", "_")]
print(json.dumps(made), flush=True)
sys.stdin.read()
"""


class PretendRun:
    """A child process that is a test run, and what it made."""

    def __init__(self, registry: Path, basetemp: Path) -> None:
        self.run_id = uuid.uuid4().hex[:8]
        self.errors = basetemp.with_suffix(".err")
        with self.errors.open("wb") as errors:
            self.process = subprocess.Popen(
                [sys.executable, "-c", PRETEND_RUN, str(registry), str(basetemp)],
                cwd=REPO,
                env={**os.environ, "CTZ_TEST_RUN_ID": self.run_id},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
            )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        line = self.process.stdout.readline() if ready else b""
        assert line, f"the pretend run did not start: {self.errors.read_text()}"
        self.made: dict[str, Any] = json.loads(line)

    def kill(self) -> None:
        """kill -9: none of its teardown runs."""
        self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()

    def present(self) -> dict[str, list[str]]:
        """What of the things it made is still there, by kind."""
        made = self.made
        links = {link["ifname"] for link in json.loads(_output("ip", "-j", "link", "show"))}
        nftables = json.loads(_output("nft", "-j", "list", "tables", "inet"))["nftables"]
        tables = {entry["table"]["name"] for entry in nftables if "table" in entry}
        found = {
            "pids": [kind for kind, pid in made["pids"].items() if not _ended(pid)],
            "cgroups": [path for path in made["cgroups"] if Path(path).is_dir()],
            "mounts": [str(m) for d in made["dirs"] for m in mounts_below(Path(d))],
            "dirs": [path for path in made["dirs"] if Path(path).exists()],
            "links": [name for name in made["links"] if name in links],
            "netns": [name for name in made["netns"] if Path("/run/netns", name).exists()],
            "nft": [name for name in made["nft"] if name in tables],
        }
        return {kind: sorted(names) for kind, names in found.items()}

    def everything(self) -> dict[str, list[str]]:
        """All it made, in the shape of `present()`."""
        kinds = ("cgroups", "mounts", "dirs", "links", "netns", "nft")
        return {"pids": sorted(self.made["pids"]), **{k: sorted(self.made[k]) for k in kinds}}


def _ended(pid: int) -> bool:
    try:
        return ended(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return True


def _output(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def _nothing(present: dict[str, list[str]]) -> dict[str, list[str]]:
    return {kind: [] for kind in present}


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Path]:
    """A registry of the test's own (a concurrent session's sweep must not take its records);
    whatever a failed test left in it is swept at the end."""
    require_root()
    for tool in ("ip", "nft", "mount", "sleep"):
        require(shutil.which(tool) is not None, f"needs {tool} (iproute2, nftables, util-linux)")
    path = tmp_path / "runs"
    yield path
    sweep_dead_runs(path)


def test_a_killed_run_is_swept_and_a_live_one_is_not(registry: Path, tmp_path: Path) -> None:
    dead = PretendRun(registry, tmp_path / "dead")
    try:
        decoy = PretendRun(registry, tmp_path / "decoy")
    finally:
        dead.kill()
    try:
        assert dead.present() == dead.everything()

        swept = sweep_dead_runs(registry)

        assert [(run.run_id, run.left) for run in swept] == [(dead.run_id, [])]
        assert dead.present() == _nothing(dead.everything())
        assert sorted(path.name for path in registry.iterdir()) == sorted(
            path.name for path in registry.glob(f"{decoy.run_id}-*")
        )
        assert decoy.present() == decoy.everything()
    finally:
        decoy.kill()
    assert [run.run_id for run in sweep_dead_runs(registry)] == [decoy.run_id]
    assert decoy.present() == _nothing(decoy.everything())
    assert list(registry.iterdir()) == []


def test_network_names_of_runs_no_record_names_are_swept(tmp_path: Path) -> None:
    """A run that ended without removing its bridge and namespace (no record left to sweep
    it by): the next session's sweep removes them; this run's own are never touched."""
    require_root()
    require(shutil.which("ip") is not None, "needs iproute2")
    gone_run = uuid.uuid4().hex[:8]
    bridge = f"c{gone_run}-{uuid.uuid4().hex[:5]}"
    netns = f"{bridge}.owner.c1"
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    subprocess.run(["ip", "netns", "add", netns], check=True)
    own_bridge = run_scoped_bridge()
    subprocess.run(["ip", "link", "add", own_bridge, "type", "bridge"], check=True)
    try:
        registry = tmp_path / "runs"
        registry.mkdir()
        sweep_dead_runs(registry)
        links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
        assert bridge not in links
        assert not Path("/run/netns", netns).exists()
        assert own_bridge in links  # this run's, though no record in `registry` names it
    finally:
        for link in (bridge, own_bridge):
            subprocess.run(["ip", "link", "delete", link], capture_output=True)
        subprocess.run(["ip", "netns", "delete", netns], capture_output=True)
