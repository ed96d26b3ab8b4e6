"""`critest --benchmark` (cri-tools v1.26.1) against a CRI endpoint, for bench_cri.py.

critest pulls its images from registry.k8s.io; here a private `docker-registry` serves them
(built by ../shared/cri/critest-images) and the service's config names it as that registry's
mirror, as deploy/critest.sh does for the validation suite. critest writes one JSON file per
benchmark (its samples' durations per operation); this reads them back as p50/p90 per operation.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import p50_p90_ms
from tests.image_fixtures import REGISTRY_BINARY, registry_process

SHARED_CRI = Path(__file__).resolve().parent.parent.parent / "shared" / "cri"
# critest's default container image; its image benchmarks are pointed at the same one.
IMAGE = "registry.k8s.io/e2e-test-images/busybox:1.29-2"
SUMMARY_PATTERNS = (
    re.compile(r"CRI validation - \d+/\d+ specs"),
    re.compile(r"^.*\[duration\] \|.*$", re.MULTILINE),
    re.compile(r"^\s*\[(FAIL|PANICKED|TIMEDOUT)\].*$", re.MULTILINE),
    re.compile(r"(SUCCESS|FAIL)!.*$", re.MULTILINE),
)
CRITEST_SECONDS = 900


@dataclass(frozen=True)
class CritestTools:
    critest: Path
    images_builder: Path  # pushes critest's images into a registry
    registry: str  # docker-registry's path


def critest_tools() -> CritestTools | str:
    """The tools `critest --benchmark` needs here, or why it cannot run."""
    critest = Path(os.environ.get("CRITEST", SHARED_CRI / "bin" / "critest"))
    images = Path(os.environ.get("CRITEST_IMAGES", SHARED_CRI / "critest-images"))
    for tool, variable in ((critest, "CRITEST"), (images, "CRITEST_IMAGES")):
        if not os.access(tool, os.X_OK):
            return f"{tool} not found (set {variable}; cri-tools v1.26.1)"
    registry = shutil.which(REGISTRY_BINARY)
    if registry is None:
        return f"{REGISTRY_BINARY} missing: apt-get install docker-registry"
    return CritestTools(critest, images, registry)


@contextlib.contextmanager
def critest_registry(tools: CritestTools, workdir: Path) -> Iterator[str]:
    """host:port of a private registry holding critest's images; stopped at the end."""
    workdir.mkdir()
    with registry_process(tools.registry, workdir) as address:
        subprocess.run(
            [str(tools.images_builder), "--registry", address],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=300,
        )
        yield address


def mirrors_config(address: str) -> str:
    """The service's config table that sends critest's pulls to `address`."""
    return f'[images.mirrors]\n"gcr.io" = "{address}"\n"registry.k8s.io" = "{address}"\n'


@dataclass(frozen=True)
class CritestRun:
    exit_code: int | None  # None: killed at CRITEST_SECONDS
    summary: list[str]  # ginkgo's report lines worth printing
    operations: dict[str, dict[str, float]]  # "<benchmark>.<operation>" -> n, p50_ms, p90_ms


def run_critest_benchmark(
    tools: CritestTools, cri_socket: Path, workdir: Path, samples: int
) -> CritestRun:
    """critest's pod, container and image benchmarks, `samples` each, one at a time."""
    output = workdir / "results"
    output.mkdir(parents=True)  # critest does not make it, and only logs a failed write
    params = workdir / "params.yaml"
    params.write_text(_params_yaml(samples))
    endpoint = f"unix://{cri_socket}"
    argv = [str(tools.critest), "--runtime-endpoint", endpoint, "--image-endpoint", endpoint]
    argv += ["--benchmark", "--benchmarking-params-file", str(params)]
    argv += ["--benchmarking-output-dir", str(output), "--ginkgo.no-color"]
    argv += ["--log_dir", str(workdir)]  # glog's files, else left in /tmp
    try:
        completed = subprocess.run(
            argv, capture_output=True, text=True, cwd=workdir, timeout=CRITEST_SECONDS
        )
    except subprocess.TimeoutExpired:
        return CritestRun(None, [f"killed after {CRITEST_SECONDS} s"], {})
    output_text = completed.stdout + completed.stderr
    return CritestRun(completed.returncode, summary_lines(output_text), _operations_ms(output))


def summary_lines(output: str) -> list[str]:
    """What ginkgo's succinct report says of the whole run: specs run, outcome, failures, and
    the one benchmark that reports in a table rather than a results file."""
    lines: list[str] = []
    for pattern in SUMMARY_PATTERNS:
        lines.extend(match.group(0).strip() for match in pattern.finditer(output))
    return lines


def _params_yaml(samples: int) -> str:
    # Flat lowerCamelCase keys: critest ignores anything else and falls back to one sample.
    params: dict[str, object] = {
        "containersNumber": samples,
        "containersNumberParallel": 1,
        "podsNumber": samples,
        "podsNumberParallel": 1,
        "imagesNumber": samples,
        "imagesNumberParallel": 1,
        "imagePullingBenchmarkImage": IMAGE,
        "imageListingBenchmarkImages": [IMAGE],
    }
    return json.dumps(params)  # JSON is YAML


def _operations_ms(output: Path) -> dict[str, dict[str, float]]:
    """`<benchmark>.<operation>` -> p50/p90 of the durations critest recorded."""
    operations: dict[str, dict[str, float]] = {}
    for path in sorted(output.glob("*.json")):
        benchmark = path.name.removesuffix("_benchmark_data.json")
        for operation, durations_ns in _durations(json.loads(path.read_text())).items():
            seconds = [duration / 1e9 for duration in durations_ns]
            operations[f"{benchmark}.{operation}"] = p50_p90_ms(seconds)
    return operations


def _durations(document: dict[str, Any]) -> dict[str, list[int]]:
    """Operation name -> its durations in ns, from one of critest's results files."""
    names = document.get("operationsNames")
    points = document.get("datapoints")
    if not isinstance(names, list) or not isinstance(points, list):
        return {}
    durations: dict[str, list[int]] = {str(name): [] for name in names}
    for point in points:
        for name, value in zip(names, point.get("operationsDurationsNs") or [], strict=False):
            durations[str(name)].append(int(value))
    return durations
