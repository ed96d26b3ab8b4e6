"""The image and the request merged into what the workload runs, once for every runtime.

Docker's and Mesos' rules together: the request's command replaces the image's Entrypoint and
Cmd when given, else the image's own command runs; the image's Env comes first and the request's
variables win; the request's working directory and user win over the image's; MESOS_SANDBOX says
where the sandbox is as the workload sees it; PATH is always set.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapter.core.errors import InvalidArgument
from adapter.core.model import Command
from adapter.images.image import Image

# Mesos' convention: the sandbox appears here inside a container with its own root filesystem.
SANDBOX_IN_CONTAINER = "/mnt/mesos/sandbox"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Workload:
    """What a runtime starts: argv, the whole environment, working directory and user (None:
    the runtime's default, root)."""

    argv: tuple[str, ...]
    environment: tuple[tuple[str, str], ...]
    working_dir: str
    user: str | None

    def environment_lines(self) -> list[str]:
        return [f"{name}={value}" for name, value in self.environment]


def merge(command: Command, image: Image | None, *, host_sandbox: str) -> Workload:
    """The workload for `command`, in `image`'s root filesystem or (None) on the host's.

    `host_sandbox` is the sandbox's host path: the working directory and MESOS_SANDBOX of a
    workload without an image. Raises InvalidArgument("command") when neither the request nor
    the image names anything to run."""
    if image is None:
        environment = _with_defaults(dict(command.environment), host_sandbox)
        return Workload(
            argv=_argv(command, None),
            environment=environment,
            working_dir=command.working_dir or host_sandbox,
            user=command.user,
        )
    merged = dict(image.env)
    merged.update(command.environment)
    return Workload(
        argv=_argv(command, image),
        environment=_with_defaults(merged, SANDBOX_IN_CONTAINER),
        working_dir=command.working_dir or image.working_dir or SANDBOX_IN_CONTAINER,
        user=command.user or image.user or None,
    )


def _argv(command: Command, image: Image | None) -> tuple[str, ...]:
    requested = tuple(command.resolved_argv())
    if requested:
        return requested
    if image is not None and (image.entrypoint or image.cmd):
        return (*image.entrypoint, *image.cmd)
    where = f"image {image.reference!r} has no Entrypoint or Cmd" if image else "no image"
    raise InvalidArgument("command", f"is empty and {where}: give a shell string or an argv")


def _with_defaults(variables: dict[str, str], sandbox: str) -> tuple[tuple[str, str], ...]:
    variables["MESOS_SANDBOX"] = sandbox
    variables.setdefault("PATH", DEFAULT_PATH)
    return tuple(variables.items())
