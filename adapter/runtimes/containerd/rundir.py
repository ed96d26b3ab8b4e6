"""Per-container run directories, `<state_dir>/containerd/<container id>`, root's only: what the
service and a container's shim share by path. The log relay writes its pid file there, and
ExecSync makes its FIFOs there; a workload reaches none of it (the directory is on the host,
outside every container's root), so nothing here is a path a workload controls.

A directory is made at start and removed by cleanup; recovery removes those no checkpoint
names (a crash between the two).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


class RunDirectories:
    def __init__(self, root: Path) -> None:
        self.root = root  # <state_dir>/containerd

    def path(self, container_id: str) -> Path:
        """Container ids are checked at the service edge: one safe path component each."""
        return self.root / container_id

    def make(self, container_id: str) -> Path:
        """A fresh, empty directory: an earlier container of the same id left nothing there."""
        directory = self.path(container_id)
        shutil.rmtree(directory, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        directory.mkdir(mode=0o700)
        return directory

    def remove(self, container_id: str) -> None:
        shutil.rmtree(self.path(container_id), ignore_errors=True)

    def remove_orphans(self, known_ids: set[str]) -> None:
        if not self.root.is_dir():
            return
        for directory in self.root.iterdir():
            if directory.name not in known_ids:
                log.info("containerd: removing orphan run directory %s", directory)
                shutil.rmtree(directory, ignore_errors=True)
