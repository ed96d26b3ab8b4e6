"""A CRI Localhost seccomp profile as plain OCI `linux.seccomp` JSON (what runc compiles, and
what Docker takes as a profile): for the runtimes that hand a profile to an OCI runtime.

The node admin's file is read and checked by the same code as for the native runtime
(adapter/supervisor/seccomp.py), never handed to runc as it is: Docker's extensions (includes,
excludes, archMap, `name`) mean nothing to runc, which would silently keep rules meant for
other capabilities. What the check kept for this container's capabilities is written back as
plain OCI rules, and compiled once here too, so that a profile too long for the kernel fails as
the request's mistake (naming the field) rather than as runc's at start.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

from adapter.core.confinement import confinement_of
from adapter.core.model import LaunchSpec
from adapter.supervisor.seccomp import compile_oci_profile, read_localhost_profile
from adapter.supervisor.seccomp_profile import (
    ACTIONS_WITH_RETURN_CODE,
    HOST_ARCHES,
    NATIVE_ARCH,
    OCI_ACTIONS,
    OCI_OPERATORS,
    Comparison,
    OciProfile,
    SyscallRule,
)

FIELD = "linux.security_context.seccomp.localhost_ref"
RETURN_CODE_MASK = 0xFFFF
ACTION_MASK = ~RETURN_CODE_MASK & 0xFFFFFFFF
# One name per value: KILL and KILL_THREAD are the same action.
_ACTION_NAMES = {value: name for name, value in reversed(OCI_ACTIONS.items())}
_WITH_RETURN_CODE = {OCI_ACTIONS[name]: name for name in ACTIONS_WITH_RETURN_CODE}
_OPERATOR_NAMES = {value: name for name, value in OCI_OPERATORS.items()}
_ARCH_NAMES = {token: name for name, token in HOST_ARCHES.items()}


async def launch_profile(spec: LaunchSpec) -> dict[str, Any] | None:
    """The node's profile a launch names, read and checked; None when it names none (or is
    privileged: no filter at all)."""
    path = spec.linux.localhost_seccomp()
    if path is None or spec.privileged:
        return None
    return await localhost_profile(path, confinement_of(spec).capabilities)


async def localhost_profile(path: str, capabilities: Collection[str]) -> dict[str, Any]:
    """The profile at `path`, for a container holding `capabilities`, as OCI JSON. Reading and
    compiling block: they run off the event loop."""
    return await asyncio.to_thread(_checked_profile, path, tuple(capabilities))


def _checked_profile(path: str, capabilities: tuple[str, ...]) -> dict[str, Any]:
    document = oci_profile(read_localhost_profile(path, FIELD, capabilities=capabilities))
    compile_oci_profile(document, field=FIELD, capabilities=capabilities)
    return document


def oci_profile(profile: OciProfile) -> dict[str, Any]:
    """`profile` (checked, filtered for one container) as plain OCI runtime-spec JSON."""
    document: dict[str, Any] = _action_fields(profile.default_action, "defaultAction")
    if "errnoRet" in document:
        document["defaultErrnoRet"] = document.pop("errnoRet")
    arches = [_ARCH_NAMES[token] for token in profile.arches]
    document["architectures"] = list(dict.fromkeys([NATIVE_ARCH, *arches]))
    document["syscalls"] = [
        entry
        for rule in profile.rules
        if rule.action != profile.default_action  # runc, as libseccomp, refuses those
        for entry in _entries(rule)
    ]
    return document


def _entries(rule: SyscallRule) -> list[dict[str, Any]]:
    """One OCI entry per comparison set: a set's comparisons must all hold, and any set does."""
    entries = []
    for comparisons in rule.comparison_sets:
        entry: dict[str, Any] = {"names": list(rule.names), **_action_fields(rule.action)}
        if comparisons:
            entry["args"] = [_argument(comparison) for comparison in comparisons]
        entries.append(entry)
    return entries


def _action_fields(action: int, key: str = "action") -> dict[str, Any]:
    """{key: the OCI name} and errnoRet for the actions that carry a return code."""
    base = action & ACTION_MASK
    if base in _WITH_RETURN_CODE:
        return {key: _WITH_RETURN_CODE[base], "errnoRet": action & RETURN_CODE_MASK}
    return {key: _ACTION_NAMES[action]}


def _argument(comparison: Comparison) -> dict[str, Any]:
    return {
        "index": comparison.index,
        "value": comparison.value,
        "valueTwo": comparison.value_two,
        "op": _OPERATOR_NAMES[comparison.op],
    }
