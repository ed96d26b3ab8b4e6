"""Benchmark: importing and unpacking the busybox test image through the image store, next to
GNU tar doing the same bytes in the same run (`tar -xf` of the tarball for import, `tar -xf` of
the layer blob for unpack). Prints JSON; removes its temporary directory even when interrupted.

    .venv/bin/python benchmarks/bench_images.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

from adapter.images import ImageStore
from tests.images import REFERENCE, busybox_docker_archive, busybox_oci_layout


def summary(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50": statistics.median(ordered), "p99": p99, "min": ordered[0]}


async def timed_async(make: Callable[[int], Awaitable[object]], repeat: int) -> list[float]:
    samples = []
    for attempt in range(repeat):
        start = time.perf_counter()
        await make(attempt)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def timed_tar(arguments: Callable[[int], list[str]], repeat: int) -> list[float]:
    samples = []
    for attempt in range(repeat):
        start = time.perf_counter()
        subprocess.run(arguments(attempt), check=True)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def bench_format(work: Path, name: str, tarball: Path, repeat: int) -> dict[str, object]:
    async def import_into_fresh_store(attempt: int) -> None:
        await ImageStore(work / f"{name}-import-{attempt}").import_tarball(tarball)

    def tar_extract_tarball(attempt: int) -> list[str]:
        target = work / f"{name}-tar-{attempt}"
        target.mkdir()
        return ["tar", "-xf", str(tarball), "-C", str(target)]

    import_ms = await timed_async(import_into_fresh_store, repeat)
    tar_import_ms = timed_tar(tar_extract_tarball, repeat)

    stores = [ImageStore(work / f"{name}-unpack-{i}") for i in range(repeat)]
    for store in stores:
        await store.import_tarball(tarball)
    image = stores[0].get(REFERENCE)
    [layer] = image.layers
    blob = stores[0].blob_path(layer.digest)
    unpack_ms = await timed_async(lambda attempt: stores[attempt].rootfs(REFERENCE), repeat)

    def tar_extract_layer(attempt: int) -> list[str]:
        target = work / f"{name}-layer-{attempt}"
        target.mkdir()
        return ["tar", "-xf", str(blob), "-C", str(target)]  # tar detects gzip itself

    tar_unpack_ms = timed_tar(tar_extract_layer, repeat)
    imported, tar_imported = summary(import_ms), summary(tar_import_ms)
    unpacked, tar_unpacked = summary(unpack_ms), summary(tar_unpack_ms)
    return {
        "tarball_bytes": tarball.stat().st_size,
        "layer_media_type": layer.media_type,
        "import_ms": imported,
        "tar_x_tarball_ms": tar_imported,
        "ratio_import_to_tar_p50": imported["p50"] / tar_imported["p50"],
        "unpack_ms": unpacked,
        "tar_x_layer_ms": tar_unpacked,
        "ratio_unpack_to_tar_p50": unpacked["p50"] / tar_unpacked["p50"],
    }


async def run(repeat: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bench-images-") as directory:
        work = Path(directory)
        results: dict[str, object] = {"repeat": repeat}
        results["oci_layout"] = await bench_format(work, "oci", busybox_oci_layout(work), repeat)
        results["docker_archive"] = await bench_format(
            work, "docker", busybox_docker_archive(work), repeat
        )
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.repeat)), indent=2))


if __name__ == "__main__":
    main()
