"""Errors raised by the cgroup layer. Each message names the file and the value involved.

CgroupError                 base of everything below
 ├── HierarchyError         no usable cgroup mount for a controller / bad override
 ├── CgroupFileError        reading or writing one interface file failed
 └── DestroyError           processes survived every freeze/kill/thaw round
"""

from __future__ import annotations


class CgroupError(Exception):
    """Base class for cgroup failures."""


class HierarchyError(CgroupError):
    """A controller is not mounted, or the mount table / override cannot be used."""


class CgroupFileError(CgroupError):
    """An interface file could not be read, parsed or written."""


class DestroyError(CgroupError):
    """A cgroup still holds processes after the bounded number of kill rounds."""
