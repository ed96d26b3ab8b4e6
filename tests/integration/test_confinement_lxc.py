"""The default confinement, attacked from inside an image container of the LXC runtime: the
same checks as the native runtime's (test_confinement_native.py), through a real service whose
containers' init is our static supervisor."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_confinement_native import (
    ALLOW_PRIVILEGED,
    DEFAULT_MASK,
    ConfinementChecks,
    Node,
    lines_with,
    start_node,
    stop_node,
)
from tests.integration.test_lxc import LXC_CONFIG, require_lxc

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lxc_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    require_lxc()
    workdir = tmp_path_factory.mktemp("confinement-lxc")
    service = start_node(workdir, LXC_CONFIG)
    try:
        node = Node(service, "lxc")
        node.import_images(workdir)
        yield node
    finally:
        stop_node(service)


@pytest.fixture
def lxc_privileged_node(tmp_path: Path) -> Iterator[Node]:
    require_lxc()
    service = start_node(tmp_path, ALLOW_PRIVILEGED + LXC_CONFIG)
    try:
        node = Node(service, "lxc")
        node.import_images(tmp_path)
        yield node
    finally:
        stop_node(service)


class TestLxcConfinement(ConfinementChecks):
    @pytest.fixture
    def node(self, lxc_node: Node) -> Node:
        return lxc_node

    @pytest.fixture
    def privileged_node(self, lxc_privileged_node: Node) -> Node:
        return lxc_privileged_node

    def test_the_default_rootfs_is_confined_too(self, node: Node, container_id: str) -> None:
        """Without an image LXC runs the busybox base: its own root, the same confinement."""
        script = "grep -e CapEff -e Seccomp: /proc/self/status; echo sandbox:$MESOS_SANDBOX"
        _, output = node.run(container_id, script, image="")
        assert lines_with("CapEff", output) == [DEFAULT_MASK], output
        assert lines_with("Seccomp", output) == ["2"]
        assert lines_with("sandbox", output) == ["/mnt/mesos/sandbox"]
