"""What recovery removes from containerd: the containers no checkpoint knows, found by the label
every object we create carries (CONTAINER_LABEL), and the image records of images no longer in
our store. The driver re-attaches to the checkpointed containers itself (their handles) and
removes each orphan as it cleans up any container: kill_all, then cleanup.
"""

from __future__ import annotations

import contextlib

from adapter.api.containerd.services.containers.v1 import containers_pb2
from adapter.api.containerd.services.images.v1 import images_pb2
from adapter.api.containerd.services.leases.v1 import leases_pb2
from adapter.core.errors import NotFound
from adapter.runtimes.containerd.client import ContainerdClient
from adapter.runtimes.containerd.content import ImageLoader
from adapter.runtimes.containerd.handle import CONTAINER_LABEL


async def orphans(client: ContainerdClient, known_ids: set[str]) -> list[str]:
    """Our ids of the containers and leases in our namespace that no checkpoint knows."""
    listed = await client.call(
        client.containers.List, containers_pb2.ListContainersRequest(), "list containers"
    )
    leases = await client.call(client.leases.List, leases_pb2.ListRequest(), "list leases")
    owners = [c.labels.get(CONTAINER_LABEL, "") for c in listed.containers]
    owners += [lease.labels.get(CONTAINER_LABEL, "") for lease in leases.leases]
    return [owner for owner in dict.fromkeys(owners) if owner and owner not in known_ids]


async def remove_images_not_in(
    client: ContainerdClient, stored: set[str], loader: ImageLoader | None
) -> None:
    """The containerd image records we made own their content and snapshots; an image
    removed from our store (`stored`: its references) goes, and containerd's garbage
    collector takes the rest. `loader` forgets that it loaded it."""
    listed = await client.call(client.images.List, images_pb2.ListImagesRequest(), "images")
    for image in listed.images:
        if image.name not in stored:
            with contextlib.suppress(NotFound):
                await client.call(
                    client.images.Delete,
                    images_pb2.DeleteImageRequest(name=image.name),
                    f"delete image {image.name}",
                )
            if loader is not None:
                loader.forget(image.name)
