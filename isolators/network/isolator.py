"""NetworkIsolator: one container's network, with Mesos' isolator verbs.

    prepare(id, request) -> Attachment   check, checkpoint, then create: namespace, veth on our
                                         bridge, address, default route, tc rate, port forwards
    isolate(id, pid)                     nothing: the runtime joins attachment.netns_path before
                                         the workload's first instruction
    update(id, bandwidth_mbit)           change the rate live
    usage(id) -> Statistics              net_rx_* / net_tx_* of the container's interface
    etc_files(id, hostname) -> paths     /etc/hosts and /etc/resolv.conf for image-based
                                         containers, in a directory the attachment owns
    cleanup(id)                          remove everything of the container; idempotent
    recover(known_ids)                   reload the checkpoint, drop what no container owns, sweep
                                         namespaces and bridge ports no checkpoint names
    close()                              service stop: the bridge goes if no container uses it

Every runtime of a service uses the same instance (the service builds one and hands it to
each): one bridge, one IPAM, one port table per node. How a runtime attaches (DESIGN.md):
  native      --netns attachment.netns_path for the supervisor (setns before the other unshares)
  containerd  OCI spec linux.namespaces += {type: network, path: attachment.netns_path}
  LXC         lxc.net.0.type = none + lxc.namespace.share.net = attachment.netns_path
  libvirt     prepare(..., own_link=True): no namespace; the domain's <interface type='bridge'>
              gets target dev attachment.host_veth (its tap, so usage/update/sweep find it),
              then link_created(id) shapes it; the guest configures attachment.address itself
  docker      prepare(..., netns_source=/proc/<sandbox pid>/ns/net): the namespace of a
              sleeping sandbox container (NetworkMode none) is adopted, the workload joins
              it with NetworkMode container:<sandbox>
Mode "host" creates nothing and is not checkpointed.
With `[network] backend = "cni"` the service builds CniIsolator (cni_isolator.py) instead: the
same verbs and checkpoint, with a CNI network's plugins making the link, address and forwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import shutil
import socket
from pathlib import Path

from pyroute2 import AsyncIPRoute

from isolators.base import Statistics
from isolators.network import bridge, netns, ports, shaping, state, veth
from isolators.network.ipam import AddressPool
from isolators.network.model import (
    FIRST_UNPRIVILEGED_PORT,
    MODES,
    PROTOCOLS,
    Attachment,
    InvalidNetworkRequest,
    NetworkConfig,
    NetworkError,
    NetworkRequest,
    NetworkUnavailable,
    PortConflict,
    PortMapping,
)

log = logging.getLogger(__name__)
MAX_FORWARDS_PER_CONTAINER = 1024
FIELD_MODE = "container.network.mode"
FIELD_MAPPINGS = "container.network.port_mappings"


class NetworkIsolator:
    name = "network"

    def __init__(self, config: NetworkConfig) -> None:
        self.config = config
        self._state_path = config.state_dir / "network" / f"{config.bridge}.json"
        # The /etc files of each container (etc_files): removed with its attachment.
        self._etc_root = config.state_dir / "network" / f"{config.bridge}.etc"
        self._netns_prefix = netns.netns_prefix(config.bridge, config.state_dir)
        self._state = state.NetworkState()
        self._pool = AddressPool(config.network) if config.enabled else None
        self._lock = asyncio.Lock()
        self._recovered = False
        self._detached = veth.DetachedVeths()
        # The bridge's index as the last full `ensure_bridge` of this process left it (`_bridge`).
        self._bridge_index: int | None = None

    # ---- checks: everything a request can get wrong, before anything exists ----

    def resolve(self, container_id: str, request: NetworkRequest) -> tuple[str, list[PortMapping]]:
        """The effective mode and forwards of `request`; raises before anything is created."""
        mode = request.mode or self.config.default_mode
        if mode not in MODES:
            raise InvalidNetworkRequest(
                FIELD_MODE, f"unknown mode {mode[:32]!r}; known: {list(MODES)}"
            )
        if mode == "host" and not self.config.allow_host:
            raise NetworkUnavailable(
                "network mode 'host' is not allowed on this node (network.allow_host)"
            )
        if mode == "bridge" and not self.config.enabled:
            raise NetworkUnavailable(
                "network mode 'bridge' needs a [network] table in the node's config"
            )
        bandwidth = request.bandwidth_mbit
        if bandwidth is not None and not (math.isfinite(bandwidth) and bandwidth > 0):
            raise InvalidNetworkRequest(
                "resources[network_bandwidth]", f"must be a number > 0 (Mbit/s), got {bandwidth}"
            )
        if mode != "bridge":
            if request.port_mappings:
                raise InvalidNetworkRequest(
                    FIELD_MAPPINGS, f"port mappings need network mode 'bridge', not {mode!r}"
                )
            return mode, []
        mappings = self._forwards_of(request)
        self._check_ports(container_id, mappings)
        return mode, mappings

    def _forwards_of(self, request: NetworkRequest) -> list[PortMapping]:
        mappings = list(request.port_mappings)
        for begin, end in request.port_ranges:  # Mesos `ports`: the same port, tcp and udp
            if (end - begin + 1) * len(PROTOCOLS) + len(mappings) > MAX_FORWARDS_PER_CONTAINER:
                raise InvalidNetworkRequest(
                    "resources[ports]", f"more than {MAX_FORWARDS_PER_CONTAINER} forwards"
                )
            mappings += [
                PortMapping(p, p, proto) for p in range(begin, end + 1) for proto in PROTOCOLS
            ]
        return mappings

    def _check_ports(self, container_id: str, mappings: list[PortMapping]) -> None:
        taken = {
            (m.host_port, m.protocol): other.container_id
            for other in self._state.attachments.values()
            if other.container_id != container_id
            for m in other.port_mappings
        }
        seen: set[tuple[int, str]] = set()
        for mapping in mappings:
            mapping.check(FIELD_MAPPINGS)
            key = (mapping.host_port, mapping.protocol)
            if (
                mapping.host_port < FIRST_UNPRIVILEGED_PORT
                and not self.config.allow_privileged_ports
            ):
                raise InvalidNetworkRequest(
                    FIELD_MAPPINGS,
                    f"host port {mapping.host_port} is below {FIRST_UNPRIVILEGED_PORT}"
                    " and network.allow_privileged_ports is false",
                )
            if key in seen:
                raise InvalidNetworkRequest(
                    FIELD_MAPPINGS,
                    f"host port {mapping.host_port}/{mapping.protocol} is given twice",
                )
            seen.add(key)
            if key in taken:
                raise PortConflict(
                    f"host port {mapping.host_port}/{mapping.protocol} is already forwarded"
                    f" to container {taken[key]!r}"
                )

    # ---- verbs ----

    async def prepare(
        self,
        container_id: str,
        request: NetworkRequest,
        *,
        own_link: bool = False,
        netns_source: Path | None = None,
    ) -> Attachment:
        """`own_link`: the runtime puts its own interface on the bridge, named
        `attachment.host_veth` (libvirt's tap for a VM), and no namespace is made; the bridge,
        address and forwards are ours as usual, and `link_created` shapes the link.
        `netns_source`: adopt this existing namespace (/proc/<pid>/ns/net of the runtime's
        sandbox process, Docker's) at `attachment.netns_path` instead of creating a new one;
        everything else (veth, address, forwards, cleanup) is as usual."""
        async with self._lock:
            mode, mappings = self.resolve(container_id, request)
            if mode == "host":
                return Attachment(container_id, "host")
            attachment = self._plan(container_id, mode, mappings, request.bandwidth_mbit)
            if own_link and mode == "bridge":
                attachment = _without_netns(attachment)
            self._state.attachments[container_id] = attachment
            self._save()  # durable before anything exists: recovery can always undo it
            try:
                await self._create(attachment, netns_source)
            except BaseException as exc:
                await self._remove(attachment)
                if isinstance(exc, NetworkError | asyncio.CancelledError):
                    raise
                raise NetworkError(f"network of {container_id!r}: {exc}") from exc
            return attachment

    def _plan(
        self, container_id: str, mode: str, mappings: list[PortMapping], bandwidth: float | None
    ) -> Attachment:
        path = str(netns.netns_path(self._netns_prefix, container_id))
        if mode == "none":
            return Attachment(container_id, mode, netns_path=path)
        assert self._pool is not None
        used = [
            ipaddress.IPv4Address(a.address) for a in self._state.attachments.values() if a.address
        ]
        cursor = self._state.last_address
        address = self._pool.allocate(used, ipaddress.IPv4Address(cursor) if cursor else None)
        self._state.last_address = str(address)
        return Attachment(
            container_id,
            mode,
            netns_path=path,
            address=str(address),
            prefix_len=self._pool.subnet.prefixlen,
            gateway=str(self._pool.gateway),
            host_veth=veth.host_veth_name(self.config.bridge, container_id),
            port_mappings=tuple(mappings),
            bandwidth_mbit=bandwidth,
        )

    async def _create(self, attachment: Attachment, netns_source: Path | None = None) -> None:
        if attachment.netns_path is None:  # prepare(own_link=True): the runtime makes the link
            await self._ensure_bridge()
            if attachment.port_mappings:
                await self._apply_forwards()
            return
        path = Path(attachment.netns_path)
        if netns_source is None:
            await netns.create(path)
        else:
            await netns.adopt(path, netns_source)
        if attachment.mode == "bridge":
            await self._attach_to_bridge(attachment, path)
        else:
            async with await _ipr_in(path) as inside:
                await veth.bring_loopback_up(inside)
        if attachment.port_mappings:
            await self._apply_forwards()

    async def _attach_to_bridge(self, attachment: Attachment, path: Path) -> None:
        assert attachment.host_veth is not None and attachment.address is not None
        assert self._pool is not None
        async with AsyncIPRoute() as host:
            bridge_index = await self._bridge(host)
            alias = veth.host_veth_alias(self.config.bridge, attachment.container_id)
            index = await veth.create_pair(host, attachment.host_veth, path, bridge_index, alias)
            if attachment.bandwidth_mbit is not None:
                await shaping.set_rate(host, index, attachment.bandwidth_mbit)
        inside, eth0 = await _ipr_and_index_in(path, veth.CONTAINER_IFNAME)
        async with inside:
            await veth.configure_container_side(
                inside,
                eth0,
                ipaddress.IPv4Address(attachment.address),
                attachment.prefix_len,
                self._pool.gateway,
            )

    async def _ensure_bridge(self) -> None:
        if self._ensured_bridge() is None:
            async with AsyncIPRoute() as host:
                await self._bridge(host)

    async def _bridge(self, host: AsyncIPRoute) -> int:
        """Our bridge's index. The full `ensure_bridge` (create, address, up, route_localnet)
        runs on the first attach of this process and again whenever `_ensured_bridge` does not
        know the bridge; otherwise one ioctl stands for a dump and three requests."""
        assert self._pool is not None
        ensured = self._ensured_bridge()
        if ensured is not None:
            return ensured
        self._bridge_index = None  # set again only once an ensure has gone through
        self._bridge_index = await bridge.ensure_bridge(
            host, self.config.bridge, self._pool.gateway, self._pool.subnet.prefixlen
        )
        return self._bridge_index

    def _ensured_bridge(self) -> int | None:
        """The bridge's index if the link under its name is still the one the last full ensure
        of this process left; None when it is gone (an operator deleted it, or `close` did) or
        was made anew (another index), which the next attach must ensure again."""
        ensured = self._bridge_index
        if ensured is not None and bridge.link_index(self.config.bridge) == ensured:
            return ensured
        return None

    async def link_created(self, container_id: str) -> None:
        """After prepare(own_link=True): the runtime's link `host_veth` is on the bridge now;
        give it the rate, as `_attach_to_bridge` does for a veth."""
        attachment = self._state.attachments.get(container_id)
        if attachment is None or attachment.host_veth is None or attachment.bandwidth_mbit is None:
            return
        index = bridge.link_index(attachment.host_veth)
        if index is None:
            raise NetworkError(f"the interface {attachment.host_veth} of {container_id!r} is gone")
        async with AsyncIPRoute() as host:
            await shaping.set_rate(host, index, attachment.bandwidth_mbit)

    async def isolate(self, container_id: str, pid: int) -> None:
        """Nothing to do: the namespace exists before the workload and the runtime joins it."""

    async def update(self, container_id: str, bandwidth_mbit: float | None) -> None:
        async with self._lock:
            attachment = self._state.attachments.get(container_id)
            if attachment is None or attachment.mode != "bridge" or attachment.host_veth is None:
                return
            if bandwidth_mbit == attachment.bandwidth_mbit:
                return
            if bandwidth_mbit is not None:
                self.resolve(container_id, NetworkRequest("bridge", bandwidth_mbit=bandwidth_mbit))
            index = bridge.link_index(attachment.host_veth)
            if index is None:
                raise NetworkError(
                    f"the interface {attachment.host_veth} of {container_id!r} is gone"
                )
            async with AsyncIPRoute() as host:
                if bandwidth_mbit is None:
                    await shaping.clear_rate(host, index)
                else:
                    await shaping.set_rate(host, index, bandwidth_mbit)
            self._state.attachments[container_id] = _replace_bandwidth(attachment, bandwidth_mbit)
            self._save()

    async def usage(self, container_id: str) -> Statistics:
        attachment = self._state.attachments.get(container_id)
        if attachment is None or attachment.host_veth is None:
            return {}
        async with AsyncIPRoute() as host:
            return await veth.container_counters(host, attachment.host_veth)

    def attachment(self, container_id: str) -> Attachment | None:
        return self._state.attachments.get(container_id)

    def ready(self) -> str | None:
        """Why containers cannot get a network of their own now (CRI's NetworkReady), or None."""
        if self.config.enabled:
            return None
        return "the node's config has no [network] table: pods get only a loopback interface"

    async def cleanup(self, container_id: str) -> None:
        async with self._lock:
            attachment = self._state.attachments.get(container_id)
            if attachment is not None:
                await self._remove(attachment)

    async def _remove(self, attachment: Attachment) -> None:
        """Undo `_create` from whatever point it reached, then forget the attachment. Links go
        first: a namespace some process still holds must not keep a veth on our bridge."""
        if attachment.host_veth is not None:
            await self._release_link(attachment)
        if attachment.netns_path is not None:
            netns.remove(Path(attachment.netns_path))
        shutil.rmtree(self._etc_root / attachment.container_id, ignore_errors=True)
        self._state.attachments.pop(attachment.container_id, None)
        if attachment.port_mappings:
            await self._apply_forwards()
        self._save(durable=False)  # a removal lost to a power loss is done again at recovery

    async def _release_link(self, attachment: Attachment) -> None:
        """A veth into a namespace of ours is detached and set down, not deleted (veth.py): the
        kernel deletes the pair when `_remove` lets the namespace go, and `_detached` deletes it
        if someone holds the namespace on. A runtime's own link (libvirt's tap) has no namespace
        of ours whose end would delete it: it is deleted now."""
        assert attachment.host_veth is not None
        async with AsyncIPRoute() as host:
            if attachment.netns_path is None:
                await veth.delete_link(host, attachment.host_veth)
                return
            index = await veth.detach(host, attachment.host_veth)
        if index is not None:
            self._detached.delete_later(index, attachment.host_veth)

    async def _apply_forwards(self) -> None:
        forwards = [
            ports.Forward(m.host_port, m.protocol, a.address, m.container_port)
            for a in self._state.attachments.values()
            if a.address is not None
            for m in a.port_mappings
        ]
        await ports.apply(
            ports.render(
                bridge=self.config.bridge,
                subnet=self.config.network,
                host_address=self.config.host_address,
                forwards=forwards,
                egress_nat=self.config.egress_nat and self.config.enabled,
            )
        )

    # ---- recovery and shutdown ----

    async def recover(self, known_ids: set[str]) -> None:
        """Reload the checkpoint; remove the attachments of containers nobody knows, then every
        namespace and bridge port of ours that no attachment names. Once per instance: all the
        runtimes of a service share it and pass the same ids."""
        async with self._lock:
            if self._recovered:
                return
            self._state = state.load(self._state_path)
            await self._check_node()
            for attachment in list(self._state.attachments.values()):
                if attachment.container_id not in known_ids:
                    log.info("network: removing orphan attachment of %s", attachment.container_id)
                    await self._remove(attachment)
            await self._sweep()
            await self._apply_forwards()
            self._save()
            self._recovered = True

    async def _check_node(self) -> None:
        """Refuse to start on a subnet some other interface of the host routes."""
        if self.config.enabled:
            async with AsyncIPRoute() as host:
                await bridge.check_subnet_is_free(host, self.config.network, self.config.bridge)

    async def _sweep(self) -> None:
        owned_netns = {
            Path(a.netns_path).name for a in self._state.attachments.values() if a.netns_path
        }
        for name in netns.names_with_prefix(self._netns_prefix + "."):
            if name not in owned_netns:
                log.info("network: removing orphan namespace %s", name)
                netns.remove(netns.NETNS_DIR / name)
        if self._etc_root.is_dir():
            for directory in self._etc_root.iterdir():
                if directory.name not in self._state.attachments:
                    shutil.rmtree(directory, ignore_errors=True)
        async with AsyncIPRoute() as host:
            await self._sweep_links(host)

    async def _sweep_links(self, host: AsyncIPRoute) -> None:
        """Ports of our bridge that no attachment names (a crash between veth and checkpoint),
        and detached host sides of ours (a service that died before `_detached` deleted them)."""
        owned_links = {a.host_veth for a in self._state.attachments.values() if a.host_veth}
        links = await veth.detached_host_sides(host, self.config.bridge)
        bridge_index = bridge.link_index(self.config.bridge)
        if bridge_index is not None:
            links += await veth.bridge_ports(host, bridge_index)
        for name in links:
            if name not in owned_links:
                log.info("network: removing orphan link %s", name)
                await veth.delete_link(host, name)

    async def close(self) -> None:
        """The service stops: containers keep running, and so does the bridge if one uses it.
        Host sides detached by cleanups and not yet deleted by the kernel are deleted now."""
        await self._detached.close()
        async with self._lock:
            if any(a.mode == "bridge" for a in self._state.attachments.values()):
                return
            self._bridge_index = None  # an attach after a close ensures the bridge again
            with contextlib.suppress(Exception):
                async with AsyncIPRoute() as host:
                    await bridge.remove_bridge(host, self.config.bridge)

    def _save(self, *, durable: bool = True) -> None:
        state.save(self._state_path, self._state, durable=durable)

    # ---- files for image-based containers ----

    def etc_files(self, container_id: str, hostname: str) -> list[Path]:
        """`write_etc_files` into a directory of the container's attachment (removed by its
        cleanup and by recovery's sweep); [] when the container has the host's network."""
        attachment = self._state.attachments.get(container_id)
        if attachment is None or attachment.netns_path is None:
            return []
        return self.write_etc_files(container_id, self._etc_root / container_id, hostname)

    def write_etc_files(self, container_id: str, directory: Path, hostname: str) -> list[Path]:
        """/etc/hosts and /etc/resolv.conf for the container, written into `directory` for the
        runtime to bind-mount; resolv.conf keeps the host's nameservers except loopback ones,
        which mean the host's own resolver and are unreachable from the container's namespace."""
        attachment = self._state.attachments.get(container_id)
        directory.mkdir(parents=True, exist_ok=True)
        hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        if attachment is not None and attachment.address:
            hosts += f"{attachment.address}\t{hostname}\n"
        nameservers = [line for line in _host_resolv_conf() if not _is_loopback_nameserver(line)]
        written = [directory / "hosts", directory / "resolv.conf"]
        written[0].write_text(hosts)
        written[1].write_text("".join(f"{line}\n" for line in nameservers))
        return written


async def _ipr_in(path: Path) -> AsyncIPRoute:
    sock = await netns.netlink_socket_in(path)
    return AsyncIPRoute(fileno=sock.detach())


async def _ipr_and_index_in(path: Path, ifname: str) -> tuple[AsyncIPRoute, int]:
    """`_ipr_in`, and the index of the link `ifname` in that namespace."""
    sock, index = await netns.in_fresh_thread(lambda: _socket_and_index_in(path, ifname))
    return AsyncIPRoute(fileno=sock.detach()), index


def _socket_and_index_in(path: Path, ifname: str) -> tuple[socket.socket, int]:
    """In the throwaway thread of `netns.netlink_socket_in`, which its setns leaves inside the
    namespace: there one SIOCGIFINDEX ioctl finds the link, where a netlink request would cost
    ~0.25 ms of the event loop's CPU."""
    sock = netns._netlink_socket_in(path)
    try:
        return sock, socket.if_nametoindex(ifname)
    except OSError as exc:
        sock.close()
        raise NetworkError(f"no interface {ifname} in the namespace {path}") from exc


def _without_netns(attachment: Attachment) -> Attachment:
    data = attachment.to_json()
    data["netns_path"] = None
    return Attachment.from_json(data)


def _replace_bandwidth(attachment: Attachment, bandwidth: float | None) -> Attachment:
    data = attachment.to_json()
    data["bandwidth_mbit"] = bandwidth
    return Attachment.from_json(data)


def _host_resolv_conf() -> list[str]:
    try:
        lines = Path("/etc/resolv.conf").read_text().splitlines()
    except OSError:
        return []
    return [
        line.strip()
        for line in lines
        if line.strip().startswith(("nameserver", "search", "options"))
    ]


def _is_loopback_nameserver(line: str) -> bool:
    words = line.split()
    if len(words) < 2 or words[0] != "nameserver":
        return False
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(words[1]).is_loopback
    return False
