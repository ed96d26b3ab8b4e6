"""Per-node TOML config -> a typed AgentConfig, validated once at load.

The schema is data (TOP_LEVEL, NETWORK_KEYS, IMAGES_KEYS): each key with its type and a check;
each runtime parses its own table into its Options (adapter/runtimes/registry.py). A bad file is
refused with the file, the key and what was expected. No file means a working default: the
native runtime with the cgroup isolators.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter.core.errors import ConfigError, InvalidArgument
from adapter.core.model import NETWORK_MODES, is_valid_container_id
from adapter.core.userns import USER_NAMESPACE_KEYS, UserNamespaceOptions, parse_user_namespace
from adapter.runtimes.native.options import NativeOptions
from adapter.runtimes.registry import RUNTIMES, RuntimeOptions, parse_options
from adapter.supervisor.launch_config import OUTPUT_FILES_LIMIT

CONFIG_VERSION = 1
DEFAULT_SOCKET = "/run/containerizer/containerizer.sock"
DEFAULT_STATE_DIR = "/var/lib/containerizer"
KNOWN_ISOLATORS = ("cgroups/cpu", "cgroups/mem", "cgroups/pids", "posix/cpu", "posix/mem")
DEFAULT_LOG_MAX_SIZE = 100 << 20

# A Linux interface name (IFNAMSIZ - 1), without '.', which separates bridge and container in
# the names of our network namespaces.
BRIDGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,14}")


@dataclass(frozen=True)
class NetworkOptions:
    """The [network] table. Without one, containers get the host's network (Mesos 0.18) or, on
    request, mode none; with one, bridge mode exists and is the default."""

    enabled: bool = False
    bridge: str = "ctz0"
    subnet: str = "10.88.0.0/16"
    default_mode: str = "host"
    allow_host: bool = True
    host_address: str | None = None
    allow_privileged_ports: bool = False
    egress_nat: bool = False
    backend: str = "bridge"  # or "cni": the plugins of a CNI network config attach containers
    conf_dir: str = "/etc/cni/net.d"  # backend "cni": where the network configs are
    bin_dir: str = "/usr/lib/cni"  # backend "cni": plugins; /opt/cni/bin is searched after it
    cni_network: str | None = None  # backend "cni": a network's name; None: the first config


NETWORK_BACKENDS = ("bridge", "cni")
# CNI's own rule for a network name (libcni's ValidateNetworkName).
CNI_NETWORK_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")


def _is_ipv4_subnet(value: str) -> bool:
    try:
        return ipaddress.IPv4Network(value, strict=True).prefixlen <= 30
    except ValueError:
        return False


def _is_ipv4_address(value: str) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


NETWORK_KEYS: dict[str, tuple[type, Callable[[Any], bool], str]] = {
    "bridge": (
        str,
        lambda v: BRIDGE_NAME.fullmatch(v) is not None,
        "an interface name: 1-15 of [A-Za-z0-9_-]",
    ),
    "subnet": (str, _is_ipv4_subnet, "an IPv4 network with room for containers, e.g. 10.0.0.0/16"),
    "default_mode": (str, lambda v: v in NETWORK_MODES, f"one of {list(NETWORK_MODES)}"),
    "allow_host": (bool, lambda v: True, "true or false"),
    "host_address": (str, _is_ipv4_address, "an IPv4 address of this host"),
    "allow_privileged_ports": (bool, lambda v: True, "true or false"),
    "egress_nat": (bool, lambda v: True, "true or false"),
    "backend": (str, lambda v: v in NETWORK_BACKENDS, f"one of {list(NETWORK_BACKENDS)}"),
    "conf_dir": (str, lambda v: v.startswith("/"), "an absolute directory path"),
    "bin_dir": (str, lambda v: v.startswith("/"), "an absolute directory path"),
    "cni_network": (
        str,
        lambda v: CNI_NETWORK_NAME.fullmatch(v) is not None,
        "a CNI network name: [a-zA-Z0-9][a-zA-Z0-9_.-]*",
    ),
}


@dataclass(frozen=True)
class ImagesOptions:
    """The [images] table: what one image may cost this node, counted while it is written (an
    import's or pull's blob bytes; an unpack's file bytes and entries), never from headers."""

    max_import_bytes: int = 8 << 30
    max_unpacked_bytes: int = 8 << 30
    max_entries: int = 1_000_000
    # Registry domain -> the HOST[:PORT] pulled from instead ([images.mirrors], as containerd's
    # registry mirrors); a loopback mirror is spoken to over plain HTTP.
    mirrors: tuple[tuple[str, str], ...] = ()
    # Size-based garbage collection (adapter/images/prune.py): when the store's blobs and root
    # filesystems exceed gc_high_bytes, images no container uses go, least recently used
    # first, until it is under gc_low_bytes. 0: off.
    gc_high_bytes: int = 0
    gc_low_bytes: int = 0


IMAGES_KEYS = (
    "max_import_bytes",
    "max_unpacked_bytes",
    "max_entries",
    "mirrors",
    "gc_high_bytes",
    "gc_low_bytes",
)


@dataclass(frozen=True)
class RegistryHostOptions:
    """One [registry."HOST[:PORT]"] table: how to reach that registry (or mirror), and as whom.
    The password never appears in a repr, a log line or an error."""

    username: str = ""
    password: str = field(default="", repr=False)
    # PEM bundle that verifies its certificate instead of the system's CA bundle.
    ca_file: Path | None = None
    # True: plain HTTP; False: HTTPS; None: plain HTTP for a loopback host without ca_file
    # (Docker's default insecure registry), HTTPS otherwise.
    insecure: bool | None = None


@dataclass(frozen=True)
class RegistryOptions:
    """The [registry] table: host tables, and a Docker config.json whose `auths` are used for
    registries without credentials of their own."""

    hosts: tuple[tuple[str, RegistryHostOptions], ...] = ()
    docker_config: Path | None = None

    def host(self, name: str) -> RegistryHostOptions | None:
        return dict(self.hosts).get(name)


REGISTRY_HOST_KEYS = ("auth", "username", "password", "ca_file", "insecure")


@dataclass(frozen=True)
class AgentConfig:
    version: int = CONFIG_VERSION
    default_runtime: str = "native"
    isolators: tuple[str, ...] = ("cgroups/cpu", "cgroups/mem", "cgroups/pids")
    cgroups_root: str = "containerizer"
    cgroups_hierarchy: str | None = None
    cgroups_enable_cfs: bool = False
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    socket: Path = Path(DEFAULT_SOCKET)
    # Kubernetes' CRI (runtime.v1) endpoint; None: cri.sock beside `socket`.
    cri_socket: Path | None = None
    # containerizer-mesos's socket (adapter/server/mesos.py); None: NAME.mesos.sock beside
    # `socket` NAME.sock. Named *.mesos.sock so the program knows it given as its endpoint.
    mesos_socket: Path | None = None
    # The CRI streaming server (Exec, Attach, PortForward URLs): loopback, any free port.
    cri_streaming_address: str = "127.0.0.1:0"
    listen: str | None = None
    # Mutual TLS of the `listen` address: the service's certificate and key, and the CA whose
    # client certificates it accepts. Required with `listen`; the Unix socket does not use them.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    termination_retention: float = 3600.0
    # How often the disk isolator measures a container without a project quota (disk/du).
    disk_watch_interval: float = 15.0
    # Whether a launch may ask for `privileged` (no confinement); refused unless set.
    allow_privileged: bool = False
    # A container's stdout and stderr files rotate at this size (bytes; 0: never), and each
    # stream keeps this many files (the current one and the rotated ones). Not the CRI log's:
    # the kubelet rotates that.
    log_max_size: int = DEFAULT_LOG_MAX_SIZE
    log_max_files: int = 5
    runtimes: dict[str, RuntimeOptions] = field(default_factory=lambda: {"native": NativeOptions()})
    network: NetworkOptions = field(default_factory=NetworkOptions)
    images: ImagesOptions = field(default_factory=ImagesOptions)
    registry: RegistryOptions = field(default_factory=RegistryOptions)
    # /metrics (Prometheus) and /healthz over plain HTTP: loopback only; None: not served.
    metrics_listen: str | None = None
    # The service's own log lines: "text" or "json" (one object per line).
    log_format: str = "text"
    # [user_namespace]: the node's default and the host ids containers' namespaces map.
    user_namespace: UserNamespaceOptions = field(default_factory=UserNamespaceOptions)
    source: Path | None = None


def _is_listen_address(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def _is_loopback_listen_address(value: str) -> bool:
    """HOST:PORT on a loopback address (port 0: any free one): the metrics carry no
    authentication, so only this node's users may read them."""
    host, sep, port = value.rpartition(":")
    if not (sep and port.isdigit() and int(port) < 65536):
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _isolator_list(value: list[Any]) -> bool:
    return all(isinstance(name, str) and name in KNOWN_ISOLATORS for name in value)


# key -> (type, check, what is expected)
_Check = Callable[[Any], bool]
TOP_LEVEL: dict[str, tuple[type | tuple[type, ...], _Check, str]] = {
    "version": (int, lambda v: v == CONFIG_VERSION, f"the integer {CONFIG_VERSION}"),
    "default_runtime": (str, lambda v: v in RUNTIMES, f"one of {sorted(RUNTIMES)}"),
    "isolators": (list, _isolator_list, f"a list of {list(KNOWN_ISOLATORS)}"),
    "cgroups_root": (str, is_valid_container_id, "a single cgroup directory name"),
    "cgroups_hierarchy": (str, lambda v: v.startswith("/"), "an absolute path"),
    "cgroups_enable_cfs": (bool, lambda v: True, "true or false"),
    "state_dir": (str, lambda v: v.startswith("/"), "an absolute path"),
    "socket": (str, lambda v: v.startswith("/"), "an absolute path"),
    "cri_socket": (str, lambda v: v.startswith("/"), "an absolute path"),
    "mesos_socket": (
        str,
        lambda v: v.startswith("/") and v.endswith(".mesos.sock"),
        "an absolute path ending in .mesos.sock",
    ),
    "cri_streaming_address": (
        str,
        lambda v: _is_listen_address(v) or v.endswith(":0"),
        "HOST:PORT (port 0: any free one)",
    ),
    "listen": (str, _is_listen_address, "HOST:PORT, e.g. 127.0.0.1:7070"),
    "tls_cert": (str, lambda v: v.startswith("/"), "an absolute path to a PEM certificate"),
    "tls_key": (str, lambda v: v.startswith("/"), "an absolute path to a PEM private key"),
    "tls_client_ca": (str, lambda v: v.startswith("/"), "an absolute path to a PEM CA bundle"),
    "termination_retention": ((int, float), lambda v: 0 <= v < 1e9, "seconds >= 0"),
    "disk_watch_interval": ((int, float), lambda v: 0.1 <= v <= 86400, "seconds, 0.1 to 86400"),
    "allow_privileged": (bool, lambda v: True, "true or false"),
    "log_max_size": (int, lambda v: 0 <= v <= 1 << 62, "a number of bytes >= 0 (0: no rotation)"),
    "log_max_files": (
        int,
        lambda v: 1 <= v <= OUTPUT_FILES_LIMIT,
        f"an integer from 1 to {OUTPUT_FILES_LIMIT}",
    ),
    "runtimes": (dict, lambda v: True, "a table of runtime tables"),
    "network": (dict, lambda v: True, "a table (see NETWORK_KEYS)"),
    "images": (dict, lambda v: True, f"a table of {list(IMAGES_KEYS)}"),
    "registry": (dict, lambda v: True, 'docker_config and tables [registry."HOST[:PORT]"]'),
    "metrics_listen": (
        str,
        _is_loopback_listen_address,
        "a loopback HOST:PORT, e.g. 127.0.0.1:9101 (the metrics have no authentication)",
    ),
    "log_format": (str, lambda v: v in ("text", "json"), "'text' or 'json'"),
    "user_namespace": (dict, lambda v: True, f"a table of {list(USER_NAMESPACE_KEYS)}"),
}


def load_config(path: str | Path | None) -> AgentConfig:
    """Read and validate the config at `path`; None gives the defaults."""
    if path is None:
        return AgentConfig()
    source = Path(path)
    try:
        raw = tomllib.loads(source.read_text())
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    return parse_config(raw, source)


def parse_config(raw: dict[str, Any], source: Path | None = None) -> AgentConfig:
    where = str(source) if source else "<config>"
    for key, value in raw.items():
        _check_top_level(where, key, value)
    if raw.get("version", CONFIG_VERSION) != CONFIG_VERSION:
        raise ConfigError(f"{where}: version: expected {CONFIG_VERSION}")
    state_dir = Path(raw.get("state_dir", DEFAULT_STATE_DIR))
    runtimes = _parse_runtimes(where, raw.get("runtimes", {"native": {}}), state_dir)
    default_runtime = raw.get("default_runtime", "native")
    if default_runtime not in runtimes:
        raise ConfigError(
            f"{where}: default_runtime: {default_runtime!r} has no [runtimes.{default_runtime}]"
            f" table; configured: {sorted(runtimes)}"
        )
    _check_listener_tls(where, raw)
    defaults = AgentConfig()
    return AgentConfig(
        default_runtime=default_runtime,
        isolators=tuple(raw.get("isolators", defaults.isolators)),
        cgroups_root=raw.get("cgroups_root", defaults.cgroups_root),
        cgroups_hierarchy=raw.get("cgroups_hierarchy"),
        cgroups_enable_cfs=raw.get("cgroups_enable_cfs", False),
        state_dir=state_dir,
        socket=Path(raw.get("socket", DEFAULT_SOCKET)),
        cri_socket=_optional_path(raw.get("cri_socket")),
        mesos_socket=_optional_path(raw.get("mesos_socket")),
        cri_streaming_address=raw.get("cri_streaming_address", defaults.cri_streaming_address),
        listen=raw.get("listen"),
        tls_cert=_optional_path(raw.get("tls_cert")),
        tls_key=_optional_path(raw.get("tls_key")),
        tls_client_ca=_optional_path(raw.get("tls_client_ca")),
        termination_retention=float(raw.get("termination_retention", 3600.0)),
        disk_watch_interval=float(raw.get("disk_watch_interval", defaults.disk_watch_interval)),
        allow_privileged=raw.get("allow_privileged", False),
        log_max_size=raw.get("log_max_size", defaults.log_max_size),
        log_max_files=raw.get("log_max_files", defaults.log_max_files),
        runtimes=runtimes,
        network=_parse_network(where, raw["network"]) if "network" in raw else NetworkOptions(),
        images=_parse_images(where, raw.get("images", {})),
        registry=_parse_registry(where, raw.get("registry", {})),
        metrics_listen=raw.get("metrics_listen"),
        log_format=raw.get("log_format", defaults.log_format),
        user_namespace=parse_user_namespace(where, raw.get("user_namespace", {})),
        source=source,
    )


TLS_KEYS = ("tls_cert", "tls_key", "tls_client_ca")


def _optional_path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def _check_listener_tls(where: str, raw: dict[str, Any]) -> None:
    """A TCP listener is reachable by every local user (and maybe the network), and the API
    launches root containers: it needs client certificates, never plain TCP."""
    missing = [key for key in TLS_KEYS if key not in raw]
    if "listen" in raw and missing:
        raise ConfigError(
            f"{where}: listen: a TCP listener needs mutual TLS; set {', '.join(TLS_KEYS)}"
            f" (missing: {', '.join(missing)})"
        )


def _parse_network(where: str, table: dict[str, Any]) -> NetworkOptions:
    for key, value in table.items():
        if key not in NETWORK_KEYS:
            raise ConfigError(f"{where}: network.{key}: unknown key; known: {sorted(NETWORK_KEYS)}")
        expected_type, check, expected = NETWORK_KEYS[key]
        if not isinstance(value, expected_type) or not check(value):
            raise ConfigError(f"{where}: network.{key}: expected {expected}, got {value!r}")
    options = NetworkOptions(
        enabled=True,
        default_mode=table.get("default_mode", "bridge"),
        allow_host=table.get("allow_host", False),
        **{k: v for k, v in table.items() if k not in ("default_mode", "allow_host")},
    )
    if options.default_mode == "host" and not options.allow_host:
        raise ConfigError(f"{where}: network.default_mode: 'host' needs network.allow_host = true")
    return options


def _parse_images(where: str, table: dict[str, Any]) -> ImagesOptions:
    values = dict(table)
    mirrors = values.pop("mirrors", {})
    for key, value in values.items():
        if key not in IMAGES_KEYS:
            raise ConfigError(f"{where}: images.{key}: unknown key; known: {list(IMAGES_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 63:
            raise ConfigError(f"{where}: images.{key}: expected an integer > 0, got {value!r}")
    if not isinstance(mirrors, dict):
        raise ConfigError(f'{where}: images.mirrors: expected a table of REGISTRY = "HOST:PORT"')
    # Imported here: the image package's store imports this module.
    from adapter.images.registry import checked_mirrors

    try:
        checked = checked_mirrors(mirrors)
    except InvalidArgument as exc:
        raise ConfigError(f"{where}: {exc}") from None
    options = ImagesOptions(**values, mirrors=tuple(sorted(checked.items())))
    if options.gc_low_bytes > options.gc_high_bytes or (
        options.gc_high_bytes and not options.gc_low_bytes
    ):
        raise ConfigError(
            f"{where}: images.gc_low_bytes: expected a size > 0 and <= images.gc_high_bytes "
            f"({options.gc_high_bytes}), got {options.gc_low_bytes}"
        )
    return options


def _parse_registry(where: str, table: dict[str, Any]) -> RegistryOptions:
    """Values of auth and password are secrets: no message here repeats them."""
    # Imported here: the image package's store imports this module.
    from adapter.images.auth import decode_auth
    from adapter.images.reference import DOMAIN_PATTERN

    hosts = []
    docker_config = table.get("docker_config")
    if docker_config is not None and not (
        isinstance(docker_config, str) and docker_config.startswith("/")
    ):
        raise ConfigError(f"{where}: registry.docker_config: expected an absolute path")
    for name, host in table.items():
        if name == "docker_config":
            continue
        key = f'registry."{name}"'
        if not DOMAIN_PATTERN.fullmatch(name) or not isinstance(host, dict):
            raise ConfigError(
                f'{where}: {key}: expected a table [registry."HOST[:PORT]"] (no scheme or path) '
                "or docker_config"
            )
        hosts.append((name, _parse_registry_host(where, key, host, decode_auth)))
    return RegistryOptions(
        hosts=tuple(sorted(hosts, key=lambda item: item[0])),
        docker_config=_optional_path(docker_config),
    )


def _parse_registry_host(
    where: str, key: str, table: dict[str, Any], decode_auth: Callable[[str, str], tuple[str, str]]
) -> RegistryHostOptions:
    for name, value in table.items():
        if name not in REGISTRY_HOST_KEYS:
            raise ConfigError(f"{where}: {key}.{name}: unknown key; known: {REGISTRY_HOST_KEYS}")
        expected = bool if name == "insecure" else str
        if not isinstance(value, expected):
            raise ConfigError(f"{where}: {key}.{name}: expected a {expected.__name__}")
    username, password = table.get("username", ""), table.get("password", "")
    if "auth" in table:
        if username or password:
            raise ConfigError(f"{where}: {key}: give auth or username and password, not both")
        try:
            username, password = decode_auth(table["auth"], f"{key}.auth")
        except InvalidArgument as exc:
            raise ConfigError(f"{where}: {exc}") from None
    ca_file = table.get("ca_file")
    if ca_file is not None and not ca_file.startswith("/"):
        raise ConfigError(f"{where}: {key}.ca_file: expected an absolute path to a PEM bundle")
    return RegistryHostOptions(username, password, _optional_path(ca_file), table.get("insecure"))


def _check_top_level(where: str, key: str, value: Any) -> None:
    if key not in TOP_LEVEL:
        raise ConfigError(f"{where}: unknown key {key!r}; known keys: {sorted(TOP_LEVEL)}")
    expected_type, check, expected = TOP_LEVEL[key]
    # bool is an int in Python; a `true` where a number is expected is still a mistake.
    wrong_bool = isinstance(value, bool) and expected_type is not bool
    if wrong_bool or not isinstance(value, expected_type) or not check(value):
        raise ConfigError(f"{where}: {key}: expected {expected}, got {value!r}")


def _parse_runtimes(
    where: str, tables: dict[str, Any], state_dir: Path
) -> dict[str, RuntimeOptions]:
    if not tables:
        raise ConfigError(f"{where}: runtimes: at least one runtime table is required")
    return {
        name: parse_options(name, table, source=where, state_dir=state_dir)
        for name, table in tables.items()
    }
