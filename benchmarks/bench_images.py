"""Benchmark: importing and unpacking the busybox test image through the image store, next to
GNU tar doing the same bytes in the same run (`tar -xf` of the tarball for import, `tar -xf` of
the layer blob for unpack), each of our samples followed by the matching tar samples so that
all see the same load. Import is into a store opened beforehand (a service opens its store
once); unpack is `store.layers` of an imported image whose layer directory was removed, so that
it unpacks from the stored blobs. "shared_base" unpacks busybox, then a second image of busybox's
layer and a small one over it: the second unpacks only its own layer.

An import also unpacks what it brings (a hostile image is refused then, not at a launch), which
`tar -xf` of the tarball does not: each import row also times `tar_equivalent`, tar doing the
files of our import (`tar -xf` of the tarball, then of its layer blob: inflating it too when it
is gzip), and gives `floor_ratio_p50`, its ratio to the row's tar: what the row's target would
need of tar itself. Prints JSON: `rows` has every issue-19 row with the baseline it measured,
its target, today's ratios (wall and CPU) and whether the target is met; removes its temporary
directory even when interrupted.

    .venv/bin/python benchmarks/bench_images.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

from adapter.images import ImageStore
from tests.images import (
    REFERENCE,
    Entry,
    busybox_docker_archive,
    busybox_entries,
    busybox_oci_layout,
    tar_bytes,
    write_oci_layout,
)

SECOND = "localhost/busybox-motd:1"


def summary(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50": statistics.median(ordered), "p99": p99, "min": ordered[0]}


# Issue 19's measurements before the streaming work, and its targets (ours / tar, p50).
BASELINE = {
    ("docker_archive", "import"): 4.06,
    ("docker_archive", "unpack"): 6.7,
    ("oci_layout", "import"): 2.66,
}
KEYS = {"oci": "oci_layout", "docker": "docker_archive"}
TARGET = {
    ("docker_archive", "import"): 1.5,
    ("docker_archive", "unpack"): 1.2,
    ("oci_layout", "import"): 1.5,
}


Commands = Callable[[int], list[list[str]]]  # attempt -> the processes of one sample, in turn


async def timed_samples(
    ours: Callable[[int], Awaitable[object]], others: dict[str, Commands], repeat: int
) -> dict[str, list[float]]:
    """`repeat` samples of ours and of each of `others`, alternating: wall and CPU time (ms).
    CPU time (all our threads; the tar processes and their gzip) tells the work apart from a
    busy machine's waits."""
    samples: dict[str, list[float]] = collections.defaultdict(list)
    for attempt in range(repeat):
        cpu, start = cpu_ms(resource.RUSAGE_SELF), time.perf_counter()
        await ours(attempt)
        samples["ours"].append((time.perf_counter() - start) * 1000)
        samples["ours_cpu"].append(cpu_ms(resource.RUSAGE_SELF) - cpu)
        for name, commands in others.items():
            processes = commands(attempt)
            cpu, start = cpu_ms(resource.RUSAGE_CHILDREN), time.perf_counter()
            for arguments in processes:
                subprocess.run(arguments, check=True)
            samples[name].append((time.perf_counter() - start) * 1000)
            samples[f"{name}_cpu"].append(cpu_ms(resource.RUSAGE_CHILDREN) - cpu)
    return samples


def cpu_ms(who: int) -> float:
    usage = resource.getrusage(who)
    return (usage.ru_utime + usage.ru_stime) * 1000


def row(name: str, work: str, samples: dict[str, list[float]]) -> dict[str, object]:
    ours, tar = summary(samples["ours"]), summary(samples["tar"])
    ours_cpu, tar_cpu = summary(samples["ours_cpu"]), summary(samples["tar_cpu"])
    ratio = ours["p50"] / tar["p50"]
    result: dict[str, object] = {
        f"{work}_ms": ours,
        f"tar_x_{work}_ms": tar,
        "ratio_p50": ratio,
        f"{work}_cpu_ms": ours_cpu,
        f"tar_x_{work}_cpu_ms": tar_cpu,
        "ratio_cpu_p50": ours_cpu["p50"] / tar_cpu["p50"],
    }
    if "tar_equivalent" in samples:
        equivalent = summary(samples["tar_equivalent"])
        equivalent_cpu = summary(samples["tar_equivalent_cpu"])
        result["tar_equivalent_ms"] = equivalent
        result["tar_equivalent_cpu_ms"] = equivalent_cpu
        result["floor_ratio_p50"] = equivalent["p50"] / tar["p50"]
        result["floor_ratio_cpu_p50"] = equivalent_cpu["p50"] / tar_cpu["p50"]
        result["ratio_to_tar_equivalent_p50"] = ours["p50"] / equivalent["p50"]
    if (name, work) in TARGET:
        result["baseline_ratio"] = BASELINE[(name, work)]
        result["target_ratio"] = TARGET[(name, work)]
        result["met"] = ratio <= TARGET[(name, work)]
    return result


def issue_rows(results: dict[str, Any]) -> dict[str, dict[str, object]]:
    """Every issue-19 row (`image import, docker-archive` is `import_docker_archive`): its
    baseline, target and today's ratios, side by side."""
    rows: dict[str, dict[str, object]] = {}
    for (name, work), target in TARGET.items():
        measured = results[name][work]
        line: dict[str, object] = {
            "baseline_ratio": BASELINE[(name, work)],
            "target_ratio": target,
            "ratio_p50": measured["ratio_p50"],
            "ratio_cpu_p50": measured["ratio_cpu_p50"],
            "met": measured["met"],
        }
        if "floor_ratio_p50" in measured:
            line["floor_ratio_p50"] = measured["floor_ratio_p50"]
            line["floor_ratio_cpu_p50"] = measured["floor_ratio_cpu_p50"]
        rows[f"{work}_{name}"] = line
    return rows


def fresh_directory(path: Path) -> list[str]:
    path.mkdir()
    return ["-C", str(path)]


async def bench_format(work: Path, name: str, tarball: Path, repeat: int) -> dict[str, object]:
    stores = [ImageStore(work / f"{name}-import-{attempt}") for attempt in range(repeat)]

    async def import_into_fresh_store(attempt: int) -> None:
        await stores[attempt].import_tarball(tarball)

    def tar_extract_tarball(attempt: int) -> list[list[str]]:
        return [["tar", "-xf", str(tarball), *fresh_directory(work / f"{name}-tar-{attempt}")]]

    def tar_equivalent(attempt: int) -> list[list[str]]:  # the blobs, then the layer's files
        blobs = work / f"{name}-equivalent-{attempt}"
        return [
            ["tar", "-xf", str(tarball), *fresh_directory(blobs)],
            ["tar", "-xf", str(blobs / layer_member), *fresh_directory(blobs / "unpacked")],
        ]

    layer_member = _layer_member(tarball)
    imports = await timed_samples(
        import_into_fresh_store,
        {"tar": tar_extract_tarball, "tar_equivalent": tar_equivalent},
        repeat,
    )
    image = stores[0].get(REFERENCE)
    [layer] = image.layers
    blob = stores[0].blob_path(layer.digest)
    for store in stores:  # unpack again from the stored blobs, as for a store without layers
        shutil.rmtree(store.layout.layer_path(image.diff_ids[0]))

    async def unpack(attempt: int) -> None:
        await stores[attempt].layers(REFERENCE)

    def tar_extract_layer(attempt: int) -> list[list[str]]:  # tar detects gzip itself
        return [["tar", "-xf", str(blob), *fresh_directory(work / f"{name}-layer-{attempt}")]]

    unpacks = await timed_samples(unpack, {"tar": tar_extract_layer}, repeat)
    return {
        "tarball_bytes": tarball.stat().st_size,
        "layer_media_type": layer.media_type,
        "import": row(KEYS[name], "import", imports),
        "unpack": row(KEYS[name], "unpack", unpacks),
    }


def _layer_member(tarball: Path) -> str:
    """The name of the (one) layer blob in the busybox tarball: its largest member."""
    with tarfile.open(tarball) as archive:
        return max(archive.getmembers(), key=lambda member: member.size).name


async def bench_shared_base(work: Path, repeat: int) -> dict[str, object]:
    """Unpack time of busybox, then of a second image that shares its base layer."""
    busybox = tar_bytes(busybox_entries())
    top = tar_bytes([Entry("etc/motd", data=b"a second image\n")])
    base = write_oci_layout(work / "base.tar", [busybox], REFERENCE)
    second = write_oci_layout(work / "second.tar", [busybox, top], SECOND)
    samples: dict[str, list[float]] = {"first": [], "second": []}
    for attempt in range(repeat):
        store = ImageStore(work / f"shared-{attempt}")
        await store.import_tarball(base)
        await store.import_tarball(second)
        for layer in store.layout.layers.iterdir():  # unpack both from their stored blobs
            shutil.rmtree(layer)
        for reference, key in ((REFERENCE, "first"), (SECOND, "second")):
            start = time.perf_counter()
            await store.layers(reference)
            samples[key].append((time.perf_counter() - start) * 1000)
    first, shared = summary(samples["first"]), summary(samples["second"])
    return {
        "first_image_unpack_ms": first,
        "second_image_sharing_the_base_layer_unpack_ms": shared,
        "ratio_p50": shared["p50"] / first["p50"],
    }


async def run(repeat: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bench-images-") as directory:
        work = Path(directory)
        results: dict[str, object] = {"repeat": repeat}
        results["oci_layout"] = await bench_format(work, "oci", busybox_oci_layout(work), repeat)
        results["docker_archive"] = await bench_format(
            work, "docker", busybox_docker_archive(work), repeat
        )
        results["shared_base"] = await bench_shared_base(work, repeat)
        return {"rows": issue_rows(results), **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.repeat)), indent=2))


if __name__ == "__main__":
    main()
