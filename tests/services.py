"""The services `serve` builds, for a test that builds a runtime driver (or its parts) itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapter.core.config import AgentConfig
from adapter.core.services import Services, build_services


def node_services(state_dir: Path, **config: Any) -> Services:
    """The services of a node whose state is in `state_dir`, with the other AgentConfig fields
    given (e.g. cgroups_root, network): the same builder the service uses."""
    return build_services(AgentConfig(state_dir=state_dir, **config))
