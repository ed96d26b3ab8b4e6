"""CniIsolator: the network isolator with CNI plugins as its backend (`[network] backend = "cni"`).

The same verbs, checks and checkpoint as NetworkIsolator (it is one); what differs is who makes
the container's link, address, forwards and rate: the plugin chain of the operator's CNI network
config (cni.py) instead of our bridge, IPAM, nftables table and tc.

    prepare   namespace of ours (netns.py, as the bridge backend's), loopback up, then ADD; the
              config list and the result are checkpointed with the attachment
    usage     counters of the host-side interface the result names (the bridge plugin's veth)
    cleanup   DEL (reverse order, the cached result), then the namespace; a failed DEL keeps
              the attachment checkpointed, so recovery DELs it again
    recover   as the bridge backend's; a container still known gets CHECK (logged if it fails)
    update    a bandwidth change of a running container is refused: CNI has no update verb

Runtimes that join a namespace by path (native, containerd, LXC, CRI pods) work unchanged.
Runtimes that make their own link or namespace (libvirt's tap, docker's sandbox) are refused
with NetworkUnavailable; they keep the bridge backend. Mode "none" is a namespace with only
loopback and no plugin call; mode "host" creates nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import socket
import struct
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute

from isolators.network import cni, netns, veth
from isolators.network.isolator import NetworkIsolator
from isolators.network.model import (
    Attachment,
    NetworkConfigError,
    NetworkError,
    NetworkRequest,
    NetworkUnavailable,
    PortMapping,
)

log = logging.getLogger(__name__)

SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
IFREQ_FLAGS = "16sH22x"  # struct ifreq (40 bytes): ifr_name, ifr_flags


class CniIsolator(NetworkIsolator):
    name = "network"

    async def prepare(
        self,
        container_id: str,
        request: NetworkRequest,
        *,
        own_link: bool = False,
        netns_source: Path | None = None,
    ) -> Attachment:
        mode, _ = self.resolve(container_id, request)
        if mode == "bridge" and (own_link or netns_source is not None):
            raise NetworkUnavailable(
                "network.backend 'cni' attaches only namespaces the service creates; this"
                " runtime makes its own link or namespace (libvirt, docker): use backend 'bridge'"
            )
        planned = await super().prepare(container_id, request)
        # `_create` checkpointed the ADD result: return the attachment with its address.
        return self._state.attachments.get(container_id, planned)

    def _plan(
        self, container_id: str, mode: str, mappings: list[PortMapping], bandwidth: float | None
    ) -> Attachment:
        path = str(netns.netns_path(self._netns_prefix, container_id))
        if mode == "none":
            return Attachment(container_id, mode, netns_path=path)
        network = self._network()
        return Attachment(
            container_id,
            mode,
            netns_path=path,
            port_mappings=tuple(mappings),
            bandwidth_mbit=bandwidth,
            cni_config=network.to_json(),
        )

    def _network(self) -> cni.NetworkList:
        """The configured network list with every plugin present; NetworkUnavailable if not,
        before anything of the container exists."""
        try:
            network = cni.load_network(self.config.cni_conf_dir, self.config.cni_network)
        except NetworkConfigError as exc:
            raise NetworkUnavailable(str(exc)) from exc
        missing = cni.missing_plugins(self.config.cni_bin_dirs, network)
        if missing:
            searched = ", ".join(str(d) for d in self.config.cni_bin_dirs)
            raise NetworkUnavailable(
                f"CNI network {network.name!r} ({network.source}): plugins {missing} not found"
                f" in network.bin_dir ({searched})"
            )
        return network

    def ready(self) -> str | None:
        try:
            self._network()
        except NetworkError as exc:
            return str(exc)
        return None

    async def _create(self, attachment: Attachment, netns_source: Path | None = None) -> None:
        assert attachment.netns_path is not None and netns_source is None
        path = Path(attachment.netns_path)
        # Loopback up whether or not the chain has `loopback`: by the thread that made the
        # namespace, still in it (a second thread and netlink socket cost ~1 ms of the launch).
        await netns.create(path, then=_loopback_up)
        if attachment.cni_config is None:  # mode none
            return
        network = cni.NetworkList.from_json(attachment.cni_config, "checkpoint")
        result = await cni.add(self.config.cni_bin_dirs, network, _invocation(attachment))
        self._state.attachments[attachment.container_id] = _with_result(attachment, result)
        self._save()  # DEL after a crash gets the result the plugins expect

    async def _remove(self, attachment: Attachment) -> None:
        """As `cleanup`, for prepare's rollback and recovery: a DEL error is logged, not raised
        (the attachment stays checkpointed and the next recovery DELs it again)."""
        error = await self._delete(attachment)
        if error is not None:
            log.warning("network: %s: %s", attachment.container_id, error)

    async def cleanup(self, container_id: str) -> None:
        async with self._lock:
            attachment = self._state.attachments.get(container_id)
            if attachment is None:
                return
            error = await self._delete(attachment)
            if error is not None:
                raise error

    async def _delete(self, attachment: Attachment) -> NetworkError | None:
        """DEL, then the namespace, the /etc files and the checkpoint entry. On a DEL error the
        namespace and entry stay, so that DEL can be retried with both."""
        if attachment.cni_config is None:  # mode none, or the bridge backend's (config changed)
            await super()._remove(attachment)
            return None
        network = cni.NetworkList.from_json(attachment.cni_config, "checkpoint")
        try:
            await cni.delete(
                self.config.cni_bin_dirs, network, _invocation(attachment), attachment.cni_result
            )
        except NetworkError as exc:
            return exc
        except OSError as exc:  # the plugin could not be started
            return NetworkError(f"CNI DEL of {attachment.container_id!r}: {exc}")
        assert attachment.netns_path is not None
        netns.remove(Path(attachment.netns_path))
        shutil.rmtree(self._etc_root / attachment.container_id, ignore_errors=True)
        self._state.attachments.pop(attachment.container_id, None)
        self._save(durable=False)  # a removal lost to a power loss is DELeted again at recovery
        return None

    async def update(self, container_id: str, bandwidth_mbit: float | None) -> None:
        attachment = self._state.attachments.get(container_id)
        if attachment is None or attachment.cni_config is None:
            return
        if bandwidth_mbit != attachment.bandwidth_mbit:
            raise NetworkUnavailable(
                "network.backend 'cni' cannot change the bandwidth of a running container"
                " (CNI has no update); relaunch it with the new rate"
            )

    async def recover(self, known_ids: set[str]) -> None:
        """The bridge backend's recovery (orphans DELeted, namespaces swept), then CHECK of
        every container kept: a failure is logged for the operator, the container keeps running."""
        first = not self._recovered
        await super().recover(known_ids)
        if not first:
            return
        for attachment in list(self._state.attachments.values()):
            if attachment.cni_config is None or attachment.cni_result is None:
                continue
            network = cni.NetworkList.from_json(attachment.cni_config, "checkpoint")
            try:
                await cni.check(
                    self.config.cni_bin_dirs,
                    network,
                    _invocation(attachment),
                    attachment.cni_result,
                )
            except (NetworkError, OSError) as exc:
                log.warning("network: CHECK of %s failed: %s", attachment.container_id, exc)

    async def _check_node(self) -> None:
        """Nothing: the CNI network's subnet is the plugins' business, not a bridge of ours."""

    async def _sweep_links(self, host: AsyncIPRoute) -> None:
        """Nothing: the links of a CNI network are its plugins' (DEL removes a container's)."""

    async def _apply_forwards(self) -> None:
        """Nothing: forwards are the portmap plugin's, through runtimeConfig.portMappings."""

    async def close(self) -> None:
        """The bridge is the CNI network's, not this service's: only host sides that the bridge
        backend's cleanup detached (attachments from before a change of backend) go."""
        await self._detached.close()

    def write_etc_files(self, container_id: str, directory: Path, hostname: str) -> list[Path]:
        """The bridge backend's files; resolv.conf from the result's DNS when it has one."""
        written = super().write_etc_files(container_id, directory, hostname)
        attachment = self._state.attachments.get(container_id)
        if attachment is None or attachment.cni_result is None:
            return written
        with contextlib.suppress(NetworkError):
            result = cni.parse_result(attachment.cni_result)
            if result.nameservers:
                lines = [f"nameserver {n}" for n in result.nameservers]
                lines += [f"search {' '.join(result.search)}"] if result.search else []
                lines += [f"options {' '.join(result.dns_options)}"] if result.dns_options else []
                written[1].write_text("".join(f"{line}\n" for line in lines))
        return written


def _loopback_up() -> None:
    """In the thread that made the namespace, still in it: its loopback up with one
    SIOCGIFFLAGS/SIOCSIFFLAGS pair."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        request = struct.pack(IFREQ_FLAGS, b"lo", 0)
        _, flags = struct.unpack(IFREQ_FLAGS, fcntl.ioctl(sock, SIOCGIFFLAGS, request))
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(IFREQ_FLAGS, b"lo", flags | IFF_UP))


def _invocation(attachment: Attachment) -> cni.Invocation:
    assert attachment.netns_path is not None
    return cni.Invocation(
        container_id=attachment.container_id,
        netns=Path(attachment.netns_path),
        ifname=veth.CONTAINER_IFNAME,
        port_mappings=attachment.port_mappings,
        bandwidth_mbit=attachment.bandwidth_mbit,
    )


def _with_result(attachment: Attachment, result: dict[str, Any]) -> Attachment:
    """The attachment with what ADD gave: the first IPv4 address (Status' ip_address), its
    gateway, the host-side interface (usage counters), and the whole result for DEL."""
    parsed = cni.parse_result(result)
    data = attachment.to_json()
    address = parsed.ipv4
    data["address"] = str(address.ip) if address else None
    data["prefix_len"] = address.network.prefixlen if address else 0
    data["gateway"] = next((g for g in parsed.gateways if "." in g), None)
    data["host_veth"] = parsed.host_interface
    data["cni_result"] = result
    return Attachment.from_json(data)
