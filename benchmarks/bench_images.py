"""Benchmark: importing and unpacking the busybox test image through the image store, next to
GNU tar doing the same bytes in the same run (`tar -xf` of the tarball for import, `tar -xf` of
the layer blob for unpack), each of our samples followed by the matching tar sample so that
both see the same load. Import is into a store opened beforehand (a service opens its store
once); unpack is `store.layers` of an imported image whose layer directory was removed, so that
it unpacks from the stored blobs. "shared_base" unpacks busybox, then a second image of busybox's
layer and a small one over it: the second unpacks only its own layer. Prints JSON, each
headline ratio with the baseline issue 19 measured, its target and whether it is met; removes
its temporary directory even when interrupted.

    .venv/bin/python benchmarks/bench_images.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

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


async def timed_pairs(
    ours: Callable[[int], Awaitable[object]], tar: Callable[[int], list[str]], repeat: int
) -> dict[str, list[float]]:
    """`repeat` samples of ours and of tar, alternating: wall and CPU time (ms). CPU time (all
    our threads; the tar process and its gzip) tells the work apart from a busy machine's
    waits."""
    samples: dict[str, list[float]] = {"ours": [], "tar": [], "ours_cpu": [], "tar_cpu": []}
    for attempt in range(repeat):
        cpu, start = cpu_ms(resource.RUSAGE_SELF), time.perf_counter()
        await ours(attempt)
        samples["ours"].append((time.perf_counter() - start) * 1000)
        samples["ours_cpu"].append(cpu_ms(resource.RUSAGE_SELF) - cpu)
        arguments = tar(attempt)
        cpu, start = cpu_ms(resource.RUSAGE_CHILDREN), time.perf_counter()
        subprocess.run(arguments, check=True)
        samples["tar"].append((time.perf_counter() - start) * 1000)
        samples["tar_cpu"].append(cpu_ms(resource.RUSAGE_CHILDREN) - cpu)
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
    if (name, work) in TARGET:
        result["baseline_ratio"] = BASELINE[(name, work)]
        result["target_ratio"] = TARGET[(name, work)]
        result["met"] = ratio <= TARGET[(name, work)]
    return result


def fresh_directory(path: Path) -> list[str]:
    path.mkdir()
    return ["-C", str(path)]


async def bench_format(work: Path, name: str, tarball: Path, repeat: int) -> dict[str, object]:
    stores = [ImageStore(work / f"{name}-import-{attempt}") for attempt in range(repeat)]

    async def import_into_fresh_store(attempt: int) -> None:
        await stores[attempt].import_tarball(tarball)

    def tar_extract_tarball(attempt: int) -> list[str]:
        return ["tar", "-xf", str(tarball), *fresh_directory(work / f"{name}-tar-{attempt}")]

    imports = await timed_pairs(import_into_fresh_store, tar_extract_tarball, repeat)
    image = stores[0].get(REFERENCE)
    [layer] = image.layers
    blob = stores[0].blob_path(layer.digest)
    for store in stores:  # unpack again from the stored blobs, as for a store without layers
        shutil.rmtree(store.layout.layer_path(image.diff_ids[0]))

    async def unpack(attempt: int) -> None:
        await stores[attempt].layers(REFERENCE)

    def tar_extract_layer(attempt: int) -> list[str]:  # tar detects gzip itself
        return ["tar", "-xf", str(blob), *fresh_directory(work / f"{name}-layer-{attempt}")]

    unpacks = await timed_pairs(unpack, tar_extract_layer, repeat)
    return {
        "tarball_bytes": tarball.stat().st_size,
        "layer_media_type": layer.media_type,
        "import": row(KEYS[name], "import", imports),
        "unpack": row(KEYS[name], "unpack", unpacks),
    }


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
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.repeat)), indent=2))


if __name__ == "__main__":
    main()
