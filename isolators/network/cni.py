"""CNI (Container Network Interface, spec 1.0): find a network config list and run its plugins.

    load_network(conf_dir, name) -> NetworkList    the operator's .conflist (or a single .conf)
    add(plugins, network, invocation) -> result    ADD through the chain, prevResult passed on
    check(plugins, network, invocation, result)    CHECK through the chain with the cached result
    delete(plugins, network, invocation, result)   DEL in reverse order, every plugin tried
    parse_result(result) -> CniResult              IPs, routes, DNS and the host-side interface

A plugin is an executable named by a config's `type`, looked up only in the configured binary
directories: a bare name, never a path, so neither a config nor a workload can point us at
another program. It runs as an asyncio subprocess with the spec's environment, its config on
stdin and a timeout; its error ({code, msg, details} on stdout) becomes a CniError naming the
plugin. This module knows nothing of containers or checkpoints (cni_isolator.py does).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isolators.network.model import NetworkConfigError, NetworkError, PortMapping

log = logging.getLogger(__name__)

CONFIG_SUFFIXES = (".conflist", ".conf", ".json")  # libcni's: a .conf holds a single plugin
PLUGIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
PLUGIN_TIMEOUT_SECONDS = 60.0
MAX_OUTPUT_BYTES = 1 << 20
KILL_WAIT_SECONDS = 5.0
# Plugins exec iptables, ip, tc...: a fixed PATH rather than the service's environment.
PLUGIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
VERSIONS_WITH_CHECK = ("0.4.0", "1.0.0", "1.1.0")


class CniError(NetworkError):
    """A plugin failed: its CNI error code, message and details, or why it could not run."""

    def __init__(self, plugin: str, command: str, code: int, msg: str, details: str = "") -> None:
        text = f"CNI plugin {plugin!r} {command} failed (code {code}): {msg}"
        super().__init__(text + (f" ({details})" if details else ""))
        self.code = code


@dataclass(frozen=True)
class NetworkList:
    """One network config list: its name, version and plugin configs, as read from `source`."""

    name: str
    cni_version: str
    plugins: tuple[dict[str, Any], ...]
    disable_check: bool = False
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cniVersion": self.cni_version,
            "disableCheck": self.disable_check,
            "plugins": list(self.plugins),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> NetworkList:
        """Checked as far as we rely on it; the plugins check the rest of their own configs."""
        name, version = data.get("name"), data.get("cniVersion")
        if not isinstance(name, str) or not name:
            raise NetworkConfigError(f"{source}: 'name' must be a non-empty string")
        if not isinstance(version, str) or not version:
            raise NetworkConfigError(f"{source}: 'cniVersion' must be a string such as '1.0.0'")
        plugins = data.get("plugins")
        if "plugins" not in data and "type" in data:  # a .conf: one plugin, no list
            plugins = [{k: v for k, v in data.items() if k not in ("name", "cniVersion")}]
        if not isinstance(plugins, list) or not plugins:
            raise NetworkConfigError(f"{source}: 'plugins' must be a non-empty list")
        for index, plugin in enumerate(plugins):
            kind = plugin.get("type") if isinstance(plugin, dict) else None
            if not isinstance(kind, str) or PLUGIN_NAME.fullmatch(kind) is None:
                raise NetworkConfigError(
                    f"{source}: plugins[{index}].type: expected a plugin's file name, got {kind!r}"
                )
        return cls(name, version, tuple(plugins), bool(data.get("disableCheck", False)), source)


def load_network(conf_dir: Path, name: str | None) -> NetworkList:
    """The config list named `name` in `conf_dir`, or (None) the first by file name, as CNI's
    own tools choose; NetworkConfigError if there is none or it does not parse."""
    try:
        files = sorted(p for p in conf_dir.iterdir() if p.suffix in CONFIG_SUFFIXES)
    except OSError as exc:
        raise NetworkConfigError(f"network.conf_dir: cannot list {conf_dir}: {exc}") from exc
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            if name is None:
                raise NetworkConfigError(f"{path}: not a CNI network config: {exc}") from exc
            continue  # another network's broken file does not hide the one asked for
        if not isinstance(data, dict) or (name is not None and data.get("name") != name):
            continue
        return NetworkList.from_json(data, str(path))
    wanted = f"named {name!r}" if name is not None else "(*.conflist, *.conf, *.json)"
    raise NetworkConfigError(f"network.conf_dir: no CNI network config {wanted} in {conf_dir}")


def find_plugin(bin_dirs: tuple[Path, ...], kind: str) -> Path:
    """The executable for plugin type `kind`: the first in `bin_dirs`."""
    if PLUGIN_NAME.fullmatch(kind) is None:
        raise NetworkConfigError(f"CNI plugin type {kind!r} is not a file name")
    for directory in bin_dirs:
        candidate = directory / kind
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(d) for d in bin_dirs)
    raise NetworkConfigError(f"CNI plugin {kind!r} not found in network.bin_dir ({searched})")


def missing_plugins(bin_dirs: tuple[Path, ...], network: NetworkList) -> list[str]:
    missing = []
    for plugin in network.plugins:
        with contextlib.suppress(NetworkConfigError):
            find_plugin(bin_dirs, plugin["type"])
            continue
        missing.append(str(plugin["type"]))
    return missing


@dataclass(frozen=True)
class Invocation:
    """What every plugin call of one container shares (the spec's CNI_* variables) and the
    runtime config offered to plugins that declare the capability."""

    container_id: str
    netns: Path
    ifname: str = "eth0"
    port_mappings: tuple[PortMapping, ...] = ()
    bandwidth_mbit: float | None = None

    def environment(self, command: str, bin_dirs: tuple[Path, ...]) -> dict[str, str]:
        return {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": self.container_id,
            "CNI_NETNS": str(self.netns),
            "CNI_IFNAME": self.ifname,
            "CNI_PATH": ":".join(str(d) for d in bin_dirs),
            "PATH": PLUGIN_PATH,
        }

    def runtime_config(self, capabilities: dict[str, Any]) -> dict[str, Any]:
        """The spec's well-known capabilities we have values for, where the plugin asks."""
        offered: dict[str, Any] = {}
        if capabilities.get("portMappings") and self.port_mappings:
            offered["portMappings"] = [
                {"hostPort": m.host_port, "containerPort": m.container_port, "protocol": m.protocol}
                for m in self.port_mappings
            ]
        if capabilities.get("bandwidth") and self.bandwidth_mbit is not None:
            rate = int(self.bandwidth_mbit * 1_000_000)  # bits per second
            # Ingress: what reaches the container, as the bridge backend shapes (shaping.py).
            burst = max(rate // 100, 64 * 1024 * 8)  # bits; holds a GSO super-packet
            offered["bandwidth"] = {"ingressRate": rate, "ingressBurst": burst}
        return offered


def plugin_config(
    network: NetworkList,
    plugin: dict[str, Any],
    invocation: Invocation,
    prev_result: dict[str, Any] | None,
) -> dict[str, Any]:
    """The stdin of one plugin call: its config plus the list's name and version, the previous
    result, and runtimeConfig for its declared capabilities (never the `capabilities` key)."""
    conf = {k: v for k, v in plugin.items() if k not in ("capabilities", "runtimeConfig")}
    conf["name"] = network.name
    conf["cniVersion"] = network.cni_version
    runtime_config = invocation.runtime_config(plugin.get("capabilities") or {})
    if runtime_config:
        conf["runtimeConfig"] = runtime_config
    if prev_result is not None:
        conf["prevResult"] = prev_result
    return conf


async def run_plugin(
    bin_dirs: tuple[Path, ...],
    command: str,
    conf: dict[str, Any],
    invocation: Invocation,
    timeout: float = PLUGIN_TIMEOUT_SECONDS,
) -> dict[str, Any] | None:
    """Run one plugin; its result (ADD) or None (CHECK, DEL). CniError on failure."""
    kind = str(conf["type"])
    executable = find_plugin(bin_dirs, kind)
    process = await asyncio.create_subprocess_exec(
        str(executable),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=invocation.environment(command, bin_dirs),
        cwd="/",
        start_new_session=True,  # its own process group: a kill reaches what it started
    )
    try:
        stdout, stderr = await asyncio.wait_for(
            _bounded_communicate(process, json.dumps(conf).encode()), timeout
        )
    except TimeoutError:
        await _kill(process)
        raise CniError(kind, command, 0, f"no answer within {timeout:g} s") from None
    except _OutputTooLarge:
        await _kill(process)
        raise CniError(kind, command, 0, f"it wrote more than {MAX_OUTPUT_BYTES} bytes") from None
    except BaseException:  # a cancelled launch: the plugin must not live on
        await _kill(process)
        raise
    if process.returncode != 0:
        raise _plugin_error(kind, command, stdout, stderr)
    if command != "ADD":
        return None
    try:
        result = json.loads(stdout[:MAX_OUTPUT_BYTES])
    except ValueError as exc:
        raise CniError(kind, command, 0, f"its result is not JSON: {exc}") from exc
    if not isinstance(result, dict):
        raise CniError(kind, command, 0, "its result is not a JSON object")
    return result


class _OutputTooLarge(Exception):
    """A plugin wrote more than MAX_OUTPUT_BYTES on stdout or stderr."""


async def _bounded_communicate(
    process: asyncio.subprocess.Process, config: bytes
) -> tuple[bytes, bytes]:
    """communicate(), but reading at most MAX_OUTPUT_BYTES of each stream: a plugin cannot
    fill the service's memory (_OutputTooLarge past the bound). Waits for its exit."""
    assert process.stdin and process.stdout and process.stderr
    with contextlib.suppress(ConnectionError):
        process.stdin.write(config)
        await process.stdin.drain()
    process.stdin.close()
    readers = [
        asyncio.ensure_future(_read_bounded(stream)) for stream in (process.stdout, process.stderr)
    ]
    try:
        stdout, stderr = await asyncio.gather(*readers)
    finally:  # one stream past the bound: the other's reader stops too (_kill drains both)
        for reader in readers:
            reader.cancel()
    await process.wait()
    return stdout, stderr


async def _read_bounded(stream: asyncio.StreamReader) -> bytes:
    data = bytearray()
    while chunk := await stream.read(1 << 16):
        data += chunk
        if len(data) > MAX_OUTPUT_BYTES:
            raise _OutputTooLarge
    return bytes(data)


async def _kill(process: asyncio.subprocess.Process) -> None:
    """Kill the plugin and whatever it started (its process group), and reap it. asyncio's
    wait() returns only once the output pipes reached their end, and a reader stopped at the
    bound left its pipe paused: what the plugin left in them is read and dropped. A process
    outside the group that still holds a pipe (it left the plugin's session) cannot hold us
    longer than KILL_WAIT_SECONDS; the plugin itself is reaped by asyncio's child watcher."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    assert process.stdout and process.stderr
    ended = asyncio.gather(_drain(process.stdout), _drain(process.stderr), process.wait())
    try:
        await asyncio.wait_for(ended, KILL_WAIT_SECONDS)
    except TimeoutError:
        log.warning("CNI plugin %d: its output pipes stayed open after its kill", process.pid)


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(1 << 16):
        pass


def _plugin_error(kind: str, command: str, stdout: bytes, stderr: bytes) -> CniError:
    """The spec's error object if the plugin wrote one, else its stderr."""
    with contextlib.suppress(ValueError):
        error = json.loads(stdout[:MAX_OUTPUT_BYTES])
        if isinstance(error, dict) and "msg" in error:
            return CniError(
                kind, command, int(error.get("code", 0)), str(error["msg"]),
                str(error.get("details", "")),
            )  # fmt: skip
    text = stderr[-2000:].decode(errors="replace").strip() or "no error message"
    return CniError(kind, command, 0, text)


async def add(
    bin_dirs: tuple[Path, ...], network: NetworkList, invocation: Invocation
) -> dict[str, Any]:
    """ADD through the chain; each plugin gets the previous one's result, the last one's is
    the network's. On failure, the caller DELs (the spec: DEL must clean up a partial ADD)."""
    result: dict[str, Any] | None = None
    for plugin in network.plugins:
        conf = plugin_config(network, plugin, invocation, result)
        result = await run_plugin(bin_dirs, "ADD", conf, invocation) or result
    assert result is not None  # plugins is never empty
    return result


async def check(
    bin_dirs: tuple[Path, ...],
    network: NetworkList,
    invocation: Invocation,
    result: dict[str, Any],
) -> None:
    """CHECK through the chain with the cached ADD result; skipped where the spec says."""
    if network.disable_check or network.cni_version not in VERSIONS_WITH_CHECK:
        return
    for plugin in network.plugins:
        await run_plugin(
            bin_dirs, "CHECK", plugin_config(network, plugin, invocation, result), invocation
        )


async def delete(
    bin_dirs: tuple[Path, ...],
    network: NetworkList,
    invocation: Invocation,
    result: dict[str, Any] | None,
) -> None:
    """DEL in reverse order with the cached result. Every plugin is tried even when one fails,
    so one broken plugin leaves only its own resources; the first error is raised after."""
    errors: list[NetworkError] = []
    for plugin in reversed(network.plugins):
        conf = plugin_config(network, plugin, invocation, result)
        try:
            await run_plugin(bin_dirs, "DEL", conf, invocation)
        except NetworkError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


@dataclass(frozen=True)
class CniResult:
    """What we use of a result: the container's addresses (CIDR), routes, DNS and the host-side
    interface (the veth whose counters are the container's)."""

    addresses: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    routes: tuple[tuple[str, str], ...] = ()
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    host_interface: str | None = None
    dns_options: tuple[str, ...] = field(default=())

    @property
    def ipv4(self) -> ipaddress.IPv4Interface | None:
        for text in self.addresses:
            interface = ipaddress.ip_interface(text)
            if isinstance(interface, ipaddress.IPv4Interface):
                return interface
        return None


def parse_result(result: dict[str, Any]) -> CniResult:
    """The fields of a 0.3.x-1.x result that we use; a result without them is valid (none)."""
    try:
        interfaces = result.get("interfaces") or []
        ips = result.get("ips") or []
        dns = result.get("dns") or {}
        host = _host_interface(interfaces)
        return CniResult(
            addresses=tuple(str(ipaddress.ip_interface(ip["address"])) for ip in ips),
            gateways=tuple(str(ip["gateway"]) for ip in ips if ip.get("gateway")),
            routes=tuple((str(r["dst"]), str(r.get("gw", ""))) for r in result.get("routes") or []),
            nameservers=tuple(str(n) for n in dns.get("nameservers") or []),
            search=tuple(str(s) for s in dns.get("search") or []),
            dns_options=tuple(str(o) for o in dns.get("options") or []),
            host_interface=host,
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise NetworkError(f"CNI result not understood: {exc}: {json.dumps(result)[:500]}") from exc


def _host_interface(interfaces: list[dict[str, Any]]) -> str | None:
    """The host side of the container's link: the last host interface listed before the first
    one in the sandbox (the bridge plugin lists bridge, host veth, container veth; ptp lists host
    veth, container veth)."""
    host = None
    for interface in interfaces:
        if interface.get("sandbox"):
            break
        host = interface.get("name") or host
    return str(host) if host else None
