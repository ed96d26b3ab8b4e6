"""Plain types of the network isolator and its closed set of errors.

    NetworkError                    (a driver maps it to LaunchFailed)
    ├── InvalidNetworkRequest       bad input; names the field        -> InvalidArgument
    ├── NetworkUnavailable          mode not allowed / not configured -> FailedPrecondition
    │   └── PortConflict            a host port already forwarded     -> FailedPrecondition
    └── NetworkConfigError          unusable node config at start     -> ConfigError

This package imports nothing from `adapter/`, so drivers translate these classes into theirs.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODES = ("none", "host", "bridge")
PROTOCOLS = ("tcp", "udp")
MAX_PORT = 65535
FIRST_UNPRIVILEGED_PORT = 1024


class NetworkError(Exception):
    """Base class: the network could not be set up or torn down."""


class InvalidNetworkRequest(NetworkError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NetworkUnavailable(NetworkError):
    pass


class PortConflict(NetworkUnavailable):
    pass


class NetworkConfigError(NetworkError):
    pass


@dataclass(frozen=True, order=True)
class PortMapping:
    """Forward `host_port` on 127.0.0.1 (and the configured host address) to the container."""

    host_port: int
    container_port: int
    protocol: str = "tcp"

    def __str__(self) -> str:
        return f"{self.host_port}:{self.container_port}/{self.protocol}"

    @classmethod
    def parse(cls, text: str, field: str) -> PortMapping:
        """`HOST:CONTAINER[/tcp|/udp]` (Docker's -p syntax without an address)."""
        ports, _, protocol = text.partition("/")
        host, sep, container = ports.partition(":")
        protocol = protocol or "tcp"
        if not sep or not host.isdigit() or not container.isdigit():
            raise InvalidNetworkRequest(
                field, f"{text[:64]!r} is not HOST_PORT:CONTAINER_PORT[/tcp|/udp]"
            )
        if protocol not in PROTOCOLS:
            raise InvalidNetworkRequest(field, f"protocol {protocol[:16]!r} is not tcp or udp")
        mapping = cls(int(host), int(container), protocol)
        mapping.check(field)
        return mapping

    def check(self, field: str) -> None:
        for name, port in (("host port", self.host_port), ("container port", self.container_port)):
            if not 1 <= port <= MAX_PORT:
                raise InvalidNetworkRequest(field, f"{name} {port} is outside 1-{MAX_PORT}")
        if self.protocol not in PROTOCOLS:
            raise InvalidNetworkRequest(field, f"protocol {self.protocol!r} is not tcp or udp")


@dataclass(frozen=True)
class NetworkConfig:
    """The node's network settings (the config's [network] table) plus where state lives."""

    state_dir: Path
    enabled: bool = False  # a [network] table exists: bridge mode is available
    bridge: str = "ctz0"
    subnet: str = "10.88.0.0/16"
    default_mode: str = "host"
    allow_host: bool = True
    host_address: str | None = None
    allow_privileged_ports: bool = False
    egress_nat: bool = False
    # "bridge": ours (bridge, IPAM, nftables, tc); "cni": the plugins of a CNI network config.
    # With "cni", `bridge` only names our namespaces and checkpoint (cni_isolator.py).
    backend: str = "bridge"
    cni_conf_dir: Path = Path("/etc/cni/net.d")
    cni_bin_dirs: tuple[Path, ...] = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
    cni_network: str | None = None  # None: the first config in cni_conf_dir by file name

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The bridge's own address: the subnet's first host."""
        return self.network.network_address + 1


@dataclass(frozen=True)
class NetworkRequest:
    """What one container asks for. `mode` "" means the node's default."""

    mode: str = ""
    port_mappings: tuple[PortMapping, ...] = ()
    # Mesos `ports` ranges: forward each port to the same port of the container, tcp and udp.
    port_ranges: tuple[tuple[int, int], ...] = ()
    bandwidth_mbit: float | None = None  # shaping on the host side of the veth; None: unshaped


@dataclass(frozen=True)
class Attachment:
    """One container's network as set up; checkpointed (state.py) before anything is created,
    so recovery can always remove what a crashed launch left half done."""

    container_id: str
    mode: str
    netns_path: str | None = None  # join this before the first instruction; None: host netns
    address: str | None = None  # bridge mode: the container's IPv4 address
    prefix_len: int = 0
    gateway: str | None = None
    host_veth: str | None = None  # bridge mode: host side of the veth pair, on our bridge
    port_mappings: tuple[PortMapping, ...] = ()
    bandwidth_mbit: float | None = None
    # Backend "cni": the network config list ADD ran with and its result, so DEL runs the same
    # plugins with the same result after a config change or a crash (CNI spec: "cached result").
    cni_config: dict[str, Any] | None = None
    cni_result: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "container_id": self.container_id,
            "mode": self.mode,
            "netns_path": self.netns_path,
            "address": self.address,
            "prefix_len": self.prefix_len,
            "gateway": self.gateway,
            "host_veth": self.host_veth,
            "port_mappings": [
                [m.host_port, m.container_port, m.protocol] for m in self.port_mappings
            ],
            "bandwidth_mbit": self.bandwidth_mbit,
            "cni_config": self.cni_config,
            "cni_result": self.cni_result,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Attachment:
        return cls(
            container_id=str(data["container_id"]),
            mode=str(data["mode"]),
            netns_path=data.get("netns_path"),
            address=data.get("address"),
            prefix_len=int(data.get("prefix_len", 0)),
            gateway=data.get("gateway"),
            host_veth=data.get("host_veth"),
            port_mappings=tuple(
                PortMapping(int(h), int(c), str(p)) for h, c, p in data.get("port_mappings", [])
            ),
            bandwidth_mbit=data.get("bandwidth_mbit"),
            cni_config=data.get("cni_config"),
            cni_result=data.get("cni_result"),
        )
