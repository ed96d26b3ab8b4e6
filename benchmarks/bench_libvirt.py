"""Benchmark: boot-to-exit of `/bin/true` in a guest through our service (libvirt runtime) against
`qemu-system-x86_64 -kernel ... -initrd ...` run directly, with the same kernel, the same
initramfs and the same kernel command line, in the same run. Also the same through libvirt's
microvm machine type (a second service, `machine = "microvm"` plus the guest kernel's timer
flags) and `-M microvm` directly. All four run in turn, run by run, so they see the same load;
the 1-minute load average after each round is printed with the numbers.

Starts its own private libvirtd (tests/integration/libvirtd.py, under a prompt child reaper)
and services (all removed at the end); needs root, libvirt, QEMU and the guest kernel
(deploy/vm-kernel.sh). Prints JSON.

    .venv/bin/python benchmarks/bench_libvirt.py [--runs 5] [--kernel PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

import libvirt  # type: ignore[import-untyped]
import psutil

from adapter.api.containerizer.v1 import containerizer_pb2 as pb
from adapter.runtimes.libvirt import domain
from adapter.runtimes.libvirt.driver import KERNEL_CMDLINE
from adapter.runtimes.libvirt.initramfs import (
    GuestCommand,
    base_initramfs,
    write_container_initramfs,
)
from tests.conftest import ServiceProcess
from tests.integration.libvirtd import PrivateLibvirtd, libvirt_service

DEFAULT_KERNEL = "/var/lib/containerizer/libvirt/kernel/vmlinuz"
MEMORY_MIB = 256
TRUE = GuestCommand(argv=("/bin/true",))
WARMUP = 1
SERVICE_STEPS = ("launch_rpc", "qemu_exit", "stopped", "wait")


def through_service(
    service: ServiceProcess, raw: RawLibvirt, container_id: str
) -> dict[str, float]:
    """One boot-to-exit through the API, in seconds from the Launch call to: its return, QEMU's
    exit, libvirt's STOPPED event for the domain (seen by `raw`'s listener on the same libvirtd)
    and the return of Wait. Wait minus STOPPED is what the service adds at the end."""
    stub = service.stub()
    started = time.perf_counter()
    reply = stub.Launch(
        pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(argv=["/bin/true"]),
            resources=[
                pb.Resource(name="mem", type=pb.Value.SCALAR, scalar=pb.Value.Scalar(value=256))
            ],
        ),
        timeout=120,
    )
    launched = time.perf_counter() - started
    qemu_exit = threading.Thread(target=_wait_for_pid, args=(reply.status.pid,), daemon=True)
    qemu_exit.start()
    waited = stub.Wait(pb.WaitRequest(container_id=container_id), timeout=300)
    total = time.perf_counter() - started
    assert waited.termination.exit_code == 0, waited.termination.message
    stub.Destroy(pb.DestroyRequest(container_id=container_id), timeout=60)
    qemu_exit.join()
    return {
        "launch_rpc": launched,
        "qemu_exit": _EXITS.pop(reply.status.pid) - started,
        "stopped": raw.stopped_at(domain.domain_name(container_id)) - started,
        "wait": total,
    }


_EXITS: dict[int, float] = {}


def _wait_for_pid(pid: int) -> None:
    """Note when process `pid` (not our child) exits: a pidfd turns readable at the exit
    itself, not when the process is reaped."""
    pidfd = os.pidfd_open(pid)
    try:
        select.select([pidfd], [], [])
    finally:
        os.close(pidfd)
    _EXITS[pid] = time.perf_counter()


class RawLibvirt:
    """The same guest started on the same libvirtd without the service: createXML of the domain
    XML our driver builds, the domain destroyed on its SHUTDOWN event as the driver does, done at
    its STOPPED event. What it costs over direct QEMU is libvirt's; what the service costs over
    it is ours."""

    def __init__(self, uri: str, kernel: Path, initrd: Path, scratch: Path) -> None:
        libvirt.virEventRegisterDefaultImpl()
        self._conn = libvirt.open(uri)
        self._kernel, self._initrd, self._scratch = kernel, initrd, scratch
        self._events: dict[str, dict[int, float]] = {}
        self._conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
        )
        threading.Thread(target=self._dispatch, daemon=True).start()

    @staticmethod
    def _dispatch() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    def _on_lifecycle(self, conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
        self._events.setdefault(dom.name(), {})[event] = time.perf_counter()
        if event == libvirt.VIR_DOMAIN_EVENT_SHUTDOWN:
            threading.Thread(target=_destroy_quietly, args=(dom,), daemon=True).start()

    def stopped_at(self, name: str) -> float:
        """When libvirt reported domain `name` STOPPED (waits for it)."""
        while libvirt.VIR_DOMAIN_EVENT_STOPPED not in self._events.get(name, {}):
            time.sleep(0.002)
        return self._events[name][libvirt.VIR_DOMAIN_EVENT_STOPPED]

    def _xml(self, name: str, machine: str, cmdline: str) -> tuple[str, str]:
        run = self._scratch / name
        run.mkdir(exist_ok=True)
        domain_uuid = str(uuid.uuid4())
        serial = [str(run / f"ttyS{port}") for port in range(4)]
        spec = domain.DomainSpec(
            name=name, uuid=domain_uuid, virt_type="qemu", machine=machine,
            memory_mib=MEMORY_MIB, vcpus=1, cpu_shares=1024, partition="/machine",
            kernel=str(self._kernel), initrd=str(self._initrd), cmdline=cmdline,
            serial=domain.SerialFiles(*serial),
            metadata=domain.Metadata(name, str(run), serial[3], str(run), "bench"),
        )  # fmt: skip
        return domain.domain_xml(spec), domain_uuid

    def boot(
        self, name: str, machine: str = "pc", cmdline: str = KERNEL_CMDLINE
    ) -> dict[str, float]:
        """Seconds from createXML to: its return, QEMU's exit (pidfd), libvirt's STOPPED."""
        xml, domain_uuid = self._xml(name, machine, cmdline)
        started = time.perf_counter()
        self._conn.createXML(xml, 0)
        created = time.perf_counter() - started
        pid = _qemu_pid(domain_uuid)
        _wait_for_pid(pid)
        qemu_exit = _EXITS.pop(pid) - started
        stopped = self.stopped_at(name) - started
        status = (self._scratch / name / "ttyS3").read_text().strip()
        assert status == "exit 0", status
        return {"create_xml": created, "qemu_exit": qemu_exit, "stopped": stopped}


def _destroy_quietly(dom: Any) -> None:
    with contextlib.suppress(libvirt.libvirtError):  # it stopped by itself first
        dom.destroy()


def _qemu_pid(domain_uuid: str) -> int:
    """The QEMU running that domain, found by the UUID on its command line."""
    (pid,) = [
        p.pid for p in psutil.process_iter(["cmdline"]) if domain_uuid in (p.info["cmdline"] or [])
    ]
    return int(pid)


# microvm has no PIT/HPET/PM timer under TCG by default: the kernel hangs calibrating the TSC
# unless it is told the frequency and the loop rate.
MICROVM_MACHINE = ["-M", "microvm,pit=on,pic=on,rtc=on"]
MICROVM_TIMER_ARGS = " tsc_early_khz=2000000 no_timer_check lpj=4000000 tsc=reliable"


def direct_qemu(
    kernel: Path,
    initrd: Path,
    scratch: Path,
    machine: list[str],
    timeout: float,
    append: str = KERNEL_CMDLINE,
) -> float | str:
    """One boot-to-exit of the same guest under qemu-system-x86_64 directly, with four serial
    files like our domains: seconds, or why it failed."""
    serial = [scratch / f"ttyS{port}" for port in range(4)]
    ports: list[str] = []
    for port, path in enumerate(serial):
        path.unlink(missing_ok=True)
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
        return f"did not power off within {timeout:g}s"
    except subprocess.CalledProcessError as exc:
        return f"qemu failed: {exc.stderr.decode(errors='replace')[-300:]}"
    elapsed = time.perf_counter() - started
    if serial[3].read_text().strip() != "exit 0":
        return "the guest reported no `exit 0`"
    return elapsed


def p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def ratio(values: list[float], reference: list[float]) -> float | None:
    if not values or not reference:
        return None
    return round(statistics.median(values) / statistics.median(reference), 3)


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def compare(
    services: dict[str, ServiceProcess],
    raw: RawLibvirt,
    kernel: Path,
    initrd: Path,
    scratch: Path,
    runs: int,
) -> dict[str, Any]:
    """Each service, raw libvirt, direct `-M pc` and direct microvm, run by run, so all see the
    same load."""
    samples: dict[str, list[float]] = {"direct": [], "microvm": []}
    samples.update({f"raw_{step}": [] for step in ("create_xml", "qemu_exit", "stopped")})
    for name in services:
        samples.update({f"{name}_{step}": [] for step in SERVICE_STEPS})
    outcomes = {"direct": "ok", "microvm": "ok"}
    loads = []
    for run in range(-WARMUP, runs):
        ours = {
            name: through_service(service, raw, f"bench-{name}-{run + WARMUP}")
            for name, service in services.items()
        }
        raw_steps = raw.boot(f"containerizer-bench-raw-{run + WARMUP}")
        direct = direct_qemu(kernel, initrd, scratch, ["-M", "pc"], 120)
        microvm: float | str = outcomes["microvm"]
        if outcomes["microvm"] == "ok":
            microvm = direct_qemu(
                kernel, initrd, scratch, MICROVM_MACHINE, 60, KERNEL_CMDLINE + MICROVM_TIMER_ARGS
            )
        loads.append(_load())
        if run < 0:
            continue
        for step, seconds in raw_steps.items():
            samples[f"raw_{step}"].append(seconds)
        for name, steps in ours.items():
            for step, seconds in steps.items():
                samples[f"{name}_{step}"].append(seconds)
        for name, value in (("direct", direct), ("microvm", microvm)):
            if isinstance(value, float):
                samples[name].append(value)
            else:
                outcomes[name] = value
    return {"samples": samples, "outcomes": outcomes, "loads": loads}


def step_p50(samples: dict[str, list[float]], later: str, earlier: str) -> float | None:
    """Median over runs of the time between two steps of the same run."""
    gaps = [b - a for a, b in zip(samples[earlier], samples[later], strict=True)]
    return p50(gaps)


def report(result: dict[str, Any], runs: int) -> dict[str, Any]:
    samples = result["samples"]
    service, microvm = samples["service_wait"], samples["service_microvm_wait"]
    return {
        "benchmark": "libvirt boot-to-exit of /bin/true (TCG), runs interleaved",
        "runs": runs,
        "load_1min": result["loads"],
        "service_p50_s": p50(service),
        "direct_qemu_pc_p50_s": p50(samples["direct"]),
        "ratio_service_vs_direct": ratio(service, samples["direct"]),
        "baseline_ratio_service_vs_direct": 1.27,  # when the targets below were set
        "target_ratio_service_vs_direct": 1.1,
        "target_ratio_service_microvm_vs_direct_pc": 1.0,
        "raw_libvirt_p50_s": p50(samples["raw_stopped"]),
        "ratio_raw_libvirt_vs_direct": ratio(samples["raw_stopped"], samples["direct"]),
        "ratio_service_vs_raw_libvirt": ratio(service, samples["raw_stopped"]),
        # Where the time goes. libvirt's: createXML (QEMU started with -S, QMP negotiated, the
        # guest CPU read back property by property, then resumed) and the stop (libvirt polls
        # the exited QEMU every 200 ms before it reports STOPPED). Ours: the Launch RPC around
        # createXML, and Wait after STOPPED.
        "raw_libvirt_create_xml_p50_s": p50(samples["raw_create_xml"]),
        "service_launch_rpc_p50_s": p50(samples["service_launch_rpc"]),
        "raw_libvirt_stopped_after_qemu_exit_p50_s": step_p50(
            samples, "raw_stopped", "raw_qemu_exit"
        ),
        "service_stopped_after_qemu_exit_p50_s": step_p50(
            samples, "service_stopped", "service_qemu_exit"
        ),
        "service_wait_after_stopped_p50_s": step_p50(samples, "service_wait", "service_stopped"),
        "service_microvm_p50_s": p50(microvm),
        "ratio_service_microvm_vs_direct_pc": ratio(microvm, samples["direct"]),
        "direct_qemu_microvm_p50_s": p50(samples["microvm"]),
        "microvm_outcome": result["outcomes"]["microvm"],
        "ratio_service_microvm_vs_direct_microvm": ratio(microvm, samples["microvm"]),
        "ratio_direct_microvm_vs_pc": ratio(samples["microvm"], samples["direct"]),
        "service_runs_s": [round(t, 3) for t in service],
        "raw_libvirt_runs_s": [round(t, 3) for t in samples["raw_stopped"]],
        "direct_runs_s": [round(t, 3) for t in samples["direct"]],
    }


def _services(scratch: Path, daemon: PrivateLibvirtd, kernel: Path) -> dict[str, ServiceProcess]:
    """The two services measured, registered with the (started) daemon, which removes their
    cgroups when it stops, or the next run does if this one is killed."""
    return {
        "service": libvirt_service(daemon, scratch / "service", "qemu", "", kernel),
        # libvirt's microvm: its defaults already give TCG a PIT, PIC and RTC; the guest
        # kernel still needs the timer flags.
        "service_microvm": libvirt_service(
            daemon,
            scratch / "service-microvm",
            "qemu",
            f'machine = "microvm"\nkernel_args = "{MICROVM_TIMER_ARGS.strip()}"\n',
            kernel,
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--kernel", default=DEFAULT_KERNEL)
    args = parser.parse_args()
    kernel = Path(args.kernel)
    with tempfile.TemporaryDirectory(prefix="bench-libvirt-") as temporary:
        scratch = Path(temporary)
        daemon = PrivateLibvirtd(scratch / "libvirtd")
        services: dict[str, ServiceProcess] = {}
        try:
            daemon.start()
            services = _services(scratch, daemon, kernel)
            for service in services.values():
                service.start()
            base = asyncio.run(
                base_initramfs(
                    scratch / "initramfs", Path("/bin/busybox"), kernel.parent / "modules"
                )
            )
            initrd = scratch / "initrd"
            write_container_initramfs(base, TRUE, initrd)
            raw = RawLibvirt(daemon.uri, kernel, initrd, scratch)
            result = compare(services, raw, kernel, initrd, scratch, args.runs)
        finally:
            for service in services.values():
                service.stop()
            daemon.stop()
            for service in services.values():
                service.remove_cgroup_roots()  # the root and libvirt's `<root>.partition`
    print(json.dumps(report(result, args.runs), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
