"""The workloads compare runs: one spec for every runtime, so the numbers are comparable.

Every command is a constant POSIX shell string that busybox sh and dash both run unchanged:
every runtime whose Capabilities say `images` (native included) runs it in the busybox image, one
without image support on the host filesystem. Nothing the user typed is ever put into a command.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from adapter.runtimes.registry import RUNTIME_NAMES

if TYPE_CHECKING:
    from adapter.api.containerizer.v1 import containerizer_pb2 as pb

MIB = 1024 * 1024
# Compared unless --runtimes says otherwise: every runtime the service can have a driver for.
DEFAULT_RUNTIMES = RUNTIME_NAMES
DEFAULT_IMAGE = "localhost/busybox:latest"
# Long enough to outlive any measurement; short enough that a sleeper orphaned by a killed
# compare run ends by itself even if nobody sweeps it.
IDLE_SECONDS = 600

CPU_LIMIT_CPUS = 0.5
MEMORY_LIMIT_MIB = 64
MEMORY_HOG_MIB = 200  # well past the limit, so the OOM killer must act
PIDS_LIMIT = 32
BUSY_LOOP_SECONDS = 1
HELD_MEMORY_MIB = 64
# Printed by the accounting workloads once their known amount of work is done.
HELD_MARKER = "held"


# Idle until destroyed. The `exit` keeps the shell alive: busybox sh execs the last command of
# `sh -c`, which would drop the shell, and any memory it holds, in favour of `sleep`.
STAY = f"sleep {IDLE_SECONDS}; exit 0"


def hold_memory(mib: int) -> str:
    """A shell that keeps `mib` MiB of touched anonymous memory in a variable: no Python, no
    allocator tool, only applets the test busybox image has (yes, head)."""
    return f"held=$(yes xxxxxxx | head -c {mib * MIB})"


@dataclass(frozen=True)
class Workload:
    """What one container runs: `shell` (via /bin/sh -c) or `argv`, and its resources."""

    purpose: str  # short; part of the container id, so only [a-z0-9-]
    shell: str = ""
    argv: tuple[str, ...] = ()
    resources: tuple[tuple[str, float], ...] = ()

    def request(
        self, container_id: str, runtime: str, image: str, labels: dict[str, str]
    ) -> pb.LaunchRequest:
        from adapter.api.containerizer.v1 import containerizer_pb2 as pb

        return pb.LaunchRequest(
            container_id=container_id,
            command=pb.CommandInfo(shell=self.shell, argv=list(self.argv)),
            resources=[
                pb.Resource(name=name, type=pb.Value.SCALAR, scalar=pb.Value.Scalar(value=value))
                for name, value in self.resources
            ],
            container=pb.ContainerInfo(runtime=runtime, image=image),
            labels=labels,
        )


# Latency: the smallest complete lifecycle, and the teardown of something running.
TRUE = Workload("true", argv=("/bin/true",))
IDLE = Workload("idle", argv=("/bin/sleep", str(IDLE_SECONDS)))

# Isolation: each one tries to exceed its limit.
MEMORY_HOG = Workload(
    "mem-limit",
    shell=f"{hold_memory(MEMORY_HOG_MIB)}; {STAY}",
    resources=(("mem", MEMORY_LIMIT_MIB),),
)
CPU_HOG = Workload("cpu-limit", shell="while :; do :; done", resources=(("cpus", CPU_LIMIT_CPUS),))
FORK_BOMB = Workload(
    "pids-limit",
    shell=f"bomb() {{ bomb | bomb & }}; bomb; {STAY}",
    resources=(("pids", PIDS_LIMIT),),
)

# Accounting: a known amount of work, then idle so Usage can still be asked. The busy loop is
# `timeout 1 sh -c 'while :; do :; done'` built from sleep and kill (busybox images may lack
# timeout); `times` then prints the reaped children's user and system time as the kernel's
# rusage counted them (its second line).
TIMED_BUSY_LOOP = Workload(
    "cpu-acct",
    shell=(
        f"sh -c 'while :; do :; done' & loop=$!; sleep {BUSY_LOOP_SECONDS}; kill $loop; "
        f"wait $loop; times; echo {HELD_MARKER}; {STAY}"
    ),
)
HELD_MEMORY = Workload(
    "mem-acct", shell=f"{hold_memory(HELD_MEMORY_MIB)}; echo {HELD_MARKER}; {STAY}"
)
