"""Exec: `true` run inside an already running container, round trip until its exit code is back,
through our API next to `docker exec` and `ctr task exec`, interleaved in one run.

Every container runs `sleep 3600` of the deterministic busybox test image: ours on the native
runtime of a private service (the image imported through our Images API), docker's in a private
dockerd (`--network none`), containerd's as a `ctr run -d` task in a private containerd. Timed:
- API: one Exec stream (start `true`, read to the exit code) on a warm gRPC channel, next to the
  docker SDK's exec_create + exec_start on its warm connection (docker's API round trip; the
  exec_inspect a client needs for the exit code is timed apart, as `docker_sdk_with_inspect`).
- CLI, what a user waits for, each a whole process: `containerizer exec ID -- true`,
  `docker exec NAME true` and `ctr task exec --exec-id X ID true`. Our CLI keeps its bytecode
  (in a cache of this run, removed at the end), as an installed one does: a development shell's
  PYTHONDONTWRITEBYTECODE would have it compile every module edited since the last cache on
  every run.
Target: our p50 at most 1.0x theirs, API against API and CLI against CLI. A round runs each way
once, so each way's execs come a few hundred ms apart, as a user's do; run back to back, execs
are faster for everyone (the first move into a cgroup v1 after a pause waits for an RCU grace
period, which runc pays as our supervisor does).

Usage: python benchmarks/bench_exec.py [--runs 50] [--warmup 5]
(root; prints a summary on stderr and JSON on stdout)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.api.containerizer.v1 import containerizer_pb2_grpc as pb_grpc
from benchmarks.common import BIN, Service, p50_p90_ms, private_service, ratio
from tests.cgroup_roots import remove_cgroup_trees, run_scoped_name
from tests.docker_fixtures import DOCKER_CLI, PrivateDockerd, build_busybox_image, private_dockerd
from tests.images import REFERENCE, busybox_oci_layout
from tests.integration.containerd_daemon import (
    ContainerdDaemon,
    containerd_available,
    import_image,
)

TARGET_RATIO = 1.0
IDLE = ["sleep", "3600"]  # each container's init: it only has to be running
COMMAND = ["true"]
TIMEOUT_S = 60
# The docker SDK's exec round trip, timed without and with the exec_inspect that reads its code.
SDK = "docker_sdk"
SDK_INSPECT = "docker_sdk_with_inspect"


@dataclass
class Targets:
    """The three running containers and how to reach each."""

    service: Service
    stub: pb_grpc.ContainerizerStub
    our_id: str
    dockerd: PrivateDockerd
    docker_api: docker.APIClient
    docker_name: str
    containerd: ContainerdDaemon
    ctr_namespace: str
    ctr_id: str
    cli_environment: dict[str, str]


def _timed(action: Callable[[], None]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _run_true(argv: list[str], env: dict[str, str] | None = None) -> None:
    """One whole CLI process, which must report `true`'s status."""
    done = subprocess.run(argv, capture_output=True, timeout=TIMEOUT_S, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: {done.stderr.decode()[-500:]}")


# ---- one exec each way ----


def ours_api(targets: Targets) -> None:
    start = pb.ExecStart(container_id=targets.our_id, argv=COMMAND)
    replies = targets.stub.Exec(iter([pb.ExecRequest(start=start)]), timeout=TIMEOUT_S)
    codes = [reply.exit_code for reply in replies if reply.WhichOneof("output") == "exit_code"]
    if codes != [0]:
        raise RuntimeError(f"our Exec of true ended with {codes}")


def ours_cli(targets: Targets) -> None:
    endpoint = targets.service.endpoint
    argv = [str(BIN / "containerizer"), "--endpoint", endpoint, "exec", targets.our_id]
    _run_true([*argv, "--", *COMMAND], targets.cli_environment)


def docker_sdk(targets: Targets) -> str:
    """exec_create + exec_start (returns once the command's streams end); the exec's id."""
    exec_id: str = targets.docker_api.exec_create(targets.docker_name, COMMAND)["Id"]
    targets.docker_api.exec_start(exec_id)
    return exec_id


def docker_exit_code(targets: Targets, exec_id: str) -> None:
    code = targets.docker_api.exec_inspect(exec_id)["ExitCode"]
    if code != 0:
        raise RuntimeError(f"docker exec of true ended with {code}")


def docker_cli(targets: Targets) -> None:
    endpoint = targets.dockerd.endpoint
    _run_true([str(DOCKER_CLI), "-H", endpoint, "exec", targets.docker_name, *COMMAND])


def ctr_cli(targets: Targets, exec_id: str) -> None:
    argv = ["ctr", "--address", targets.containerd.address, "--namespace", targets.ctr_namespace]
    _run_true([*argv, "task", "exec", "--exec-id", exec_id, targets.ctr_id, *COMMAND])


def one_round(targets: Targets, n: int) -> dict[str, float]:
    """Every way once, back to back, so that all see the same machine load."""
    samples = {
        "ours_api": _timed(lambda: ours_api(targets)),
        "ours_cli": _timed(lambda: ours_cli(targets)),
        "docker_cli": _timed(lambda: docker_cli(targets)),
        "ctr_cli": _timed(lambda: ctr_cli(targets, f"bench-exec-{n}")),
    }
    start = time.perf_counter()
    exec_id = docker_sdk(targets)
    samples[SDK] = time.perf_counter() - start
    docker_exit_code(targets, exec_id)
    samples[SDK_INSPECT] = time.perf_counter() - start
    return samples


def measure(targets: Targets, runs: int, warmup: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {}
    for n in range(-warmup, runs):
        for name, seconds in one_round(targets, n + warmup).items():
            if n >= 0:
                samples.setdefault(name, []).append(seconds)
    return samples


# ---- the three running containers; each context removes what it made ----


@contextlib.contextmanager
def our_container(tarball: Path) -> Iterator[tuple[Service, str]]:
    with private_service() as service:  # destroys every container and removes its cgroups
        import_image(service.endpoint, tarball)
        container_id = "bench-exec"
        service.stub().Launch(
            pb.LaunchRequest(
                container_id=container_id,
                command=pb.CommandInfo(argv=IDLE),
                container=pb.ContainerInfo(runtime="native", image=REFERENCE),
            ),
            timeout=TIMEOUT_S,
        )
        yield service, container_id


@contextlib.contextmanager
def docker_container() -> Iterator[tuple[PrivateDockerd, docker.APIClient, str]]:
    with private_dockerd() as daemon:  # stopped, its data and cgroups removed, at exit
        image = build_busybox_image(daemon)
        api = docker.APIClient(base_url=daemon.endpoint, version="auto", timeout=TIMEOUT_S)
        name = run_scoped_name("bench-exec")
        try:
            created = api.create_container(
                image, IDLE, name=name, host_config=api.create_host_config(network_mode="none")
            )
            api.start(created["Id"])
            yield daemon, api, name
        finally:
            with contextlib.suppress(docker.errors.DockerException):
                api.remove_container(name, force=True)
            api.close()


@contextlib.contextmanager
def ctr_task(workdir: Path, tarball: Path) -> Iterator[tuple[ContainerdDaemon, str, str]]:
    workdir.mkdir()
    daemon = ContainerdDaemon(workdir)
    namespace = run_scoped_name("bench-exec-ctr")
    try:
        daemon.start()
        daemon.ctr("images", "import", str(tarball), namespace=namespace)
        daemon.ctr("run", "-d", REFERENCE, "bench-exec", *IDLE, namespace=namespace)
        yield daemon, namespace, "bench-exec"
    finally:
        with contextlib.suppress(Exception):
            daemon.remove_namespace(namespace)  # kills the task, removes container and image
        daemon.stop()
        remove_cgroup_trees(namespace)  # `ctr run` tasks live at /<namespace>/<id>


@contextlib.contextmanager
def running_targets(workdir: Path) -> Iterator[Targets]:
    tarball = busybox_oci_layout(workdir)
    with contextlib.ExitStack() as stack:
        service, our_id = stack.enter_context(our_container(tarball))
        dockerd, docker_api, docker_name = stack.enter_context(docker_container())
        containerd, namespace, ctr_id = stack.enter_context(
            ctr_task(workdir / "containerd", tarball)
        )
        yield Targets(
            service, service.stub(), our_id,
            dockerd, docker_api, docker_name,
            containerd, namespace, ctr_id,
            cli_environment(workdir / "pycache"),
        )  # fmt: skip


def cli_environment(pycache: Path) -> dict[str, str]:
    """Ours, with bytecode kept under `pycache` (never beside the sources)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


# ---- report ----


def comparison(ours: dict[str, float], theirs: dict[str, float]) -> dict[str, Any]:
    value = ratio(ours, theirs)
    return {"ratio_p50": value, "target": "met" if value <= TARGET_RATIO else "missed"}


def result(samples: dict[str, list[float]]) -> dict[str, Any]:
    summary = {name: p50_p90_ms(values) for name, values in samples.items()}
    return {
        "benchmark": "exec",
        "workload": f"`true` in a running container of {REFERENCE} (init: sleep 3600)",
        "target_ratio_p50": TARGET_RATIO,
        "api": {
            "ours_grpc_exec": summary["ours_api"],
            SDK: summary[SDK],
            SDK_INSPECT: summary[SDK_INSPECT],
            "vs_docker_sdk": comparison(summary["ours_api"], summary[SDK]),
        },
        "cli": {
            "containerizer_exec": summary["ours_cli"],
            "docker_exec": summary["docker_cli"],
            "ctr_task_exec": summary["ctr_cli"],
            "vs_docker_exec": comparison(summary["ours_cli"], summary["docker_cli"]),
            "vs_ctr_task_exec": comparison(summary["ours_cli"], summary["ctr_cli"]),
        },
    }


def summary_lines(report: dict[str, Any]) -> str:
    lines = []
    for kind in ("api", "cli"):
        for name, value in report[kind].items():
            if "p50_ms" in value:
                lines.append(
                    f"{kind} {name:<24} p50 {value['p50_ms']:>8} ms  p90 {value['p90_ms']}"
                )
            else:
                lines.append(f"{kind} ours {name:<19} {value['ratio_p50']}x  {value['target']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    missing = containerd_available()  # root, containerd and ctr
    if missing is None and not DOCKER_CLI.is_file():
        missing = f"{DOCKER_CLI} is not installed (Debian package docker.io)"
    if missing is not None:
        print(json.dumps({"benchmark": "exec", "error": missing}))
        return 1
    load_before = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="ctz-bench-exec-", dir="/tmp"))
    try:
        with running_targets(workdir) as targets:
            samples = measure(targets, args.runs, args.warmup)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = result(samples)
    # Other work on the machine shows in the numbers: the 1-minute load before and after.
    report["load_average_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(summary_lines(report), file=sys.stderr)  # stdout carries the JSON, for run_all.py
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
