"""The libvirt runtime ("libvirt"): each container is a transient QEMU/KVM domain.

Two kinds of guest, both booted directly with the configured kernel and our initramfs:
- command (no image): the initramfs's init runs the command and powers off; its exit status
  comes back over a serial port.
- disk image (`image` names an entry of `[runtimes.libvirt.disk_images]`, see disk.py): a
  long-running guest. The init mounts a per-container qcow2 overlay on the base disk as root
  (`root=/dev/vda`) and hands over to the disk's own /sbin/init; the command goes in as
  cloud-init user-data on a config drive. The container ends when the guest powers off (exit
  0, or the code the guest writes to the status port) or is killed.

Network: with the node's isolator deciding (a [network] table, or a mode asked for),
mode bridge is a virtio NIC whose tap libvirt puts on the isolator's bridge under the
isolator's link name, so forwards, tc shaping, counters and sweeps work as for a veth; the
address reaches the guest as `ip=ADDR::GW:MASK::eth0:off` on the kernel command line (and as
cloud-init network-config in disk mode). Mode none is a guest without NIC; host is refused.

Launch builds the container's initrd (initramfs.py), the domain XML (domain.py) and starts it in
the resource partition `/<cgroups_root>`, so QEMU lands in cgroups the shared accounting reader
can read; the real directories are taken from QEMU's /proc/<pid>/cgroup and kept in the handle.
The end of a guest arrives as a libvirt lifecycle event through libvirt's asyncio event-loop
integration (connection.py); its exit status is what the guest wrote to a serial port, a file
QEMU writes, so it survives a crash of this service. A domain libvirt refuses to start fails the
launch at once with libvirt's message (nothing of it is left to wait for). Whether guests run
under KVM or TCG is decided in the background at start (kvm.py) and remembered.

The guest's stdout and stderr are the sandbox's files (serial ports 1 and 2); with a CRI log
(`linux.log_path`) a follower also copies them there as records (output.py), and `wait` returns
the exit only once that log is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import shutil
import uuid
from pathlib import Path
from typing import Any

import libvirt  # type: ignore[import-untyped]

from adapter.core.errors import (
    ContainerizerError,
    FailedPrecondition,
    InvalidArgument,
    LaunchFailed,
    NotFound,
    Unavailable,
)
from adapter.core.limits import CPU_SHARES_PER_CPU
from adapter.core.model import Capabilities, Exit, Fingerprint, LaunchSpec, Resources, Statistics
from adapter.core.services import Services
from adapter.runtimes.base import Checkpointed, Launched
from adapter.runtimes.crilog import check_log_file
from adapter.runtimes.libvirt import cgroups, disk, domain, kvm
from adapter.runtimes.libvirt.confinement import vm_confinement
from adapter.runtimes.libvirt.connection import Connection, connection_failed
from adapter.runtimes.libvirt.handle import GuestHandle
from adapter.runtimes.libvirt.initramfs import (
    STATUS_PORT,
    GuestCommand,
    base_initramfs,
    source_signature,
    write_container_initramfs,
)
from adapter.runtimes.libvirt.options import MIN_GUEST_MEMORY_MIB, LibvirtOptions
from adapter.runtimes.libvirt.output import GuestOutput, GuestOutputs
from adapter.runtimes.libvirt.state import Guest, Guests
from isolators.cgroups.accounting import read_statistics
from isolators.network.model import Attachment

log = logging.getLogger(__name__)

KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1"


class LibvirtDriver:
    name = "libvirt"

    def __init__(self, options: LibvirtOptions, services: Services) -> None:
        node = services.node
        self._options = options
        self._services = services  # its cgroups are discovered at the first launch
        self._owner = str(node.state_dir)
        self._base_dir = node.state_dir / "libvirt"
        self._run_root = self._base_dir / "run"
        self._partition = "/" + node.cgroups_root.strip("/")
        self._node = node
        self._guests = Guests()
        self._outputs = GuestOutputs()  # the CRI logs being written
        self._network = services.network
        self._libvirt = Connection(self._options.uri, self._guests, services.libvirt_events)
        self._partition_lock = asyncio.Lock()
        # Per kind (with virtio modules or not): the sources' signature and the base archive.
        self._base_archives: dict[bool, tuple[tuple[object, ...], Path]] = {}
        self._virt = kvm.VirtTypeChooser(
            self._options.virt_type,
            kernel=self._options.kernel,
            base_initramfs=self._base_initramfs,
            cache=self._base_dir / "virt-type.json",
            timeout=self._options.kvm_probe_timeout,
        )

    # ---- configuration checks ----

    async def _base_initramfs(self, *, virtio: bool = False) -> Path:
        """The cached base archive. Which one is remembered per kind until busybox or a module
        file changes (their stat signature): finding it by content hash reads and hashes them,
        ~5-15 ms of the event loop per launch."""
        modules = self._options.kernel.parent / "modules"
        signature = source_signature(self._options.busybox, modules)
        remembered = self._base_archives.get(virtio)
        if signature is not None and remembered is not None:
            known_signature, path = remembered
            if known_signature == signature and path.is_file():
                return path
        path = await base_initramfs(
            self._base_dir / "initramfs", self._options.busybox, modules, virtio=virtio
        )
        if signature is not None:
            self._base_archives[virtio] = (signature, path)
        return path

    def _check_kernel(self) -> None:
        if not self._options.kernel.is_file():
            raise FailedPrecondition(
                f"libvirt: guest kernel {self._options.kernel} is missing; run"
                f" deploy/vm-kernel.sh {self._options.kernel.parent}"
            )

    async def _virt_choice(self) -> kvm.VirtChoice:
        """The domain type; waits for the KVM probe if it is still running."""
        self._check_kernel()
        return await self._virt.choice()

    async def fingerprint(self) -> Fingerprint:
        """Answers at once: a KVM probe still running is reported, not waited for."""
        capabilities = Capabilities(
            images=bool(self._options.disk_images),
            live_update=True,
            pid_namespace=True,
            recover=True,
            network_isolation=True,
            single_container_pods=True,  # a VM joins no namespaces: one container per pod
        )
        try:
            conn = await self._libvirt.get()
            self._check_kernel()
            choice = self._virt.current()
            libvirt_version = await self._libvirt.call(conn.getLibVersion)
            qemu_version = await self._libvirt.call(conn.getVersion)
            host_capabilities = await self._libvirt.call(conn.getCapabilities)
        except ContainerizerError as exc:
            return Fingerprint(self.name, "", False, str(exc), capabilities)
        version = _version(libvirt_version)
        if choice is None:
            virt = (
                "virt_type=deciding (a KVM probe is booting a guest, up to"
                f" {self._virt.probe_timeout:g}s; launches wait for it)"
            )
        else:
            virt = f"virt_type={choice.virt_type} ({choice.reason})"
        message = f"{virt}; libvirt {version}, qemu {_version(qemu_version)}; {self._options.uri}"
        confinement = vm_confinement(
            host_capabilities, choice.virt_type if choice else "kvm or qemu", self._partition
        )
        return Fingerprint(self.name, version, True, message, capabilities, confinement)

    # ---- lifecycle ----

    def _shape(self, spec: LaunchSpec) -> tuple[int, int, tuple[str, ...]]:
        """Guest RAM (MiB) and vCPUs from the resources, and what was adjusted."""
        warnings: list[str] = []
        memory = self._options.memory_mib
        if spec.resources.mem_mib is not None:
            memory = math.ceil(spec.resources.mem_mib)
            if memory < MIN_GUEST_MEMORY_MIB:
                warnings.append(
                    f"guest RAM raised from {memory} MiB to the minimum of"
                    f" {MIN_GUEST_MEMORY_MIB} MiB"
                )
                memory = MIN_GUEST_MEMORY_MIB
        vcpus = max(1, math.ceil(spec.resources.cpus or 1))
        if spec.command.user:
            warnings.append(f"user {spec.command.user!r} ignored: the guest runs as root")
        return memory, vcpus, tuple(warnings)

    async def start(self, spec: LaunchSpec) -> Launched:
        cid = spec.container_id
        # Everything a request can get wrong is refused before anything exists.
        memory, vcpus, warnings = self._shape(spec)
        base_disk = self._base_disk(spec)
        bridged = self._bridged(spec)
        if spec.linux.log_path:  # a log that cannot be written fails the launch, saying why
            check_log_file(spec.linux.log_path)
        conn = await self._libvirt.get()
        choice = await self._virt_choice()
        run_dir = self._run_root / cid
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True, mode=0o700)
        handle = GuestHandle(
            domain_name=domain.domain_name(cid),
            domain_uuid=str(uuid.uuid4()),
            run_dir=str(run_dir),
            status_path=str(run_dir / f"ttyS{STATUS_PORT}"),
            console_path=str(run_dir / "console"),
            virt_type=choice.virt_type,
            disk_image=spec.image or "",
        )
        guest = Guest(handle, asyncio.get_running_loop().create_future(), memory, vcpus)
        self._guests.add(cid, guest)
        try:
            attachment = None
            if bridged:
                attachment = await self._network.prepare_link(spec)
            address = _guest_address(attachment)
            xml = await self._prepare(spec, handle, guest, base_disk, address)
            await self._start_domain(conn, xml)
            guest.handle = cgroups.attach_qemu(
                handle, self._services.cgroups.hierarchies, self._partition
            )
            if spec.linux.log_path:  # the serial files exist now, emptied for this guest
                self._follow_output(spec, guest)
            if address is not None:
                await self._network.link_created(cid)
        except ContainerizerError as exc:
            if isinstance(exc, Unavailable | FailedPrecondition | InvalidArgument):
                raise
            raise LaunchFailed(f"launch of {cid!r} failed: {exc}") from exc
        ip_address = address.address if address is not None else ""
        return Launched(guest.handle.to_json(), guest.handle.qemu_pid, warnings, ip_address)

    def _base_disk(self, spec: LaunchSpec) -> Path | None:
        """The configured base disk an image launch boots, or None for a command guest."""
        if spec.image is None:
            return None
        if not spec.command.resolved_argv():
            raise InvalidArgument(
                "command",
                f"is empty: the libvirt runtime has no image command to run (disk image"
                f" {spec.image!r} boots its own init, and the command reaches it as user-data);"
                " give a shell string or an argv",
            )
        return disk.resolve_image(self._options.disk_images, spec.image)

    async def _start_domain(self, conn: Any, xml: str) -> None:
        """Start the transient domain in our resource partition. libvirt's refusal (a cgroup
        it cannot write, QEMU failing to start) is the launch's failure, with its message."""
        async with self._partition_lock:
            cgroups.ensure_partition(self._partition)
            try:
                await asyncio.to_thread(conn.createXML, xml, 0)
            except libvirt.libvirtError as exc:
                message = f"libvirt at {self._options.uri}: {exc.get_error_message()}"
                if connection_failed(exc):
                    raise Unavailable(message) from exc
                raise LaunchFailed(message) from exc

    def _bridged(self, spec: LaunchSpec) -> bool:
        """Whether the guest gets a NIC on the bridge. A VM cannot share the host's network
        namespace, so mode host is refused; without the isolator deciding (no [network] table,
        no mode asked for) the guest has no NIC, as before networking existed."""
        if not self._network.chooses(spec):
            return False
        mode = self._network.mode(spec)
        if mode == "host":
            raise FailedPrecondition(
                "container.network.mode: 'host' is not possible for a virtual machine"
                " (libvirt runtime); use 'bridge' or 'none'"
            )
        return mode == "bridge"

    async def _prepare(
        self,
        spec: LaunchSpec,
        handle: GuestHandle,
        guest: Guest,
        base_disk: Path | None,
        address: disk.GuestAddress | None,
    ) -> str:
        """Write the container's boot files (initrd, or overlay and config drive); return its
        domain XML."""
        run_dir = Path(handle.run_dir)
        cmdline = " ".join(filter(None, (KERNEL_CMDLINE, self._options.kernel_args)))
        if address is not None:
            cmdline += f" ip={address.address}::{address.gateway}:{address.netmask}::eth0:off"
        if base_disk is None:
            initrd = run_dir / "initrd"
            base = await self._base_initramfs(virtio=address is not None)
            write_container_initramfs(base, _guest_command(spec), initrd)
            disks: tuple[domain.Disk, ...] = ()
        else:
            initrd = await self._base_initramfs(virtio=True)  # no command: the disk's init runs
            disks = await self._disk_files(spec, run_dir, base_disk, address)
            cmdline += " root=/dev/vda rw"
        sandbox = Path(spec.sandbox)
        attachment = self._network.attachment(spec.container_id)
        interface = None
        if address is not None and attachment is not None and attachment.host_veth:
            interface = domain.BridgeInterface(
                bridge=self._network.bridge, tap=attachment.host_veth
            )
        return domain.domain_xml(
            domain.DomainSpec(
                name=handle.domain_name,
                uuid=handle.domain_uuid,
                virt_type=handle.virt_type,
                machine=self._options.machine,
                memory_mib=guest.memory_mib,
                vcpus=guest.vcpus,
                cpu_shares=self._node.limits(spec.resources).cpu_shares or CPU_SHARES_PER_CPU,
                partition=self._partition,
                kernel=str(self._options.kernel.resolve()),
                initrd=str(initrd),
                cmdline=cmdline,
                serial=domain.SerialFiles(
                    console=handle.console_path,
                    stdout=str(sandbox / "stdout"),
                    stderr=str(sandbox / "stderr"),
                    status=handle.status_path,
                ),
                metadata=domain.Metadata(
                    container_id=spec.container_id,
                    sandbox=spec.sandbox,
                    status_path=handle.status_path,
                    run_dir=handle.run_dir,
                    owner=self._owner,
                    labels=spec.labels,
                ),
                disks=disks,
                interface=interface,
            )
        )

    async def _disk_files(
        self, spec: LaunchSpec, run_dir: Path, base: Path, address: disk.GuestAddress | None
    ) -> tuple[domain.Disk, ...]:
        """The overlay on the base disk (vda) and the config drive with the command (vdb)."""
        overlay = await disk.create_overlay(base, run_dir)
        script = disk.user_data(
            spec.command.resolved_argv(), spec.command.environment, spec.command.working_dir
        )
        drive = await disk.write_config_drive(run_dir, spec.container_id, script, address)
        return (
            domain.Disk(str(overlay), "qcow2"),
            domain.Disk(str(drive), "raw", readonly=True),
        )

    async def _release_partition(self) -> None:
        """Remove the partition once no guest of ours is left in it (others keep it busy)."""
        async with self._partition_lock:
            if self._guests.items():
                return
            cgroups.remove_partition(self._partition)

    def _follow_output(self, spec: LaunchSpec, guest: Guest) -> None:
        """Copy the guest's output into its CRI log (output.py) until it has ended."""
        output = GuestOutput(spec.linux.log_path, spec.sandbox, guest.handle.run_dir)
        self._outputs.follow(spec.container_id, output, guest.stopped)

    async def wait(self, container_id: str) -> Exit:
        """The guest's exit, once its output is all in its CRI log."""
        guest = self._guests.get(container_id)
        if guest is None:
            return Exit(lost=True, message="the libvirt runtime has no record of this guest")
        exit_status = await asyncio.shield(guest.stopped)
        await self._outputs.drained(container_id)
        return exit_status

    async def signal(self, container_id: str, signal: int) -> None:
        """SIGTERM presses the ACPI power button (the guest's init passes it on as SIGTERM);
        SIGKILL pulls the plug. Other signals have no meaning for a virtual machine."""
        guest = self._guests.get(container_id)
        if guest is None or guest.stopped.done():
            raise NotFound(f"libvirt runtime: no running guest {container_id!r}")
        if signal not in (15, 9):
            raise FailedPrecondition(
                f"libvirt runtime: signal {signal} cannot be delivered to a guest;"
                " use 15 (ACPI shutdown) or 9 (destroy)"
            )
        guest.kill_signal = signal
        await self._stop_domain(guest.handle.domain_name, graceful=signal == 15)

    async def _stop_domain(self, name: str, *, graceful: bool) -> bool:
        """Shut down or pull the plug; False when there was no running domain to stop."""
        conn = await self._libvirt.get()
        try:
            dom = await asyncio.to_thread(conn.lookupByName, name)
            if graceful:
                flags = libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN
                await asyncio.to_thread(dom.shutdownFlags, flags)
            else:
                await asyncio.to_thread(dom.destroy)
        except libvirt.libvirtError as exc:
            gone = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)
            if exc.get_error_code() not in gone:
                raise Unavailable(f"libvirt: {name}: {exc.get_error_message()}") from exc
            return False
        return True

    async def kill_all(self, container_id: str) -> None:
        """Pull the plug: the guest is all the container's processes."""
        guest = self._guests.get(container_id)
        name = domain.domain_name(container_id)
        if guest is not None:
            if not guest.stopped.done():
                guest.kill_signal = 9
                # virDomainDestroy returns once QEMU is gone, so its status file is final:
                # settle now rather than wait for the STOPPED event, which a domain that never
                # started (a failed launch) does not send.
                await self._stop_domain(name, graceful=False)
                guest.resolve("was destroyed")
        elif await self._owned_domain(name):
            await self._stop_domain(name, graceful=False)

    async def cleanup(self, container_id: str) -> None:
        guest = self._guests.get(container_id)
        run_dir = self._run_root / container_id
        if guest is not None:
            run_dir = Path(guest.handle.run_dir)
        await self._network.cleanup(container_id)  # the tap went with the domain
        await self._outputs.stop(container_id)
        shutil.rmtree(run_dir, ignore_errors=True)  # initrd, or overlay and config drive
        self._guests.pop(container_id)
        await self._release_partition()

    async def _owned_domain(self, name: str) -> bool:
        """Whether a running domain of that name is ours (libvirtd may be shared)."""
        conn = await self._libvirt.get()
        try:
            dom = await asyncio.to_thread(conn.lookupByName, name)
            text = await asyncio.to_thread(
                dom.metadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT, domain.METADATA_NAMESPACE
            )
        except libvirt.libvirtError:
            return False
        try:
            return domain.parse_metadata(text).owner == self._owner
        except ValueError:
            return False

    async def update(self, container_id: str, resources: Resources) -> None:
        """CPU shares and the network rate change live; guest RAM and vCPUs are fixed."""
        guest = self._guests.get(container_id)
        if guest is None or guest.stopped.done():
            raise NotFound(f"libvirt runtime: no running guest {container_id!r}")
        if resources.mem_mib is not None and math.ceil(resources.mem_mib) != guest.memory_mib:
            raise FailedPrecondition(
                f"libvirt runtime: guest RAM is fixed at boot ({guest.memory_mib} MiB)"
            )
        if resources.cpus is None:
            return
        conn = await self._libvirt.get()
        dom = await self._libvirt.call(conn.lookupByUUIDString, guest.handle.domain_uuid)
        shares = {"cpu_shares": self._node.limits(resources).cpu_shares}
        await self._libvirt.call(
            dom.setSchedulerParametersFlags, shares, libvirt.VIR_DOMAIN_AFFECT_LIVE
        )

    async def usage(self, container_id: str) -> Statistics:
        """The domain's cgroups through the shared reader, completed by libvirt: CPU time of
        the whole QEMU process (its cpuacct cgroup may not be placed), RSS and guest RAM."""
        guest = self._guests.get(container_id)
        if guest is None:
            raise NotFound(f"libvirt runtime: no guest {container_id!r}")
        statistics = read_statistics(Path(d) for d in guest.handle.cgroup_dirs)
        conn = await self._libvirt.get()
        try:
            dom = await asyncio.to_thread(conn.lookupByUUIDString, guest.handle.domain_uuid)
            cpu = (await asyncio.to_thread(dom.getCPUStats, True))[0]
            memory = await asyncio.to_thread(dom.memoryStats)
        except libvirt.libvirtError as exc:
            raise NotFound(f"libvirt runtime: {exc.get_error_message()}") from exc
        if "user_time" in cpu:
            statistics["cpus_user_time_secs"] = cpu["user_time"] / 1e9
            statistics["cpus_system_time_secs"] = cpu.get("system_time", 0) / 1e9
        if "rss" in memory:
            statistics.setdefault("mem_rss_bytes", memory["rss"] * 1024)
        statistics.setdefault("mem_limit_bytes", guest.memory_mib * 1024 * 1024)
        statistics.update(await asyncio.to_thread(disk.overlay_usage, Path(guest.handle.run_dir)))
        return statistics  # the tap's counters come from the node's network, in the core

    # ---- recovery ----

    async def recover(self, checkpointed: list[Checkpointed], known_ids: set[str]) -> None:
        loop = asyncio.get_running_loop()
        if self._options.kernel.is_file():
            self._virt.start()  # in the background: the service's start does not wait for it
        for entry in checkpointed:
            if not entry.handle:
                continue
            memory, vcpus, _ = self._shape(entry.spec)
            handle = GuestHandle.from_json(entry.handle)
            guest = Guest(handle, loop.create_future(), memory, vcpus)
            self._guests.add(entry.spec.container_id, guest)
            if entry.spec.linux.log_path:  # goes on where the copy stood (output.py)
                try:
                    self._follow_output(entry.spec, guest)
                except FailedPrecondition as exc:
                    log.warning("libvirt: %s: no CRI log: %s", entry.spec.container_id, exc)
        try:
            await self._libvirt.get()  # resyncs: guests that ended while we were down resolve
            await self._remove_orphan_domains(known_ids)
        except Unavailable as exc:
            log.warning("libvirt: not reachable at recovery, will retry: %s", exc)
            self._libvirt.reconnect_in_background()
        if self._run_root.is_dir():
            for run_dir in self._run_root.iterdir():
                if run_dir.name not in known_ids:
                    log.info("libvirt: removing orphan run directory %s", run_dir)
                    shutil.rmtree(run_dir, ignore_errors=True)
        await self._release_partition()

    async def _remove_orphan_domains(self, known_ids: set[str]) -> None:
        conn = await self._libvirt.get()
        for dom in await self._libvirt.call(conn.listAllDomains, 0):
            if not dom.name().startswith(domain.DOMAIN_PREFIX):
                continue
            try:
                text = await asyncio.to_thread(
                    dom.metadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT, domain.METADATA_NAMESPACE
                )
                metadata = domain.parse_metadata(text)
            except (libvirt.libvirtError, ValueError):
                continue  # not ours: no metadata in our namespace
            if metadata.owner == self._owner and metadata.container_id not in known_ids:
                log.info("libvirt: destroying orphan domain %s", dom.name())
                with contextlib.suppress(libvirt.libvirtError):
                    await asyncio.to_thread(dom.destroy)

    async def reopen_log(self, container_id: str) -> None:
        """ReopenContainerLog: the CRI log's path opened again (the kubelet renamed the file)."""
        self._outputs.reopen(container_id)

    async def close(self) -> None:
        await self._outputs.close()  # before the guests' futures are cancelled
        await self._libvirt.close()
        await self._virt.close()
        self._guests.clear()


def _guest_command(spec: LaunchSpec) -> GuestCommand:
    return GuestCommand(
        argv=tuple(spec.command.resolved_argv()),
        environment=tuple(f"{name}={value}" for name, value in spec.command.environment),
        working_dir=spec.command.working_dir,
    )


def _guest_address(attachment: Attachment | None) -> disk.GuestAddress | None:
    if attachment is None or attachment.address is None or attachment.gateway is None:
        return None
    return disk.GuestAddress(attachment.address, attachment.prefix_len, attachment.gateway)


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"
