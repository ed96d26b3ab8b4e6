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
from adapter.runtimes.native.options import NativeOptions
from adapter.runtimes.registry import RUNTIMES, RuntimeOptions, parse_options
from adapter.supervisor.client import OUTPUT_FILES_LIMIT

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


IMAGES_KEYS = ("max_import_bytes", "max_unpacked_bytes", "max_entries", "mirrors")


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
    # The CRI streaming server (Exec, Attach, PortForward URLs): loopback, any free port.
    cri_streaming_address: str = "127.0.0.1:0"
    listen: str | None = None
    # Mutual TLS of the `listen` address: the service's certificate and key, and the CA whose
    # client certificates it accepts. Required with `listen`; the Unix socket does not use them.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    termination_retention: float = 3600.0
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
    source: Path | None = None


def _is_listen_address(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


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
        cri_streaming_address=raw.get("cri_streaming_address", defaults.cri_streaming_address),
        listen=raw.get("listen"),
        tls_cert=_optional_path(raw.get("tls_cert")),
        tls_key=_optional_path(raw.get("tls_key")),
        tls_client_ca=_optional_path(raw.get("tls_client_ca")),
        termination_retention=float(raw.get("termination_retention", 3600.0)),
        allow_privileged=raw.get("allow_privileged", False),
        log_max_size=raw.get("log_max_size", defaults.log_max_size),
        log_max_files=raw.get("log_max_files", defaults.log_max_files),
        runtimes=runtimes,
        network=_parse_network(where, raw["network"]) if "network" in raw else NetworkOptions(),
        images=_parse_images(where, raw.get("images", {})),
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
    return ImagesOptions(**values, mirrors=tuple(sorted(checked.items())))


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
