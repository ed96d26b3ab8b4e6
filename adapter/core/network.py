"""The node's network isolator as every driver uses it.

There is one NetworkIsolator per service: one bridge, one IPAM and one port table for all
runtimes. `RuntimeNetwork` wraps it for the runtimes, holding what each driver would otherwise
repeat: the config and request translation, the mapping of the isolator's errors to ours (by
class), and whether the isolator decides a launch's network at all. The service builds one
(adapter/core/services.py) and hands the same to every runtime.

How each runtime joins `Attachment.netns_path` stays in its driver (the supervisor's --netns, the
OCI spec's namespace path, lxc.namespace.share.net); mode "host" has no path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from adapter.core.config import AgentConfig
from adapter.core.errors import ConfigError, FailedPrecondition, InvalidArgument, LaunchFailed
from adapter.core.model import LaunchSpec, Resources, Statistics
from isolators.network import model as network_model
from isolators.network.cni_isolator import CniIsolator
from isolators.network.isolator import NetworkIsolator
from isolators.network.model import Attachment


@contextlib.contextmanager
def network_errors() -> Iterator[None]:
    """The network isolator's errors as ours, by class."""
    try:
        yield
    except network_model.InvalidNetworkRequest as exc:
        raise InvalidArgument(exc.field, str(exc).split(": ", 1)[-1]) from exc
    except network_model.NetworkUnavailable as exc:
        raise FailedPrecondition(str(exc)) from exc
    except network_model.NetworkConfigError as exc:
        raise ConfigError(str(exc)) from exc
    except network_model.NetworkError as exc:
        raise LaunchFailed(str(exc)) from exc


def network_config(config: AgentConfig) -> network_model.NetworkConfig:
    options = config.network
    return network_model.NetworkConfig(
        state_dir=config.state_dir,
        enabled=options.enabled,
        bridge=options.bridge,
        subnet=options.subnet,
        default_mode=options.default_mode,
        allow_host=options.allow_host,
        host_address=options.host_address,
        allow_privileged_ports=options.allow_privileged_ports,
        egress_nat=options.egress_nat,
        backend=options.backend,
        cni_conf_dir=Path(options.conf_dir),
        cni_bin_dirs=tuple(dict.fromkeys((Path(options.bin_dir), Path("/opt/cni/bin")))),
        cni_network=options.cni_network,
    )


def network_request(spec: LaunchSpec) -> network_model.NetworkRequest:
    """The isolator's request; mode "" is the node's default."""
    return network_model.NetworkRequest(
        mode=spec.network.mode,
        port_mappings=tuple(
            network_model.PortMapping(m.host_port, m.container_port, m.protocol)
            for m in spec.network.port_mappings
        ),
        port_ranges=spec.resources.ports,
        bandwidth_mbit=spec.resources.network_bandwidth,
    )


class RuntimeNetwork:
    """The node's isolator as runtimes use it; every method raises adapter.core.errors only."""

    def __init__(self, config: AgentConfig) -> None:
        self._node_chooses = config.network.enabled
        # The backend: our bridge, or a CNI network's plugins behind the same interface.
        backend = CniIsolator if config.network.backend == "cni" else NetworkIsolator
        self.isolator: NetworkIsolator = backend(network_config(config))

    @property
    def chooses_all(self) -> bool:
        """The node has a [network] table: the isolator decides every launch's network."""
        return self._node_chooses

    def chooses(self, spec: LaunchSpec) -> bool:
        """Whether the isolator decides this container's network: the node has a [network]
        table, or the request names a mode or port mappings. If not, a runtime may keep its own
        default and leave the isolator out (containerd: runc's fresh namespace with only
        loopback; LXC: runtimes.lxc.network), as it did before the isolator existed; the
        native runtime always asks the isolator, whose default then is the host's network."""
        return self._node_chooses or bool(spec.network.mode or spec.network.port_mappings)

    def check(self, spec: LaunchSpec) -> None:
        """Refuse what `prepare` would refuse, creating nothing: for runtimes that must create
        something of their own before the network."""
        with network_errors():
            self.isolator.resolve(spec.container_id, network_request(spec))

    async def prepare(self, spec: LaunchSpec) -> Attachment:
        """Check the request against the node, then create the container's network. Fails
        (InvalidArgument, FailedPrecondition) before anything exists."""
        with network_errors():
            return await self.isolator.prepare(spec.container_id, network_request(spec))

    def mode(self, spec: LaunchSpec) -> str:
        """The network mode this launch would get ("host", "none" or "bridge"), creating
        nothing; InvalidArgument or FailedPrecondition for what the node refuses."""
        with network_errors():
            mode, _ = self.isolator.resolve(spec.container_id, network_request(spec))
        return mode

    async def prepare_link(self, spec: LaunchSpec) -> Attachment:
        """A bridge address for a runtime that makes the container's link itself (libvirt's
        tap device): the attachment names the host-side device to create; `link_created` then
        puts it on the bridge."""
        with network_errors():
            return await self.isolator.prepare(
                spec.container_id, network_request(spec), own_link=True
            )

    async def adopt(self, spec: LaunchSpec, netns: Path) -> Attachment:
        """Attach the namespace at `netns`, made by the runtime (docker's sandbox container),
        as the container's: its link, address and forwards are the isolator's."""
        with network_errors():
            return await self.isolator.prepare(
                spec.container_id, network_request(spec), netns_source=netns
            )

    async def link_created(self, container_id: str) -> None:
        with network_errors():
            await self.isolator.link_created(container_id)

    def attachment(self, container_id: str) -> Attachment | None:
        return self.isolator.attachment(container_id)

    @property
    def bridge(self) -> str:
        return self.isolator.config.bridge

    def etc_files(self, container_id: str, hostname: str) -> dict[str, Path]:
        """/etc/hosts and /etc/resolv.conf for a container with its own namespace, keyed by
        their path in the container; empty for the host's network. They leave with cleanup."""
        try:
            written = self.isolator.etc_files(container_id, hostname)
        except OSError as exc:
            raise LaunchFailed(f"network files of {container_id!r}: {exc}") from exc
        return {f"/etc/{path.name}": path for path in written}

    def ready(self) -> str | None:
        """Why the node's network cannot attach containers now (CRI NetworkReady), or None."""
        return self.isolator.ready()

    async def update(self, container_id: str, resources: Resources) -> None:
        with network_errors():
            await self.isolator.update(container_id, resources.network_bandwidth)

    async def usage(self, container_id: str) -> Statistics:
        with network_errors():
            return dict(await self.isolator.usage(container_id))

    async def cleanup(self, container_id: str) -> None:
        with network_errors():
            await self.isolator.cleanup(container_id)

    async def recover(self, known_ids: set[str]) -> None:
        with network_errors():
            await self.isolator.recover(known_ids)

    async def close(self) -> None:
        await self.isolator.close()
