"""Port forwards (and optional egress NAT) as one nftables table of our own, via `nft -j -f -`.

The whole table is rendered from the checkpoint and replaced in one nft transaction (add table,
delete table, add table, chains, rules) on every change. That keeps it exactly in step with the
checkpoint without tracking rule handles, makes recovery a plain re-render, and never touches a
rule of anybody else: everything lives in `table inet containerizer_<bridge>`, and with no
forward left the table is deleted.

DNAT rather than a userspace proxy: no process per port to supervise and re-attach after a
crash, no copy through the service, and the container sees real traffic. Locally generated
connections (to 127.0.0.1 or the host address) pass the `output` hook, remote ones `prerouting`;
a connection from 127.0.0.1 keeps that source after DNAT, so the bridge has route_localnet on
and `postrouting` masquerades it to the bridge's address, which the container can answer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from isolators.network.model import NetworkError

NFT = "nft"
FAMILY = "inet"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Forward:
    host_port: int
    protocol: str
    container_address: str
    container_port: int


def table_name(bridge: str) -> str:
    return "containerizer_" + bridge.replace("-", "_")


def _chain(table: str, name: str, hook: str, priority: int) -> dict[str, Any]:
    return {
        "chain": {
            "family": FAMILY,
            "table": table,
            "name": name,
            "type": "nat",
            "hook": hook,
            "prio": priority,
            "policy": "accept",
        }
    }


def _match(protocol: str, field: str, value: Any, op: str = "==") -> dict[str, Any]:
    return {
        "match": {
            "op": op,
            "left": {"payload": {"protocol": protocol, "field": field}},
            "right": value,
        }
    }


def _rule(table: str, chain: str, expressions: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "add": {"rule": {"family": FAMILY, "table": table, "chain": chain, "expr": expressions}}
    }


def _addresses(addresses: Sequence[str]) -> Any:
    return addresses[0] if len(addresses) == 1 else {"set": list(addresses)}


def render(
    *,
    bridge: str,
    subnet: ipaddress.IPv4Network,
    host_address: str | None,
    forwards: Sequence[Forward],
    egress_nat: bool,
) -> list[dict[str, Any]]:
    """The nft JSON commands that replace our table with exactly these forwards, or delete it
    when there is nothing to do. Pure: every value comes from validated, typed fields."""
    table = table_name(bridge)
    reset: list[dict[str, Any]] = [
        {"add": {"table": {"family": FAMILY, "name": table}}},
        {"delete": {"table": {"family": FAMILY, "name": table}}},
    ]
    if not forwards and not egress_nat:
        return reset
    commands = [*reset, {"add": {"table": {"family": FAMILY, "name": table}}}]
    commands += [{"add": _chain(table, "prerouting", "prerouting", -100)}]
    commands += [{"add": _chain(table, "output", "output", -100)}]
    commands += [{"add": _chain(table, "postrouting", "postrouting", 100)}]
    local = [LOOPBACK, *([host_address] if host_address else [])]
    remote = [host_address] if host_address else []
    for forward in sorted(forwards, key=lambda f: (f.host_port, f.protocol)):
        dnat = {
            "dnat": {
                "family": "ip",
                "addr": forward.container_address,
                "port": forward.container_port,
            }
        }
        port = _match(forward.protocol, "dport", forward.host_port)
        commands.append(
            _rule(table, "output", [_match("ip", "daddr", _addresses(local)), port, dnat])
        )
        if remote:
            commands.append(
                _rule(table, "prerouting", [_match("ip", "daddr", _addresses(remote)), port, dnat])
            )
    to_bridge = {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": bridge}}
    loopback = {"prefix": {"addr": "127.0.0.0", "len": 8}}
    commands.append(
        _rule(
            table, "postrouting", [_match("ip", "saddr", loopback), to_bridge, {"masquerade": None}]
        )
    )
    if egress_nat:
        ours = {"prefix": {"addr": str(subnet.network_address), "len": subnet.prefixlen}}
        leaving = {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": bridge}}
        commands.append(
            _rule(
                table, "postrouting", [_match("ip", "saddr", ours), leaving, {"masquerade": None}]
            )
        )
    return commands


async def apply(commands: list[dict[str, Any]]) -> None:
    """Run the commands as one nft transaction (all or nothing)."""
    payload = json.dumps({"nftables": commands}).encode()
    try:
        process = await asyncio.create_subprocess_exec(
            NFT,
            "-j",
            "-f",
            "-",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise NetworkError(f"cannot run {NFT} for port forwarding: {exc}") from exc
    _, stderr = await process.communicate(payload)
    if process.returncode != 0:
        raise NetworkError(
            f"nft refused our port-forward table: {stderr.decode(errors='replace').strip()}"
        )
