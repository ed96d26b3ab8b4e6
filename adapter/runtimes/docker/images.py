"""The images a docker launch runs: found in dockerd, pulled from the one configured registry,
or (a pod's holder, launched without one) imported from the host's static busybox.

Only the configured registry is ever pulled from: an unqualified name is looked up there, and a
reference naming another registry is NotFound unless dockerd already has it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import docker.auth  # type: ignore[import-untyped]
import docker.errors  # type: ignore[import-untyped]
import docker.utils  # type: ignore[import-untyped]

from adapter.core.errors import InvalidArgument, LaunchFailed, NotFound
from adapter.runtimes.docker import pod
from adapter.runtimes.docker.client import DockerEngine


@dataclass(frozen=True)
class DockerImage:
    """An image the daemon has: the reference to create from, and its own Config."""

    reference: str
    config: dict[str, Any] = field(default_factory=dict)

    def has_command(self) -> bool:
        return bool(self.config.get("Entrypoint") or self.config.get("Cmd"))


class DockerImages:
    """The images of one driver's dockerd; `registry` None: nothing is pulled."""

    def __init__(self, engine: DockerEngine, registry: str | None) -> None:
        self._engine = engine
        self._registry = registry
        # The holder image's tag, and the busybox binary it was made from (pod.holder_source).
        self._holder_tag: tuple[tuple[object, ...], str] | None = None

    async def holder(self) -> DockerImage:
        """The image of a launch without one (a pod's holder): the host's static busybox,
        imported once (its tag names its content). The layer is built and hashed only when the
        binary changed since the last pod, or when dockerd has lost the image."""
        source = pod.holder_source()  # one stat: no thread hop
        if self._holder_tag is not None and self._holder_tag[0] == source:
            reference = f"{pod.HOLDER_REPOSITORY}:{self._holder_tag[1]}"
            config = await self._engine.image_config(reference)
            if config is not None:
                return DockerImage(reference, config)
        rootfs, tag = await asyncio.to_thread(pod.holder_rootfs)
        self._holder_tag = (source, tag)
        reference = f"{pod.HOLDER_REPOSITORY}:{tag}"
        config = await self._engine.image_config(reference)
        if config is None:
            await self._engine.import_rootfs(rootfs, pod.HOLDER_REPOSITORY, tag)
            config = await self._engine.image_config(reference)
        return DockerImage(reference, config or {})

    async def ensure(self, reference: str) -> DockerImage:
        """The reference to create from: as given when Docker has it, else pulled from the
        configured registry (an unqualified name is looked up there). Never another registry."""
        config = await self._engine.image_config(reference)
        if config is not None:
            return DockerImage(reference, config)
        try:
            repository, tag = docker.utils.parse_repository_tag(reference)
            index, remote = docker.auth.resolve_repository_name(repository)
        except docker.errors.DockerException as exc:
            raise InvalidArgument("container.image", f"{reference!r}: {exc}") from exc
        if self._registry is None:
            raise NotFound(
                f"image {reference!r} is not in the docker daemon at {self._engine.where}, and no"
                " runtimes.docker.registry is configured to pull it from"
            )
        qualified = repository.split("/", 1)[0] == index
        if qualified and index != self._registry:
            raise NotFound(
                f"image {reference!r} is not in the docker daemon, and images are pulled only from"
                f" the configured registry {self._registry!r}"
            )
        separator = "@" if "@" in reference else ":"
        pulled = f"{self._registry}/{remote}" + (f"{separator}{tag}" if tag else ":latest")
        config = await self._engine.image_config(pulled)
        if config is None:
            await self._engine.pull(pulled, LaunchFailed)
            config = await self._engine.image_config(pulled)
        return DockerImage(pulled, config or {})
