"""The docker driver's confinement: adapter/core/confinement.py's policy as Engine API HostConfig.

Docker's defaults are never turned off, and made explicit so the policy is ours, the same as
under containerd: every capability dropped and the default set added back, the project's seccomp
allow-list instead of Docker's profile, the project's masked and read-only paths, no_new_privs
for a user that is not root (the request's, else the image's) and on request. Docker itself
mounts /sys and cgroupfs read-only and gives no host device. `privileged` is the only way to
Docker's Privileged. Every container has a cgroup namespace of its own (Docker's default on
cgroup v1 is the host's), as under containerd.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from adapter.core.confinement import (
    ALL_CAPABILITIES,
    confinement_of,
    held_capabilities,
    kernel_capabilities,
    oci_seccomp_profile,
)
from adapter.core.model import LaunchSpec

UNCONFINED = "unconfined"


def is_root_user(user: str) -> bool:
    """Whether a Docker USER (`name`, `uid`, `name:group`, `uid:gid`; empty: the default) is
    root. Any other name counts as not root: no_new_privs for a name that maps to uid 0 costs
    nothing, missing it for a non-root user would let a setuid binary give root back."""
    return user.partition(":")[0] in ("", "0", "root")


@dataclass(frozen=True)
class NodeCapabilities:
    """What this node can grant: `held`, its bounding set; `complete`, whether that is every
    capability the kernel has. Docker's Privileged asks runc for every one the kernel has, which
    fails on a node that itself runs with fewer (in a container, say)."""

    held: tuple[str, ...] = ALL_CAPABILITIES
    complete: bool = True

    @classmethod
    def of_this_node(cls) -> NodeCapabilities:
        held = held_capabilities()
        return cls(held, set(held) >= set(kernel_capabilities()))

    def warnings(self, spec: LaunchSpec) -> tuple[str, ...]:
        """What a privileged launch here does not get, said in the Launch reply."""
        if not spec.privileged or self.complete:
            return ()
        missing = sorted(set(kernel_capabilities()) - set(self.held))
        return (
            f"privileged: this node lacks {', '.join(missing)}, so Docker's Privileged cannot"
            " start: the container has every capability the node holds, no seccomp filter,"
            " nothing masked and every device, but /sys stays read-only",
        )


def confinement_fields(
    spec: LaunchSpec,
    image_user: str,
    node: NodeCapabilities = NodeCapabilities(),
    localhost: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """HostConfig fields of the launch's confinement (see the module docstring); `localhost`:
    the node's profile the launch names, read and checked by the caller. A privileged
    launch on an incomplete node gets, without Docker's Privileged (so /sys stays read-only),
    every capability Docker knows but those the node lacks (Docker may know fewer than the
    kernel: 20.10 stops at CAP_AUDIT_READ), no seccomp filter, nothing masked, every device."""
    confinement = confinement_of(spec)
    fields: dict[str, Any] = {
        "Privileged": confinement.privileged and node.complete,
        "CgroupnsMode": "private",
    }
    security: list[str] = []
    if not confinement.privileged:
        # A pod's lists add to ours: a workload never gets less than the default.
        masked = (*confinement.masked_paths, *(spec.linux.masked_paths or ()))
        readonly = (*confinement.readonly_paths, *(spec.linux.readonly_paths or ()))
        fields.update(
            CapDrop=["ALL"],
            CapAdd=[name for name in confinement.capabilities if name in node.held],
            MaskedPaths=list(dict.fromkeys(masked)),
            ReadonlyPaths=list(dict.fromkeys(readonly)),
        )
        security.append(seccomp_option(spec, confinement.capabilities, localhost))
    elif not node.complete:
        fields.update(
            CapAdd=["ALL"],
            CapDrop=[name for name in kernel_capabilities() if name not in node.held],
            MaskedPaths=[],
            ReadonlyPaths=[],
            DeviceCgroupRules=["a *:* rwm"],
        )
        security += ["seccomp=unconfined", "apparmor=unconfined"]
    if confinement.no_new_privs_for(is_root_user(spec.command.user or image_user)):
        security.append("no-new-privileges:true")
    if security:
        fields["SecurityOpt"] = security
    return fields


def seccomp_option(
    spec: LaunchSpec, capabilities: tuple[str, ...], localhost: dict[str, Any] | None
) -> str:
    """Ours for the container's capabilities (widened for added ones), none on request, or the
    node's Localhost profile as plain OCI JSON (Docker's profile format reads the OCI fields:
    defaultAction, defaultErrnoRet, architectures, syscalls)."""
    if spec.linux.seccomp == UNCONFINED:
        return "seccomp=unconfined"
    if spec.linux.localhost_seccomp() is not None:
        assert localhost is not None, "the caller reads the node's profile"
        profile = localhost
    else:
        profile = oci_seccomp_profile(capabilities)
    return "seccomp=" + json.dumps(profile, separators=(",", ":"))
