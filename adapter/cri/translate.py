"""CRI configs into our launch model: every CRI field we honour is read here, and every bad value
is an InvalidArgument naming the CRI field, before anything reaches a runtime or a path on disk.

A pod is a holder process (our supervisor running `sleep infinity` on the host's files) whose
namespaces the pod's containers join: network (with the pod's address and port mappings), IPC,
UTS (the pod's hostname), and PID when the pod asks for pod-level PID sharing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from adapter.core.errors import InvalidArgument
from adapter.core.model import (
    HOST_NAMESPACE,
    MIB,
    Command,
    LinuxOptions,
    Mount,
    NetworkSettings,
    PortMapping,
    Resources,
)
from adapter.cri.api import cri
from adapter.images.image import Image

HOLDER_COMMAND = ("sleep", "infinity")
SECCOMP_DEFAULT_NAMES = ("runtime/default", "docker/default")
LOCALHOST_PREFIX = "localhost/"
UNCONFINED = "unconfined"
PROPAGATION = {
    cri.PROPAGATION_PRIVATE: "private",
    cri.PROPAGATION_HOST_TO_CONTAINER: "rslave",
    cri.PROPAGATION_BIDIRECTIONAL: "rshared",
}
PROTOCOLS = {cri.TCP: "tcp", cri.UDP: "udp"}
HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,62})")
# Sysctls a pod may set: those the kernel keeps per namespace (IPC, or network with one of its own).
IPC_SYSCTLS = re.compile(r"kernel\.(shm[a-z_]+|msg[a-z_]+|sem)|fs\.mqueue\.[a-z_]+")
SYSCTL_NAME = re.compile(r"[a-z0-9_]+(\.[a-z0-9_-]+)+")
MAX_NAME = 253
NANOS = 1_000_000_000
DEFAULT_CPU_PERIOD = 100_000


def _text(value: str, field: str, limit: int = 4096) -> str:
    if "\0" in value or len(value) > limit:
        raise InvalidArgument(field, "contains a NUL byte or is too long")
    return value


def _absolute(path: str, field: str) -> str:
    _text(path, field)
    if not path.startswith("/") or ".." in path.split("/"):
        raise InvalidArgument(field, f"{path!r} must be an absolute path without '..'")
    return os.path.normpath(path)


def check_pod_config(config: cri.PodSandboxConfig) -> None:
    metadata = config.metadata
    for name, value in (("name", metadata.name), ("namespace", metadata.namespace)):
        if not value:
            raise InvalidArgument(f"config.metadata.{name}", "is required")
        _text(value, f"config.metadata.{name}", MAX_NAME)
    _text(metadata.uid, "config.metadata.uid", MAX_NAME)
    if config.hostname and not HOSTNAME.fullmatch(config.hostname):
        raise InvalidArgument("config.hostname", f"{config.hostname!r} is not a host name")
    if config.log_directory:
        _absolute(config.log_directory, "config.log_directory")
    pod_mappings(config)
    pod_sysctls(config)
    pod_resources(config)


def pod_resources(config: cri.PodSandboxConfig) -> Resources:
    """The pod cgroup's limits: the pod's resources as the kubelet gives them (its containers'
    sum), plus the runtime class's overhead. A limit the pod does not set is none: the overhead
    alone limits nothing, it only adds to a limit."""
    limits = container_resources(config.linux.resources, "config.linux.resources")
    overhead = container_resources(config.linux.overhead, "config.linux.overhead")

    def plus_overhead(limit: float | None, extra: float | None) -> float | None:
        return None if limit is None else limit + (extra or 0.0)

    return Resources(
        cpus=plus_overhead(limits.cpus, overhead.cpus),
        mem_mib=plus_overhead(limits.mem_mib, overhead.mem_mib),
    )


def pod_network(config: cri.PodSandboxConfig, *, bridge: bool) -> NetworkSettings:
    """The host's network, or a namespace of the pod's own: on the node's bridge when it has
    one (config [network]), else with only a loopback interface."""
    if host_network(config):
        return NetworkSettings(mode="host")
    if not bridge:
        return NetworkSettings(mode="none")
    return NetworkSettings(mode="bridge", port_mappings=pod_mappings(config))


def host_network(config: cri.PodSandboxConfig) -> bool:
    options = config.linux.security_context.namespace_options
    return options.network == cri.NODE


def pod_mappings(config: cri.PodSandboxConfig) -> tuple[PortMapping, ...]:
    mappings = []
    for index, mapping in enumerate(config.port_mappings):
        field = f"config.port_mappings[{index}]"
        if mapping.protocol not in PROTOCOLS:
            raise InvalidArgument(f"{field}.protocol", "only TCP and UDP are supported")
        if not 0 < mapping.container_port < 65536 or not 0 <= mapping.host_port < 65536:
            raise InvalidArgument(field, "ports must be within 1-65535")
        if mapping.host_port:  # a mapping with only a container port publishes nothing
            mappings.append(
                PortMapping(mapping.host_port, mapping.container_port, PROTOCOLS[mapping.protocol])
            )
    return tuple(mappings)


def pod_sysctls(config: cri.PodSandboxConfig) -> tuple[tuple[str, str], ...]:
    sysctls = []
    for name, value in sorted(config.linux.sysctls.items()):
        field = f"config.linux.sysctls[{name!r}]"
        if not SYSCTL_NAME.fullmatch(name) or len(name) > MAX_NAME:
            raise InvalidArgument(field, "is not a sysctl name")
        namespaced = IPC_SYSCTLS.fullmatch(name) or (
            name.startswith("net.") and not host_network(config)
        )
        if not namespaced:
            raise InvalidArgument(field, "is not a sysctl of the pod's own namespaces")
        sysctls.append((name, _text(value, field, 256)))
    return tuple(sysctls)


def holder_options(
    config: cri.PodSandboxConfig, pod_files: dict[str, str], pod_id: str
) -> LinuxOptions:
    """The pod holder: the pod's UTS (hostname), IPC and, with pod-level sharing, PID namespace,
    or the host's where the pod asks for them; in the pod's cgroup like its containers. Without
    pod-level PID sharing no process has to hold them: the runtime may pin them (hold_only)."""
    options = config.linux.security_context.namespace_options
    namespaces: list[tuple[str, str]] = []
    if options.ipc == cri.NODE:
        namespaces.append(("ipc", HOST_NAMESPACE))
    if options.pid == cri.NODE:
        namespaces.append(("pid", HOST_NAMESPACE))
    if host_network(config):
        namespaces.append(("uts", HOST_NAMESPACE))
    return LinuxOptions(
        namespaces=tuple(namespaces),
        sysctls=pod_sysctls(config),
        hostname="" if host_network(config) else pod_hostname(config),
        etc_files=tuple(pod_files.items()),
        pod=pod_id,
        hold_only=options.pid != cri.POD,
    )


def pod_hostname(config: cri.PodSandboxConfig) -> str:
    return config.hostname or config.metadata.name[:63]


def resolv_conf(config: cri.PodSandboxConfig) -> str | None:
    """The pod's resolv.conf from its DNS config; None: the host's is copied."""
    dns = config.dns_config
    if not (dns.servers or dns.searches or dns.options):
        return None
    lines = [f"nameserver {_text(s, 'config.dns_config.servers', 64)}" for s in dns.servers]
    if dns.searches:
        lines.append(
            "search " + " ".join(_text(s, "config.dns_config.searches", 253) for s in dns.searches)
        )
    if dns.options:
        lines.append(
            "options " + " ".join(_text(o, "config.dns_config.options", 64) for o in dns.options)
        )
    for line in lines:
        if "\n" in line:
            raise InvalidArgument("config.dns_config", "a value contains a newline")
    return "\n".join(lines) + "\n"


# ---- containers ----


def check_container_config(config: cri.ContainerConfig) -> None:
    if not config.metadata.name:
        raise InvalidArgument("config.metadata.name", "is required")
    _text(config.metadata.name, "config.metadata.name", MAX_NAME)
    if not config.image.image:
        raise InvalidArgument("config.image.image", "is required")
    if config.log_path:
        _text(config.log_path, "config.log_path")
        if config.log_path.startswith("/") or ".." in config.log_path.split("/"):
            raise InvalidArgument("config.log_path", "must be relative to the pod's log directory")
    if config.devices:
        raise InvalidArgument("config.devices", "devices are not supported")
    security = config.linux.security_context
    has_user = security.HasField("run_as_user") or bool(security.run_as_username)
    if security.HasField("run_as_group") and not has_user:
        raise InvalidArgument(
            "config.linux.security_context.run_as_group", "needs run_as_user or run_as_username"
        )
    for index, mount in enumerate(config.mounts):
        _absolute(mount.container_path, f"config.mounts[{index}].container_path")
        _absolute(mount.host_path, f"config.mounts[{index}].host_path")
    seccomp_profile(security)
    container_resources(config.linux.resources, "config.linux.resources")


def container_command(config: cri.ContainerConfig, image: Image) -> Command:
    """Docker's rule, as the kubelet expects: `command` replaces the image's Entrypoint and
    `args` its Cmd."""
    entrypoint = tuple(config.command) or image.entrypoint
    arguments = tuple(config.args) if (config.args or config.command) else image.cmd
    argv = (*entrypoint, *arguments)
    environment = tuple((env.key, env.value) for env in config.envs)
    security = config.linux.security_context
    user = security.run_as_username or (
        str(security.run_as_user.value) if security.HasField("run_as_user") else None
    )
    return Command(
        argv=argv,
        environment=environment,
        user=user,
        working_dir=config.working_dir or None,
    )


def container_resources(resources: cri.LinuxContainerResources, field: str) -> Resources:
    cpus = None
    if resources.cpu_quota > 0:
        period = resources.cpu_period or DEFAULT_CPU_PERIOD
        cpus = resources.cpu_quota / period
    elif resources.cpu_quota < 0 and resources.cpu_quota != -1:
        raise InvalidArgument(f"{field}.cpu_quota", "must be positive, or -1 for none")
    memory = None
    if resources.memory_limit_in_bytes < 0:
        raise InvalidArgument(f"{field}.memory_limit_in_bytes", "must not be negative")
    if resources.memory_limit_in_bytes > 0:
        memory = resources.memory_limit_in_bytes / MIB
    return Resources(cpus=cpus, mem_mib=memory)


def seccomp_profile(security: cri.LinuxContainerSecurityContext) -> str:
    """ "" (the runtime default), "unconfined" or "localhost/<path>". The CRI's rule: no profile
    at all means unconfined."""
    field = "config.linux.security_context.seccomp"
    if security.HasField("seccomp"):
        profile = security.seccomp
        if profile.profile_type == cri.SecurityProfile.RuntimeDefault:
            return ""
        if profile.profile_type == cri.SecurityProfile.Unconfined:
            return UNCONFINED
        return LOCALHOST_PREFIX + _absolute(profile.localhost_ref, f"{field}.localhost_ref")
    path = security.seccomp_profile_path
    field = "config.linux.security_context.seccomp_profile_path"
    if path in ("", UNCONFINED):
        return UNCONFINED
    if path in SECCOMP_DEFAULT_NAMES:
        return ""
    if path.startswith(LOCALHOST_PREFIX):
        return LOCALHOST_PREFIX + _absolute(path[len(LOCALHOST_PREFIX) :], field)
    raise InvalidArgument(field, f"{path!r}: use runtime/default, unconfined or localhost/<path>")


def container_mounts(config: cri.ContainerConfig) -> tuple[Mount, ...]:
    mounts = []
    for index, mount in enumerate(config.mounts):
        if mount.propagation not in PROPAGATION:
            raise InvalidArgument(f"config.mounts[{index}].propagation", "unknown propagation")
        mounts.append(
            Mount(
                host_path=_absolute(mount.host_path, f"config.mounts[{index}].host_path"),
                container_path=_absolute(
                    mount.container_path, f"config.mounts[{index}].container_path"
                ),
                read_only=mount.readonly,
                propagation=PROPAGATION[mount.propagation],
            )
        )
    return tuple(mounts)


def container_namespaces(
    config: cri.ContainerConfig, pod_config: cri.PodSandboxConfig, pod: Mapping[str, str]
) -> tuple[tuple[str, str], ...]:
    """Which of the pod's namespaces (`pod`: kind -> its file) the container joins, or the
    host's."""
    pod_options = pod_config.linux.security_context.namespace_options

    def holder(kind: str) -> str:
        return pod[kind]

    own = config.linux.security_context.namespace_options
    network = HOST_NAMESPACE if host_network(pod_config) else holder("net")
    uts = HOST_NAMESPACE if host_network(pod_config) else holder("uts")
    ipc = HOST_NAMESPACE if pod_options.ipc == cri.NODE else holder("ipc")
    namespaces = [("net", network), ("uts", uts), ("ipc", ipc)]
    # The CRI's default (POD) shares the pod's pid namespace; the kubelet asks CONTAINER for
    # a namespace of the container's own.
    if own.pid == cri.TARGET:
        raise InvalidArgument(
            "config.linux.security_context.namespace_options.pid", "TARGET is not supported"
        )
    if own.pid == cri.NODE or (own.pid == cri.POD and pod_options.pid == cri.NODE):
        namespaces.append(("pid", HOST_NAMESPACE))
    elif own.pid == cri.POD and pod_options.pid == cri.POD:
        namespaces.append(("pid", holder("pid")))
    return tuple(namespaces)


def container_options(
    config: cri.ContainerConfig,
    pod_config: cri.PodSandboxConfig,
    *,
    pod_namespaces: Mapping[str, str] | None,
    pod_id: str,
    pod_files: dict[str, str],
    log_path: str,
) -> LinuxOptions:
    """`pod_namespaces` None: a pod without a holder (a VM's), whose one container joins
    nothing and has the pod's hostname itself."""
    security = config.linux.security_context
    alone = pod_namespaces is None
    namespaces = (
        () if pod_namespaces is None else container_namespaces(config, pod_config, pod_namespaces)
    )
    return LinuxOptions(
        namespaces=namespaces,
        hostname=pod_hostname(pod_config) if alone else "",
        group=security.run_as_group.value if security.HasField("run_as_group") else None,
        supplementary_groups=tuple(security.supplemental_groups),
        read_only_rootfs=security.readonly_rootfs,
        capabilities_add=tuple(security.capabilities.add_capabilities),
        capabilities_drop=tuple(security.capabilities.drop_capabilities),
        seccomp=seccomp_profile(security),
        masked_paths=tuple(security.masked_paths) or None,
        readonly_paths=tuple(security.readonly_paths) or None,
        mounts=container_mounts(config),
        etc_files=tuple(pod_files.items()),
        log_path=log_path,
        stdin=config.stdin,
        stdin_once=config.stdin_once,
        tty=config.tty,
        pod=pod_id,
    )


def timestamp_ns(seconds: float) -> int:
    return int(seconds * NANOS)
