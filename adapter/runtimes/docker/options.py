"""The docker runtime's table, `[runtimes.docker]`, parsed once when the config is loaded.

Without the `docker` package: a node checks its config before it builds the driver, which is
where a missing binding is named (adapter/runtimes/registry.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapter.runtimes.table import RuntimeTable

DEFAULT_ENDPOINT = "unix:///var/run/docker.sock"
ENDPOINT = re.compile(r"unix:///\S+|tcp://[A-Za-z0-9.\-]+:\d{1,5}")
REGISTRY = re.compile(r"[A-Za-z0-9.\-]+(:\d{1,5})?")
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
# Docker's reference grammar: [registry[:port]/]path[:tag][@sha256:digest]
IMAGE_REFERENCE = re.compile(
    rf"(?:[A-Za-z0-9.\-]+(?::\d{{1,5}})?/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
    r"(?::\w[\w.\-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
)


@dataclass(frozen=True)
class DockerOptions:
    endpoint: str = DEFAULT_ENDPOINT  # the Engine API: unix:///PATH or tcp://HOST:PORT
    registry: str | None = None  # where an image missing from the Engine is pulled from
    sandbox_image: str | None = None  # bridge mode's network sandbox runs `sleep infinity` from it

    @classmethod
    def parse(cls, table: RuntimeTable) -> DockerOptions:
        options = cls(
            endpoint=table.text("endpoint", DEFAULT_ENDPOINT),
            registry=table.optional_text("registry"),
            sandbox_image=table.optional_text("sandbox_image"),
        )
        if ENDPOINT.fullmatch(options.endpoint) is None:
            raise table.error("endpoint", "unix:///PATH or tcp://HOST:PORT")
        if options.registry is not None and REGISTRY.fullmatch(options.registry) is None:
            raise table.error("registry", "HOST[:PORT]")
        image = options.sandbox_image
        if image is not None and IMAGE_REFERENCE.fullmatch(image) is None:
            raise table.error("sandbox_image", "an image reference")
        return options
