"""One builder per runtime: a started service configured as that runtime's integration tests
configure theirs, the images the contract needs, and the probe of the runtime's own objects.
Each returns a Node whose stop() undoes all of it; the daemons are the shared per-worker ones."""

from __future__ import annotations

from pathlib import Path

from adapter.runtimes.docker.handle import LABEL_CONTAINER_ID, LABEL_OWNER
from tests.cgroup_roots import run_scoped_name
from tests.conformance.nodes import Node, ObjectProbe, import_images
from tests.conftest import ServiceProcess
from tests.docker_fixtures import PrivateDockerd, docker_service_config
from tests.images import REFERENCE, SETTINGS_REFERENCE, busybox_oci_layout
from tests.integration.containerd_daemon import ContainerdDaemon, containerd_config
from tests.integration.libvirtd import PrivateLibvirtd, libvirt_service
from tests.integration.test_lxc import LXC_CONFIG, lxcpath, monitors


def started(node: Node, *images: Path) -> Node:
    """Start the node's service and import `images` (tarballs) into its store; a node that
    fails to come up is stopped before the error."""
    try:
        node.service.start()
        import_images(node.service, *images)
    except BaseException:
        node.stop()
        raise
    return node


def native_objects(service: ServiceProcess) -> ObjectProbe:
    def probe(container_id: str) -> list[str]:
        run_dir = service.state_dir / "native" / container_id
        return [f"run directory {run_dir}"] if run_dir.exists() else []

    return probe


def native_node(workdir: Path, settings: Path, service: ServiceProcess | None = None) -> Node:
    """On `service` when given (the suite-wide native service), else on a new one."""
    if service is not None:
        node = Node("native", service, native_objects(service), settings_image=SETTINGS_REFERENCE)
        import_images(service, settings)
        return node
    service = ServiceProcess(workdir)
    node = Node("native", service, native_objects(service), settings_image=SETTINGS_REFERENCE)
    return started(node, settings)


def lxc_objects(service: ServiceProcess) -> ObjectProbe:
    def probe(container_id: str) -> list[str]:
        found = [f"lxc-start monitor {p.pid}" for p in monitors(container_id)]
        directory = lxcpath(service) / container_id
        return found + ([f"LXC container directory {directory}"] if directory.exists() else [])

    return probe


def lxc_node(workdir: Path, settings: Path) -> Node:
    service = ServiceProcess(workdir, extra_config=LXC_CONFIG)
    node = started(Node("lxc", service, lxc_objects(service), settings_image=SETTINGS_REFERENCE))
    import_images(service, settings)
    return node


def containerd_objects(daemon: ContainerdDaemon, namespace: str) -> ObjectProbe:
    listings = {
        "container": ("containers", "ls", "-q"),
        "task": ("tasks", "ls"),
        "snapshot": ("snapshots", "ls"),
        "lease": ("leases", "ls", "-q"),
    }

    def probe(container_id: str) -> list[str]:
        return [
            f"containerd {kind} {container_id}"
            for kind, listing in listings.items()
            if container_id in daemon.lines(*listing, namespace=namespace)
        ]

    return probe


def containerd_node(workdir: Path, settings: Path, daemon: ContainerdDaemon) -> Node:
    """A service with the containerd runtime (runc) on a namespace of its own."""
    namespace = run_scoped_name("ctz")
    service = ServiceProcess(workdir, containerd_config(daemon, namespace))
    node = Node(
        "containerd",
        service,
        containerd_objects(daemon, namespace),
        image=REFERENCE,
        settings_image=SETTINGS_REFERENCE,
        stop_actions=[lambda: daemon.remove_namespace(namespace)],
    )
    return started(node, busybox_oci_layout(workdir), settings)


def docker_objects(daemon: PrivateDockerd, service: ServiceProcess) -> ObjectProbe:
    def probe(container_id: str) -> list[str]:
        client = daemon.client()
        try:
            labels = [f"{LABEL_CONTAINER_ID}={container_id}", f"{LABEL_OWNER}={service.state_dir}"]
            found = client.containers.list(all=True, filters={"label": labels})
        finally:
            client.close()
        return [f"Docker container {c.name} ({c.status})" for c in found]

    return probe


def docker_node(
    workdir: Path, daemon: PrivateDockerd, busybox_image: str, settings_image: str
) -> Node:
    """A service with the docker runtime on the private dockerd; images come from the daemon
    (built there by Docker's builder), so no registry is configured."""
    service = ServiceProcess(workdir, docker_service_config(daemon, None))
    objects = docker_objects(daemon, service)
    node = Node("docker", service, objects, image=busybox_image, settings_image=settings_image)
    return started(node)


def libvirt_objects(daemon: PrivateLibvirtd, service: ServiceProcess) -> ObjectProbe:
    def probe(container_id: str) -> list[str]:
        import libvirt

        name = f"containerizer-{container_id}"
        connection = libvirt.open(daemon.uri)
        try:
            domains = {domain.name() for domain in connection.listAllDomains()}
        finally:
            connection.close()
        found = [f"libvirt domain {name}"] if name in domains else []
        run_dir = service.state_dir / "libvirt" / "run" / container_id
        return found + ([f"run directory {run_dir}"] if run_dir.exists() else [])

    return probe


def libvirt_node(workdir: Path, daemon: PrivateLibvirtd) -> Node:
    """A service whose guests boot under TCG on the private libvirtd (KVM is masked there)."""
    service = libvirt_service(daemon, workdir)
    return started(Node("libvirt", service, libvirt_objects(daemon, service)))
