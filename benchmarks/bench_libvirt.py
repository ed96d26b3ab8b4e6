"""Benchmark: boot-to-exit of `/bin/true` in a guest through our service (libvirt runtime) against
`qemu-system-x86_64 -kernel ... -initrd ...` run directly, with the same kernel, the same
initramfs and the same kernel command line, in the same run. Also tries `-M microvm` directly.

Starts its own private libvirtd and service (both removed at the end); needs root, libvirt,
QEMU and the guest kernel (deploy/vm-kernel.sh). Prints JSON.

    .venv/bin/python benchmarks/bench_libvirt.py [--runs 5] [--kernel PATH]
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.drivers.libvirt.driver import KERNEL_CMDLINE
from adapter.drivers.libvirt.initramfs import (
    GuestCommand,
    base_initramfs,
    write_container_initramfs,
)
from tests.conftest import ServiceProcess
from tests.integration.libvirtd import PrivateLibvirtd

DEFAULT_KERNEL = "/var/lib/containerizer/libvirt/kernel/vmlinuz"
MEMORY_MIB = 256
TRUE = GuestCommand(argv=("/bin/true",))


def through_service(service: ServiceProcess, runs: int) -> list[float]:
    stub = service.stub()
    times = []
    for run in range(runs):
        container_id = f"bench-true-{run}"
        started = time.perf_counter()
        stub.Launch(
            pb.LaunchRequest(
                container_id=container_id,
                command=pb.CommandInfo(argv=["/bin/true"]),
                resources=[
                    pb.Resource(name="mem", type=pb.Value.SCALAR, scalar=pb.Value.Scalar(value=256))
                ],
            ),
            timeout=120,
        )
        reply = stub.Wait(pb.WaitRequest(container_id=container_id), timeout=300)
        times.append(time.perf_counter() - started)
        assert reply.termination.exit_code == 0, reply.termination.message
        stub.Destroy(pb.DestroyRequest(container_id=container_id), timeout=60)
    return times


# microvm has no PIT/HPET/PM timer under TCG by default: the kernel hangs calibrating the TSC
# unless it is told the frequency and the loop rate.
MICROVM_MACHINE = ["-M", "microvm,pit=on,pic=on,rtc=on"]
MICROVM_TIMER_ARGS = " tsc_early_khz=2000000 no_timer_check lpj=4000000 tsc=reliable"


def direct_qemu(
    kernel: Path,
    initrd: Path,
    scratch: Path,
    runs: int,
    machine: list[str],
    timeout: float,
    append: str = KERNEL_CMDLINE,
) -> tuple[list[float], str]:
    """The same guest under qemu-system-x86_64 directly; four serial files like our domains."""
    times = []
    for run in range(runs):
        serial = [scratch / f"run{run}-ttyS{port}" for port in range(4)]
        ports: list[str] = []
        for port, path in enumerate(serial):
            ports += ["-chardev", f"file,id=s{port},path={path}"]
            ports += ["-device", f"isa-serial,chardev=s{port},index={port}"]
        command = [
            "qemu-system-x86_64", "-accel", "tcg", *machine, "-m", str(MEMORY_MIB),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", append, *ports,
        ]  # fmt: skip
        started = time.perf_counter()
        try:
            subprocess.run(command, check=True, timeout=timeout, capture_output=True)
        except subprocess.TimeoutExpired:
            return times, f"did not power off within {timeout:g}s"
        except subprocess.CalledProcessError as exc:
            return times, f"qemu failed: {exc.stderr.decode(errors='replace')[-300:]}"
        times.append(time.perf_counter() - started)
        if serial[3].read_text().strip() != "exit 0":
            return times, "the guest reported no `exit 0`"
    return times, "ok"


def p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--kernel", default=DEFAULT_KERNEL)
    args = parser.parse_args()
    kernel = Path(args.kernel)
    with tempfile.TemporaryDirectory(prefix="bench-libvirt-") as temporary:
        scratch = Path(temporary)
        daemon = PrivateLibvirtd(scratch / "libvirtd")
        (scratch / "service").mkdir()
        service = ServiceProcess(
            scratch / "service",
            extra_config=(
                f'default_runtime = "libvirt"\n[runtimes.libvirt]\nuri = "{daemon.uri}"\n'
                f'kernel = "{kernel}"\nvirt_type = "qemu"\n'
            ),
        )
        try:
            daemon.start()
            service.start()
            base = asyncio.run(
                base_initramfs(
                    scratch / "initramfs", Path("/bin/busybox"), kernel.parent / "modules"
                )
            )
            initrd = scratch / "initrd"
            write_container_initramfs(base, TRUE, initrd)
            ours = through_service(service, args.runs)
            direct, _ = direct_qemu(kernel, initrd, scratch, args.runs, ["-M", "pc"], 120)
            microvm, microvm_outcome = direct_qemu(
                kernel, initrd, scratch, args.runs, MICROVM_MACHINE, 60,
                KERNEL_CMDLINE + MICROVM_TIMER_ARGS,
            )  # fmt: skip
        finally:
            service.stop()
            daemon.stop()
    result = {
        "benchmark": "libvirt boot-to-exit of /bin/true (TCG)",
        "runs": args.runs,
        "service_p50_s": p50(ours),
        "direct_qemu_pc_p50_s": p50(direct),
        "ratio_service_vs_direct": round(statistics.median(ours) / statistics.median(direct), 3),
        "direct_qemu_microvm_p50_s": p50(microvm),
        "microvm_outcome": microvm_outcome,
        "ratio_microvm_vs_pc": (
            round(statistics.median(microvm) / statistics.median(direct), 3) if microvm else None
        ),
        "service_runs_s": [round(t, 3) for t in ours],
        "direct_runs_s": [round(t, 3) for t in direct],
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
